"""Check every Triton kernel against its torch reference on a CUDA device, and time both.

    python benchmarks/kernels.py OUT.json [--budget SECONDS] [--only moe,norm,...]

For each case it prints: max relative error vs the reference, the kernel's and the reference's median time
(triton.testing.do_bench), the bytes the kernel must move at least, the achieved GB/s and its fraction of the
device-to-device copy bandwidth measured at the start of the same run. It also sweeps the MoE paths over the
token count, the fused decode MoE block against the separate ops, and launch shapes of the MoE kernels.
Everything goes to OUT.json as it is measured (a run cut short still leaves its numbers).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from highspeed import ops  # noqa: E402
from highspeed.context import AttentionContext  # noqa: E402
from highspeed.ops.triton import attention as t_attn  # noqa: E402
from highspeed.ops.triton import moe as t_moe  # noqa: E402
from highspeed.ops.triton import norm as t_norm  # noqa: E402
from highspeed.ops.triton import rope as t_rope  # noqa: E402
from highspeed.ops.sampling import sample as ops_sample  # noqa: E402

DEV = "cuda"
BF16 = torch.bfloat16


@contextmanager
def torch_reference() -> Iterator[None]:
    """Make highspeed.ops.* run their torch references even on CUDA."""
    os.environ["HIGHSPEED_DISABLE_TRITON"] = "1"
    try:
        yield
    finally:
        del os.environ["HIGHSPEED_DISABLE_TRITON"]


def ref_call(fn: Callable, *args: Any) -> Any:
    with torch_reference():
        return fn(*args)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    o, r = out.double(), ref.double()
    if not torch.isfinite(o).all():
        return float("inf")
    return float((o - r).norm() / r.norm().clamp_min(1e-30))


def bench(fn: Callable[[], Any], rep_ms: int = 60) -> float:
    """Median milliseconds, launched from Python each time (host launch overhead included when it dominates)."""
    return float(do_bench(fn, warmup=10, rep=rep_ms, return_mode="median"))


def bench_graph(fn: Callable[[], Any]) -> float | None:
    """Median milliseconds of CUDA-graph replays: device time without the host's launch overhead, which is what
    a captured decode step pays. None if the function cannot be captured."""
    try:
        from triton.testing import do_bench_cudagraph
        return float(do_bench_cudagraph(fn, rep=40, return_mode="median"))
    except Exception as exc:  # noqa: BLE001 - report and carry on
        print(f"  (graph timing failed: {type(exc).__name__}: {exc})")
        return None


class Runner:
    def __init__(self, out_path: Path, budget_s: float) -> None:
        self.out_path = out_path
        self.t0 = time.time()
        self.budget_s = budget_s
        self.rows: list[dict[str, Any]] = []
        self.record: dict[str, Any] = {}

    def time_left(self) -> float:
        return self.budget_s - (time.time() - self.t0)

    def save(self) -> None:
        self.record["rows"] = self.rows
        self.record["elapsed_s"] = round(time.time() - self.t0, 1)
        self.out_path.write_text(json.dumps(self.record, indent=1))

    def add(self, **row: Any) -> None:
        copy_bw = self.record.get("copy_GBps")
        # Bandwidth from the graph-replay time when there is one (device time), else from the plain time.
        t = row.get("graph_ms") or row.get("triton_ms")
        if row.get("bytes") and t:
            row["GBps"] = row["bytes"] / t / 1e6
            if copy_bw:
                row["frac_copy_bw"] = row["GBps"] / copy_bw
        self.rows.append(row)
        print(fmt_row(row), flush=True)
        self.save()


def fmt_row(r: dict[str, Any]) -> str:
    def f(key: str, spec: str) -> str:
        v = r.get(key)
        return format(v, spec) if isinstance(v, (int, float)) else "-"
    return (f"{r['kernel']:<18} {r['case']:<46} err {f('rel_err', '.1e'):>8}  triton {f('triton_ms', '8.4f')}"
            f"  graph {f('graph_ms', '8.4f')}  ref {f('ref_ms', '8.4f')} ms  {f('GBps', '6.0f')} GB/s"
            f"  {f('frac_copy_bw', '.2f')} copy")


def measure_copy_bw(r: Runner) -> None:
    n = 1 << 30  # 1 GiB, far past the 60 MB L2
    src = torch.randn(n // 4, device=DEV)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), rep_ms=200)
    r.record["copy_GBps"] = 2 * n / ms / 1e6
    print(f"device-to-device copy: {r.record['copy_GBps']:.0f} GB/s (read + write of 1 GiB in {ms:.3f} ms)")
    del src, dst


# ----------------------------------------------------------------------------------------------------------------

def bench_select_experts(r: Runner) -> None:
    cases = [
        ("GLM-5 sigmoid+bias E256 k8", 256, 8, "sigmoid", True, 1, 1, 2.5),
        ("DSV3 groups 8/4 E256 k8", 256, 8, "sigmoid", True, 8, 4, 2.5),
        ("Qwen3 softmax E128 k8", 128, 8, "softmax", False, 1, 1, 1.0),
    ]
    for name, E, k, scoring, bias, ng, tg, scale in cases:
        for T in (1, 64, 4096):
            logits = torch.randn(T, E, device=DEV)
            b = torch.randn(E, device=DEV) * 0.1 if bias else None
            args = (logits, k, scoring, True, b, ng, tg, scale)
            w, ids = t_moe.select_experts(*args)
            w_ref, ids_ref = ref_call(ops.select_experts, *args)
            ok = bool(torch.equal(ids, ids_ref))
            r.add(kernel="select_experts", case=f"{name} T={T}", rel_err=rel_err(w, w_ref), ids_equal=ok,
                  triton_ms=bench(lambda: t_moe.select_experts(*args)),
                  graph_ms=bench_graph(lambda: t_moe.select_experts(*args)) if T == 1 else None,
                  ref_ms=bench(lambda: ref_call(ops.select_experts, *args)),
                  bytes=T * E * 4 + T * k * 8)


def moe_bytes(ids: torch.Tensor, H: int, I: int, T: int, k: int, elt: int = 2) -> int:
    """Weights of the distinct experts touched + x in, out, and the [T*k, I] activations written and read."""
    n_exp = int(torch.unique(ids).numel())
    return n_exp * 3 * H * I * elt + 2 * T * H * elt + 2 * T * k * I * elt


def bench_moe(r: Runner) -> None:
    models = [
        # name, E, H, I, k, scoring
        ("Qwen3-30B-A3B", 128, 2048, 768, 8, "softmax"),
        ("GLM-5", 256, 6144, 2048, 8, "sigmoid"),
    ]
    # Alignment (sort pairs by expert): one-program kernel vs the torch version.
    for T in (1, 64, 1024, 2048):
        ids = ref_call(ops.select_experts, torch.randn(T, 256, device=DEV), 8, "sigmoid")[1]
        for use_kernel in (True, False):
            fn = lambda: t_moe.align_pairs_by_expert(ids, 256, 64, use_kernel=use_kernel)  # noqa: E731
            a, b = fn(), t_moe.align_pairs_by_expert(ids, 256, 64, use_kernel=not use_kernel)
            same = bool(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]))
            r.add(kernel="moe_align", case=f"E=256 k=8 T={T} {'kernel' if use_kernel else 'torch'}",
                  triton_ms=bench(fn), graph_ms=bench_graph(fn), ids_equal=same)
    for name, E, H, I, k, scoring in models:
        if r.time_left() < 60:
            return
        w13 = (torch.randn(E, 2 * I, H, device=DEV, dtype=BF16) * H**-0.5)
        w2 = (torch.randn(E, H, I, device=DEV, dtype=BF16) * I**-0.5)
        for T in (1, 2, 4, 8, 16, 32, 64, 128, 512, 2048, 8192):
            if r.time_left() < 40:
                return
            x = torch.randn(T, H, device=DEV, dtype=BF16)
            routes = [ref_call(ops.select_experts, torch.randn(T, E, device=DEV), k, scoring) for _ in range(4)]
            weights, ids = routes[0]
            ref = ref_call(ops.moe_experts, x, w13, w2, weights, ids)
            byts = moe_bytes(ids, H, I, T, k)
            it = iter(range(10**9))
            ref_ms = bench(lambda: ref_call(ops.moe_experts, x, w13, w2, *routes[next(it) % 4])) if T <= 512 else None
            for path, fn in (("grouped", t_moe._moe_grouped),):   # run 2 also timed a GEMV path, since removed
                out = fn(x, w13, w2, weights, ids)
                it = iter(range(10**9))
                ms = bench(lambda: fn(x, w13, w2, *routes[next(it) % 4]))
                gms = bench_graph(lambda: fn(x, w13, w2, weights, ids)) if T <= 128 else None
                r.add(kernel=f"moe_{path}", case=f"{name} T={T}", rel_err=rel_err(out, ref), triton_ms=ms,
                      graph_ms=gms, ref_ms=ref_ms, bytes=byts, tflops=6 * T * k * H * I / ms / 1e9, T=T,
                      model=name)
            # Grouped tiles: the small-T and large-T configurations on both sides of their switch.
            if T in (512, 2048, 8192):
                for label, cfg in (("small", t_moe.GROUPED), ("large", t_moe.GROUPED_LARGE)):
                    saved_min = t_moe.GROUPED_LARGE_MIN_ROWS_PER_EXPERT
                    t_moe.GROUPED_LARGE_MIN_ROWS_PER_EXPERT = 0 if label == "large" else 10**9
                    try:
                        ms = bench(lambda: t_moe._moe_grouped(x, w13, w2, weights, ids))
                    finally:
                        t_moe.GROUPED_LARGE_MIN_ROWS_PER_EXPERT = saved_min
                    r.add(kernel="moe_grouped_cfg", case=f"{name} T={T} {label} {cfg['BLOCK_M']}x{cfg['BLOCK_N']}",
                          triton_ms=ms, bytes=byts, tflops=6 * T * k * H * I / ms / 1e9)
        del w13, w2
        torch.cuda.empty_cache()


def bench_sampling(r: Runner) -> None:
    from highspeed.ops.sampling import SamplingTensors
    from highspeed.ops.triton import sampling as t_sampling

    V = 154880
    for B in (1, 32, 256):
        logits = torch.randn(B, V, device=DEV) * 4
        for mode in ("temperature", "min_p", "top_k+top_p"):
            st = SamplingTensors.build(
                temperature=[0.8] * B, top_k=[50 if mode == "top_k+top_p" else 0] * B,
                top_p=[0.9 if mode == "top_k+top_p" else 1.0] * B, min_p=[0.05 if mode == "min_p" else 0.0] * B,
                seeds=list(range(B)), steps=[123] * B, device=DEV)
            out = t_sampling.sample(logits, st)
            ref = ref_call(ops_sample, logits, st)
            mism = int((out != ref).sum())
            r.add(kernel="sample", case=f"B={B} V={V} {mode}", ids_equal=mism == 0, mismatches=mism,
                  triton_ms=bench(lambda: t_sampling.sample(logits, st)),
                  graph_ms=bench_graph(lambda: t_sampling.sample(logits, st)) if mode != "top_k+top_p" else None,
                  ref_ms=bench(lambda: ref_call(ops_sample, logits, st)), bytes=2 * B * V * 4)
    # The decode graph's greedy tail (argmax of the bf16 logits into the ids, inputs moved on) against what the host
    # ran around the graph before: the fp32 cast, then torch's argmax.
    for B in (1, 32):
        logits = (torch.randn(B, V, device=DEV) * 4).bfloat16()
        ids = torch.zeros(B, dtype=torch.int64, device=DEV)
        pos_slots = torch.full((2, B), -1, dtype=torch.int64, device=DEV)   # padding rows: nothing moves on
        seq_lens = torch.ones(B, dtype=torch.int32, device=DEV)
        t_sampling.greedy_advance(logits, ids, pos_slots, seq_lens)
        r.add(kernel="greedy_advance", case=f"B={B} V={V} bf16",
              ids_equal=bool((ids == logits.float().argmax(-1)).all()),
              graph_ms=bench_graph(lambda: t_sampling.greedy_advance(logits, ids, pos_slots, seq_lens)),
              ref_ms=bench_graph(lambda: logits.float().argmax(-1)), bytes=B * V * 2)


def bench_norm(r: Runner) -> None:
    for H in (2048, 6144):
        for T in (1, 128, 8192):
            x = torch.randn(T, H, device=DEV, dtype=BF16)
            res = torch.randn(T, H, device=DEV, dtype=BF16)
            w = torch.randn(H, device=DEV, dtype=BF16)
            y = t_norm.rms_norm(x, w, 1e-5)
            r.add(kernel="rms_norm", case=f"T={T} H={H}", rel_err=rel_err(y, ref_call(ops.rms_norm, x, w, 1e-5)),
                  triton_ms=bench(lambda: t_norm.rms_norm(x, w, 1e-5)),
                  graph_ms=bench_graph(lambda: t_norm.rms_norm(x, w, 1e-5)) if T == 1 else None,
                  ref_ms=bench(lambda: ref_call(ops.rms_norm, x, w, 1e-5)), bytes=2 * T * H * 2)
            y, s = t_norm.add_rms_norm(x, res, w, 1e-5)
            y_ref, s_ref = ref_call(ops.add_rms_norm, x, res, w, 1e-5)
            r.add(kernel="add_rms_norm", case=f"T={T} H={H}", rel_err=max(rel_err(y, y_ref), rel_err(s, s_ref)),
                  triton_ms=bench(lambda: t_norm.add_rms_norm(x, res, w, 1e-5)),
                  graph_ms=bench_graph(lambda: t_norm.add_rms_norm(x, res, w, 1e-5)) if T == 1 else None,
                  ref_ms=bench(lambda: ref_call(ops.add_rms_norm, x, res, w, 1e-5)), bytes=4 * T * H * 2)


def bench_rope(r: Runner) -> None:
    cs = ops.build_cos_sin_cache(64, 65536, 1e6, device=DEV)
    for T in (1, 4096):
        q = torch.randn(T, 96, 128, device=DEV, dtype=BF16)
        k = torch.randn(T, 8, 128, device=DEV, dtype=BF16)
        v = torch.randn(T, 8, 128, device=DEV, dtype=BF16)
        pos = torch.randint(0, 65536, (T,), device=DEV)
        for inter in (False, True):
            out = t_rope.rope(q, pos, cs, 64, inter)
            r.add(kernel="rope", case=f"GLM-4.5 q T={T} partial64 inter={inter}",
                  rel_err=rel_err(out, ref_call(ops.rope, q, pos, cs, 64, inter)),
                  triton_ms=bench(lambda: t_rope.rope(q, pos, cs, 64, inter)),
                  graph_ms=bench_graph(lambda: t_rope.rope(q, pos, cs, 64, inter)) if T == 1 else None,
                  ref_ms=bench(lambda: ref_call(ops.rope, q, pos, cs, 64, inter)), bytes=2 * q.numel() * 2)
        nb = T // 16 + 8
        kc = torch.zeros(nb, 16, 8, 128, device=DEV, dtype=BF16)
        vc = torch.zeros_like(kc)
        kc2, vc2 = kc.clone(), vc.clone()
        slots = torch.randperm(nb * 16, device=DEV)[:T]
        qo, ko = t_rope.rope_and_write_kv(q, k, v, pos, cs, 64, False, kc, vc, slots)
        qr, kr = ref_call(t_rope.rope_and_write_kv_reference, q, k, v, pos, cs, 64, False, kc2, vc2, slots)
        err = max(rel_err(qo, qr), rel_err(ko, kr), rel_err(kc, kc2), rel_err(vc, vc2))
        byts = 2 * (2 * q.numel() + 3 * k.numel() + 2 * v.numel())
        r.add(kernel="rope_and_write_kv", case=f"GLM-4.5 T={T}", rel_err=err,
              triton_ms=bench(lambda: t_rope.rope_and_write_kv(q, k, v, pos, cs, 64, False, kc, vc, slots)),
              graph_ms=bench_graph(lambda: t_rope.rope_and_write_kv(q, k, v, pos, cs, 64, False, kc, vc, slots))
              if T == 1 else None,
              ref_ms=bench(lambda: ref_call(t_rope.rope_and_write_kv_reference, q, k, v, pos, cs, 64, False,
                                            kc2, vc2, slots)), bytes=byts)
        values = torch.randn(T, 576, device=DEV, dtype=BF16)
        lat = torch.zeros(nb, 16, 576, device=DEV, dtype=BF16)
        lat2 = lat.clone()
        t_attn.write_kv(lat, slots, values)
        ref_call(ops.write_kv, lat2, slots, values)
        r.add(kernel="write_kv", case=f"MLA latent 576 T={T}", rel_err=rel_err(lat, lat2),
              triton_ms=bench(lambda: t_attn.write_kv(lat, slots, values)),
              ref_ms=bench(lambda: ref_call(ops.write_kv, lat2, slots, values)), bytes=2 * values.numel() * 2)
        # RMSNorms folded into the fused op; "unfused_*" is what the models ran before (separate norm launches, and
        # for MLA the cat that built the absorbed query).
        eps, cs_full = 1e-6, ops.build_cos_sin_cache(128, 65536, 1e6, device=DEV)
        q3 = torch.randn(T, 32, 128, device=DEV, dtype=BF16)   # Qwen3-30B-A3B: 32 q / 4 kv heads x 128
        k3, v3 = torch.randn(2, T, 4, 128, device=DEV, dtype=BF16)
        qw, kw = (torch.rand(2, 128, device=DEV) + 0.5).to(BF16)
        kc3, vc3 = torch.zeros(2, nb, 16, 4, 128, device=DEV, dtype=BF16)
        kc3r, vc3r = kc3.clone(), vc3.clone()
        args3 = (pos, cs_full, 128, False, kc3, vc3, slots)
        fused = lambda: t_rope.rope_and_write_kv(q3, k3, v3, *args3, qw, kw, None, eps)  # noqa: E731
        unfused = lambda: t_rope.rope_and_write_kv(  # noqa: E731
            t_norm.rms_norm(q3, qw, eps), t_norm.rms_norm(k3, kw, eps), v3, *args3)
        qo, ko = fused()
        qr, kr = ref_call(t_rope.rope_and_write_kv_reference, q3, k3, v3, pos, cs_full, 128, False, kc3r, vc3r, slots,
                          qw, kw, None, eps)
        err = max(rel_err(qo, qr), rel_err(ko, kr), rel_err(kc3, kc3r), rel_err(vc3, vc3r))
        r.add(kernel="rope_norm_write_kv", case=f"Qwen3-30B qk_norm T={T}", rel_err=err,
              triton_ms=bench(fused), graph_ms=bench_graph(fused) if T == 1 else None,
              unfused_ms=bench(unfused), unfused_graph_ms=bench_graph(unfused) if T == 1 else None,
              bytes=2 * (2 * q3.numel() + 3 * k3.numel() + 2 * v3.numel()))
        H, L, R, P = 20, 512, 64, 192   # GLM-4.7-Flash MLA: the latent norm, rope(q_pe) into the absorbed query
        q = torch.randn(T, H, P + R, device=DEV, dtype=BF16)
        c, k_pe = torch.randn(T, L + R, device=DEV, dtype=BF16).split([L, R], dim=-1)
        lw = (torch.rand(L, device=DEV) + 0.5).to(BF16)
        q_abs, q_abs_r = torch.zeros(2, T, H, L + R, device=DEV, dtype=BF16)
        lat_r = lat.clone()
        cs_r = ops.build_cos_sin_cache(R, 65536, 1e4, device=DEV)

        def mla_fused() -> None:
            t_rope.rope_and_write_kv(q[..., P:], k_pe, c, pos, cs_r, R, True, lat[..., L:], lat[..., :L], slots,
                                     None, None, lw, eps, q_abs[..., L:])

        def mla_unfused() -> torch.Tensor:
            qp, _ = t_rope.rope_and_write_kv(q[..., P:], k_pe, t_norm.rms_norm(c, lw, eps), pos, cs_r, R, True,
                                             lat[..., L:], lat[..., :L], slots)
            return torch.cat([q_abs[..., :L], qp], dim=-1)

        mla_fused()
        ref_call(t_rope.rope_and_write_kv_reference, q[..., P:], k_pe, c, pos, cs_r, R, True, lat_r[..., L:],
                 lat_r[..., :L], slots, None, None, lw, eps, q_abs_r[..., L:])
        r.add(kernel="rope_norm_write_kv", case=f"MLA H={H} L={L} R={R} T={T}",
              rel_err=max(rel_err(q_abs, q_abs_r), rel_err(lat, lat_r)),
              triton_ms=bench(mla_fused), graph_ms=bench_graph(mla_fused) if T == 1 else None,
              unfused_ms=bench(mla_unfused), unfused_graph_ms=bench_graph(mla_unfused) if T == 1 else None,
              bytes=2 * (2 * T * H * R + 3 * T * R + 2 * T * L))


def make_ctx(qlens: list[int], slens: list[int], block_size: int) -> tuple[AttentionContext, int]:
    need = [(s + block_size - 1) // block_size for s in slens]
    nb = sum(need) + 1
    perm = torch.randperm(nb)
    tables = torch.zeros(len(slens), max(need), dtype=torch.int32)
    used = 0
    for i, n in enumerate(need):
        tables[i, :n] = perm[used:used + n].int()
        used += n
    qsl = [0]
    for q in qlens:
        qsl.append(qsl[-1] + q)
    ctx = AttentionContext(
        query_lens=qlens, seq_lens=slens, query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=DEV),
        seq_lens_t=torch.tensor(slens, dtype=torch.int32, device=DEV),
        slot_mapping=torch.zeros(sum(qlens), dtype=torch.int64, device=DEV), block_tables=tables.to(DEV),
        block_size=block_size, max_query_len=max(qlens), max_seq_len=max(slens),
        decode_only=all(q == 1 for q in qlens))
    return ctx, nb


def bench_attention(r: Runner) -> None:
    # Batch-1 decode at short contexts (block_size 16, as the engine runs them), first: Qwen3-30B-A3B GQA 32/4 x 128
    # and GLM-4.7-Flash absorbed MLA 20 x (512 + 64). max_seq_len = the context, plus the e2e benchmark's graph
    # (max_model_len 384) holding a 200-token sequence. Sweeps: the smallest decode key tile x the fused merge
    # bound, and the rule before this change (>= 4 tiles per split: forced split count, separate merge).
    short = [(f"ctx={c}", c, c) for c in (128, 384, 1024, 4096)] + [("ctx=200 in graph for 384", 200, 384)]
    sweep = [(16, 0), (16, 8192), (32, 0), (32, 8192), (32, 16384), (64, 0), (64, 8192), (64, 16384)]
    saved = (t_attn.DECODE_MIN_BLOCK_N, t_attn.FUSED_MERGE_MAX_ELEMS)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for model in ("Qwen3-30B-A3B 32/4x128", "GLM-4.7-Flash 20x(512+64)"):
        gqa_model = model.startswith("Qwen3")
        for name, sl, max_len in short:
            if r.time_left() < 30:
                return
            ctx, nb = make_ctx([1], [sl], 16)
            ctx.max_seq_len = max_len
            if gqa_model:
                q = torch.randn(1, 32, 128, device=DEV, dtype=BF16)
                kc = torch.randn(nb, 16, 4, 128, device=DEV, dtype=BF16)
                vc = torch.randn(nb, 16, 4, 128, device=DEV, dtype=BF16)
                fn = lambda: t_attn.paged_attention(q, kc, vc, ctx, 128**-0.5)  # noqa: E731
                ref = ref_call(ops.paged_attention, q, kc, vc, ctx, 128**-0.5)
                byts = sl * 4 * 128 * 2 * 2 + 2 * q.numel() * 2
                plan = dict(block_n=t_attn.GQA["block_n"], base=4, rows=8 * 128)
            else:
                q = torch.randn(1, 20, 576, device=DEV, dtype=BF16)
                lat = torch.randn(nb, 16, 576, device=DEV, dtype=BF16)
                fn = lambda: t_attn.mla_attention(q, lat, ctx, 192**-0.5, 512)  # noqa: E731
                ref = ref_call(ops.mla_attention, q, lat, ctx, 192**-0.5, 512)
                byts = sl * 576 * 2 + q.numel() * 2 + 20 * 512 * 2
                plan = dict(block_n=t_attn.MLA_WIDE_FEW_SEQS["block_n"], base=1, rows=32 * 512)
            kernel = "paged_attention" if gqa_model else "mla_attention"
            r.add(kernel=kernel, case=f"{model} decode B=1 {name}", rel_err=rel_err(fn(), ref),
                  triton_ms=bench(fn), graph_ms=bench_graph(fn), bytes=byts)
            old_splits = max(1, min(triton.cdiv(t_attn.SPLIT_PROGRAMS_PER_SM * sms, plan["base"]),
                                    triton.cdiv(max_len, plan["block_n"]) // 4, 64))
            configs = [(t_attn.DECODE_MIN_BLOCK_N, 0, old_splits)] + [(bn, fm, None) for bn, fm in sweep]
            seen = set()
            for i, (min_bn, fused_max, forced) in enumerate(configs):
                if r.time_left() < 30:
                    break
                t_attn.DECODE_MIN_BLOCK_N, t_attn.FUSED_MERGE_MAX_ELEMS = min_bn, fused_max
                splits, bn, per = t_attn._split_plan(max_len, plan["block_n"], plan["base"], True, plan["rows"], sms,
                                                     forced)
                fused = splits > 1 and t_attn._merge_fits(splits, plan["rows"])
                t_attn.DECODE_MIN_BLOCK_N, t_attn.FUSED_MERGE_MAX_ELEMS = saved
                if (splits, bn, per, fused) in seen:
                    continue   # same launch as a row already measured
                seen.add((splits, bn, per, fused))
                t_attn.DECODE_MIN_BLOCK_N, t_attn.FUSED_MERGE_MAX_ELEMS = min_bn, fused_max
                if forced is not None:
                    ctx.extra["num_kv_splits"] = forced
                label = "old rule" if i == 0 else f"min_n{min_bn} fused<={fused_max}"
                try:
                    r.add(kernel="attn_decode_cfg", case=f"{model} B=1 {name} {label}: {splits}x{per}x{bn} keys"
                          f"{' fused' if fused else ''}", rel_err=rel_err(fn(), ref), graph_ms=bench_graph(fn),
                          bytes=byts)
                finally:
                    ctx.extra.pop("num_kv_splits", None)
                    t_attn.DECODE_MIN_BLOCK_N, t_attn.FUSED_MERGE_MAX_ELEMS = saved
    bs = 64
    gqa = [("decode B=1 ctx=32768", [1], [32768]), ("decode B=32 ctx=4096", [1] * 32, [4096] * 32),
           ("decode B=128 ctx=1024", [1] * 128, [1024] * 128), ("prefill 4096", [4096], [4096])]
    for name, ql, sl in gqa:
        if r.time_left() < 30:
            return
        ctx, nb = make_ctx(ql, sl, bs)
        q = torch.randn(sum(ql), 96, 128, device=DEV, dtype=BF16)
        kc = torch.randn(nb, bs, 8, 128, device=DEV, dtype=BF16)
        vc = torch.randn(nb, bs, 8, 128, device=DEV, dtype=BF16)
        out = t_attn.paged_attention(q, kc, vc, ctx, 128**-0.5)
        ref = ref_call(ops.paged_attention, q, kc, vc, ctx, 128**-0.5)
        kv_bytes = sum(sl) * 8 * 128 * 2 * 2
        flops = sum(4 * q_ * s_ * 96 * 128 for q_, s_ in zip(ql, sl)) // (2 if ql[0] > 1 else 1)
        decode = ql[0] == 1
        fn = lambda: t_attn.paged_attention(q, kc, vc, ctx, 128**-0.5)  # noqa: E731
        ms = bench(fn)
        r.add(kernel="paged_attention", case=f"GLM-4.5 96/8x128 {name}", rel_err=rel_err(out, ref), triton_ms=ms,
              graph_ms=bench_graph(fn) if decode else None,
              ref_ms=bench(lambda: ref_call(ops.paged_attention, q, kc, vc, ctx, 128**-0.5)),
              bytes=kv_bytes + 2 * q.numel() * 2, tflops=flops / ms / 1e9)
        if name == "decode B=1 ctx=32768":
            saved = t_attn.SPLIT_PROGRAMS_PER_SM
            for per_sm in (1, 4, 8):
                t_attn.SPLIT_PROGRAMS_PER_SM = per_sm
                r.add(kernel="paged_attention_cfg", case=f"B=1 ctx=32768 splits for {per_sm}/SM",
                      rel_err=rel_err(fn(), ref), triton_ms=bench(fn), graph_ms=bench_graph(fn),
                      bytes=kv_bytes + 2 * q.numel() * 2)
            t_attn.SPLIT_PROGRAMS_PER_SM = saved
    mla = [("decode B=1 ctx=32768", [1], [32768], None), ("decode B=32 ctx=4096", [1] * 32, [4096] * 32, None),
           ("decode B=32 ctx=32768 DSA top2048", [1] * 32, [32768] * 32, 2048), ("prefill 2048", [2048], [2048], None)]
    mla_cfgs = [dict(heads=16, block_n=32, num_warps=8, max_rows=32, num_stages=2),
                dict(heads=32, block_n=32, num_warps=8, max_rows=32, num_stages=2),
                dict(heads=64, block_n=32, num_warps=8, max_rows=64, num_stages=2),
                dict(heads=16, block_n=64, num_warps=4, max_rows=32, num_stages=2),
                dict(heads=32, block_n=16, num_warps=4, max_rows=32, num_stages=3)]
    for name, ql, sl, topk in mla:
        if r.time_left() < 30:
            return
        ctx, nb = make_ctx(ql, sl, bs)
        T = sum(ql)
        q = torch.randn(T, 64, 576, device=DEV, dtype=BF16)
        lat = torch.randn(nb, bs, 576, device=DEV, dtype=BF16)
        ti = None
        if topk:
            ti = torch.stack([torch.randperm(s, device=DEV)[:topk] for s in sl]).int()
        out = t_attn.mla_attention(q, lat, ctx, 192**-0.5, 512, ti)
        ref = ref_call(ops.mla_attention, q, lat, ctx, 192**-0.5, 512, ti)
        keys = [min(s, topk) if topk else s for s in sl]
        kv_bytes = sum(keys) * 576 * 2
        byts = kv_bytes + q.numel() * 2 + T * 64 * 512 * 2
        flops = sum(2 * q_ * s_ * 64 * (576 + 512) for q_, s_ in zip(ql, keys)) // (2 if ql[0] > 1 else 1)
        decode = ql[0] == 1
        fn = lambda: t_attn.mla_attention(q, lat, ctx, 192**-0.5, 512, ti)  # noqa: E731
        ms = bench(fn)
        r.add(kernel="mla_attention", case=f"GLM-5 64x(512+64) {name}", rel_err=rel_err(out, ref), triton_ms=ms,
              graph_ms=bench_graph(fn) if decode else None,
              ref_ms=bench(lambda: ref_call(ops.mla_attention, q, lat, ctx, 192**-0.5, 512, ti)),
              bytes=byts, tflops=flops / ms / 1e9)
        saved = dict(t_attn.MLA_WIDE)
        for cfg in mla_cfgs:
            if r.time_left() < 30:
                break
            t_attn.MLA_WIDE.update(cfg)
            try:
                err = rel_err(fn(), ref)
                ms = bench(fn)
                r.add(kernel="mla_attention_cfg", case=f"{name} h{cfg['heads']} n{cfg['block_n']} w{cfg['num_warps']}"
                      f" s{cfg['num_stages']}", rel_err=err, triton_ms=ms, bytes=byts, tflops=flops / ms / 1e9)
            except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory for one shape
                r.add(kernel="mla_attention_cfg", case=f"{name} {cfg} failed: {type(exc).__name__}")
        t_attn.MLA_WIDE.clear()
        t_attn.MLA_WIDE.update(saved)


def bench_fused_moe(r: Runner) -> None:
    """The decode MoE block (``fused_moe``: router + routing + experts + shared expert) at T = 1..4: a sweep of
    each of its three kernels' launch shapes (one at a time, keeping the best of the others), then the fused path
    against the unfused one it replaces (router GEMM, select_experts, moe_experts, shared MLP)."""
    models = [
        # name, E, H, I, k, scoring, n_group, topk_group, shared intermediate
        ("Qwen3-30B-A3B", 128, 2048, 768, 8, "softmax", 1, 1, 0),
        ("GLM-4.7-Flash", 64, 2048, 1536, 4, "sigmoid", 1, 1, 1536),
        ("GLM-5", 256, 6144, 2048, 8, "sigmoid", 1, 1, 2048),
    ]

    def shapes(rows: list[tuple[int, int, int, bool]]) -> list[dict]:
        return [dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, PREFETCH=pf) for bn, bk, nw, pf in rows]

    sweeps = {
        "ROUTER": [dict(BLOCK_E=1, BLOCK_K=1024, num_warps=4), dict(BLOCK_E=2, BLOCK_K=512, num_warps=4)],
        # PREFETCH: software double-buffered weight tiles (run 5 measured only the plain loop).
        "FUSED_GATE_UP": shapes([(16, 256, 4, False), (16, 256, 4, True), (8, 256, 4, True), (8, 512, 4, True),
                                 (16, 512, 8, True), (32, 256, 8, True), (4, 512, 4, True), (4, 1024, 4, True)]),
        "FUSED_DOWN": shapes([(4, 256, 4, False), (4, 256, 4, True), (2, 256, 4, True), (8, 128, 4, True),
                              (8, 256, 8, True), (4, 512, 8, True), (1, 512, 4, True), (2, 512, 4, True)]),
    }
    saved_narrow, saved_wide = t_moe.NARROW_I, (t_moe.FUSED_DOWN_WIDE, t_moe.FUSED_DOWN_WIDE_SHARED_IN_LOOP)
    t_moe.NARROW_I = -1     # the sweep sets FUSED_GATE_UP for every expert width
    # and FUSED_DOWN too (the same dict while it runs)
    t_moe.FUSED_DOWN_WIDE = t_moe.FUSED_DOWN_WIDE_SHARED_IN_LOOP = t_moe.FUSED_DOWN
    try:
        for model in models:
            if r.time_left() < 60:
                return
            _bench_fused_moe_model(r, sweeps, *model)
    finally:
        t_moe.NARROW_I, (t_moe.FUSED_DOWN_WIDE, t_moe.FUSED_DOWN_WIDE_SHARED_IN_LOOP) = saved_narrow, saved_wide


def _bench_fused_moe_model(r: Runner, sweeps: dict, name: str, E: int, H: int, I: int, k: int, scoring: str,
                           ng: int, tg: int, S: int) -> None:
    w13 = torch.randn(E, 2 * I, H, device=DEV, dtype=BF16) * H**-0.5
    w2 = torch.randn(E, H, I, device=DEV, dtype=BF16) * I**-0.5
    gate = torch.randn(E, H, device=DEV) * H**-0.5
    bias = torch.randn(E, device=DEV) * 0.1 if scoring == "sigmoid" else None
    ws13 = torch.randn(2 * S, H, device=DEV, dtype=BF16) * H**-0.5 if S else None
    ws2 = torch.randn(H, S, device=DEV, dtype=BF16) * S**-0.5 if S else None
    xs = [torch.randn(1, H, device=DEV, dtype=BF16) for _ in range(8)]
    # Bytes a token must read: router (fp32), k experts, the shared expert.
    byts = E * H * 4 + k * 3 * H * I * 2 + 3 * H * S * 2

    def run(x: torch.Tensor) -> torch.Tensor:
        return t_moe.fused_moe(x, gate, w13, w2, k, scoring, True, bias, ng, tg, 2.5, ws13, ws2)

    ref = ref_call(ops.fused_moe, xs[0], gate, w13, w2, k, scoring, True, bias, ng, tg, 2.5, ws13, ws2)
    for which, cfgs in sweeps.items():
        target = getattr(t_moe, which)
        best = None
        for cfg in cfgs:
            target.clear()
            target.update(cfg)
            err = rel_err(run(xs[0]), ref)
            gms = bench_graph(lambda: run(xs[0]))
            label = " ".join(f"{key}={v}" for key, v in cfg.items())
            r.add(kernel=f"fused_moe_{which.lower()}", case=f"{name} T=1 {label}", rel_err=err, graph_ms=gms,
                  bytes=byts)
            if gms is not None and (best is None or gms < best[0]):
                best = (gms, dict(cfg))
        if best is not None:
            target.clear()
            target.update(best[1])
            r.record.setdefault("fused_moe_best", {}).setdefault(name, {})[which] = best[1]
    # Fused vs the unfused path, over T (FUSED_MAX_TOKENS decides which one the model takes).
    saved = t_moe.FUSED_MAX_TOKENS
    for T in (1, 2, 4, 8):
        x = torch.randn(T, H, device=DEV, dtype=BF16)
        ref = ref_call(ops.fused_moe, x, gate, w13, w2, k, scoring, True, bias, ng, tg, 2.5, ws13, ws2)
        for path, limit in (("fused", 10**6), ("unfused", 0)):
            t_moe.FUSED_MAX_TOKENS = limit
            fn = lambda: t_moe.fused_moe(  # noqa: E731
                x, gate, w13, w2, k, scoring, True, bias, ng, tg, 2.5, ws13, ws2)
            r.add(kernel=f"fused_moe_{path}", case=f"{name} T={T}", rel_err=rel_err(fn(), ref),
                  graph_ms=bench_graph(fn), bytes=byts if T == 1 else None, T=T, model=name)
    t_moe.FUSED_MAX_TOKENS = saved
    del w13, w2
    torch.cuda.empty_cache()


def bench_linear(r: Runner) -> None:
    """Batch-1 GEMV on the projection shapes of the benchmark models: cuBLAS (F.linear) and the row kernel
    (launch-shape sweep), with the weights cold in L2 -- each timed call cycles
    through enough copies of the weight to overflow the 50 MB L2, as a model's distinct layers do (run 5's first
    sweep reused one weight, so every shape under ~40 MB was served from L2 and looked faster than in the model)."""
    from highspeed.ops.triton import linear as t_lin

    shapes = [
        # name, N, K
        ("qwen3 qkv", 5120, 2048), ("qwen3 o", 2048, 4096),
        ("glm-flash q_a+kv_a", 1344, 2048), ("glm-flash q_b", 5120, 768), ("glm-flash o", 2048, 5120),
        ("glm-flash shared gate_up", 3072, 2048), ("glm-flash shared down", 2048, 1536),
        ("glm-5 o", 6144, 16384),
    ]
    rows = [dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, PREFETCH=pf)
            for bn, bk, nw, pf in ((4, 512, 4, True), (4, 512, 4, False), (8, 256, 4, True), (2, 1024, 4, True),
                                   (8, 512, 8, True), (4, 1024, 8, True), (16, 256, 4, True))]
    saved = dict(t_lin.GEMV_ROW), t_lin.use_gemv, t_lin.NARROW_N
    t_lin.use_gemv = lambda *a: True   # every shape takes the kernel here, with the swept launch shape
    t_lin.NARROW_N = 0
    try:
        for name, N, K in shapes:
            if r.time_left() < 30:
                return
            nbytes = N * K * 2
            copies = max(1, min(16, -(-160 * 2**20 // nbytes)))
            ws = [torch.randn(N, K, device=DEV, dtype=BF16) * K**-0.5 for _ in range(copies)]
            for M in (1,):
                x = torch.randn(M, K, device=DEV, dtype=BF16)
                ref = torch.nn.functional.linear(x, ws[0])

                def cold(f: Callable) -> Callable:
                    return lambda: [f(x, w) for w in ws]

                def add(kernel: str, label: str, f: Callable) -> None:
                    ms = bench_graph(cold(f))
                    r.add(kernel=kernel, case=f"{name} M={M} {label}".strip(), rel_err=rel_err(f(x, ws[0]), ref),
                          graph_ms=ms / copies if ms else None, bytes=nbytes, M=M)

                add("linear_cublas_cold", "", torch.nn.functional.linear)
                for cfg in rows:
                    t_lin.GEMV_ROW.clear()
                    t_lin.GEMV_ROW.update(cfg)
                    add("linear_row_cold", " ".join(f"{k}={v}" for k, v in cfg.items()), t_lin.linear)
            del ws
    finally:
        t_lin.GEMV_ROW.clear()
        t_lin.GEMV_ROW.update(saved[0])
        t_lin.use_gemv, t_lin.NARROW_N = saved[1], saved[2]


def bench_dsa(r: Runner) -> None:
    """GLM-5's lightning indexer (32 heads x 128, top-2048) at decode: the score kernel alone and with torch.topk.
    "bound" cases size the score buffer for a larger max_seq_len than the contexts, as a captured decode graph
    does (max_model_len), to show what that costs."""
    from highspeed.ops.triton import dsa as t_dsa

    bs, H, D, topk, scale = 64, 32, 128, 2048, 128**-0.5
    cases = [(1, 4096, None), (1, 32768, None), (32, 4096, None), (32, 32768, None),
             (1, 4096, 131072), (32, 4096, 131072)]
    for B, ctx_len, bound in cases:
        if r.time_left() < 30:
            return
        ctx, nb = make_ctx([1] * B, [ctx_len] * B, bs)
        ref_ctx = ctx   # the reference loops over the real lengths; a bound only widens the kernel's buffer
        if bound:
            width = -(-bound // bs)
            ctx = AttentionContext(**{**ctx.__dict__, "max_seq_len": bound, "block_tables": torch.nn.functional.pad(
                ctx.block_tables, (0, width - ctx.block_tables.shape[1]))})
        q = torch.randn(B, H, D, device=DEV, dtype=BF16)
        w = torch.randn(B, H, device=DEV) * H**-0.5
        kc = torch.randn(nb, bs, D, device=DEV, dtype=BF16)
        got = t_dsa.dsa_topk_indices(q, w, kc, ctx, topk, scale)
        ref = ref_call(ops.dsa_topk_indices, q, w, kc, ref_ctx, topk, scale)
        common = sum(len(set(g[g >= 0].tolist()) & set(f[f >= 0].tolist())) for g, f in zip(got, ref))
        overlap = common / max(1, int((ref >= 0).sum()))   # bf16 near-ties may swap a few picks
        keys = ctx.max_seq_len
        byts = B * ctx_len * D * 2 + q.numel() * 2 + B * keys * 4 * 2   # keys, queries, score buffer out + in
        case = f"GLM-5 32x128 top2048 B={B} ctx={ctx_len}" + (f" bound={bound}" if bound else "")
        fn = lambda: t_dsa.dsa_topk_indices(q, w, kc, ctx, topk, scale)  # noqa: E731
        scores_fn = lambda: t_dsa.indexer_scores(q, w, kc, ctx, scale, keys)  # noqa: E731
        r.add(kernel="dsa_topk_indices", case=case, overlap=overlap, triton_ms=bench(fn), graph_ms=bench_graph(fn),
              ref_ms=bench(lambda: ref_call(ops.dsa_topk_indices, q, w, kc, ref_ctx, topk, scale)), bytes=byts)
        r.add(kernel="dsa_indexer_scores", case=case, triton_ms=bench(scores_fn), graph_ms=bench_graph(scores_fn),
              bytes=byts - B * keys * 4)


def bench_mla_proj(r: Runner) -> None:
    """MLA decode's two per-head products, q_nope @ W_UK and latent @ W_UV^T: torch.bmm (cuBLAS) against the Triton
    GEMVs (highspeed/ops/triton/mla_proj.py), bf16, on the strided views the model passes, weights cold in L2 as in
    ``bench_linear`` (each timed call cycles through enough kv_b_proj copies to overflow the L2). T=1 and 2 with the
    default launch shapes, then at T=1 a sweep of the launch-shape knobs (TILE, MIN_PROGRAMS, num_warps) and the
    default with PDL off (with PDL the cycled launches overlap one another's weight prefetch)."""
    from highspeed.ops.triton import mla_proj as t_mla

    R = 64   # qk_rope_head_dim of all three: only a stride here
    shapes = [("glm-flash", 20, 192, 512, 256), ("dsv3", 128, 128, 512, 128), ("glm-5", 64, 192, 512, 256)]
    knobs = [(tile, mp, nw) for tile in (2048, 4096, 8192) for mp in (264, 512, 1024) for nw in (4, 8)]
    saved = t_mla.TILE, t_mla.MIN_PROGRAMS, t_mla.NUM_WARPS

    def set_knobs(tile: int, mp: int, nw: int) -> None:
        t_mla.TILE, t_mla.MIN_PROGRAMS, t_mla.NUM_WARPS = tile, mp, nw

    def bmm_absorb_q(x: torch.Tensor, w: torch.Tensor, o: torch.Tensor) -> None:   # the model's former calls
        torch.bmm(x.transpose(0, 1), w, out=o.transpose(0, 1))

    def bmm_latent_to_v(x: torch.Tensor, w: torch.Tensor, o: torch.Tensor) -> None:
        torch.bmm(x.transpose(0, 1), w.transpose(1, 2), out=o.transpose(0, 1))

    try:
        for name, H, D, L, V in shapes:
            if r.time_left() < 30:
                return
            copies = max(1, min(64, -(-160 * 2**20 // (H * D * L * 2))))
            w_kvs = [torch.randn(H, D + V, L, device=DEV, dtype=BF16) * L**-0.5 for _ in range(copies)]
            w_uks, w_uvs = [w[:, :D] for w in w_kvs], [w[:, D:] for w in w_kvs]
            for T in (1, 2):
                q_nope = torch.randn(T, H * (D + R), device=DEV, dtype=BF16).view(T, H, -1)[..., :D]
                q_abs = torch.empty(T, H, L + R, device=DEV, dtype=BF16)
                latent = torch.randn(T, H, L, device=DEV, dtype=BF16)
                out = torch.empty(T, H, V, device=DEV, dtype=BF16)
                products = {   # op: (kernel, cuBLAS, activation, weights, out view, fp32 reference, bytes)
                    "absorb_q": (t_mla.absorb_q, bmm_absorb_q, q_nope, w_uks, q_abs[..., :L],
                                 torch.einsum("thd,hdl->thl", q_nope.float(), w_uks[0].float()),
                                 H * D * L * 2 + T * H * (D + L) * 2),
                    "latent_to_v": (t_mla.latent_to_v, bmm_latent_to_v, latent, w_uvs, out,
                                    torch.einsum("thl,hvl->thv", latent.float(), w_uvs[0].float()),
                                    H * V * L * 2 + T * H * (L + V) * 2),
                }
                for op, (fn, bmm, x, ws, o, ref, nbytes) in products.items():

                    def add(kernel: str, label: str, f: Callable) -> None:
                        f(x, ws[0], o)
                        err = rel_err(o, ref)
                        ms = bench_graph(lambda: [f(x, w, o) for w in ws])
                        r.add(kernel=kernel, case=f"{name} H={H} D={D} L={L} V={V} T={T} {label}".strip(),
                              rel_err=err, graph_ms=ms / copies if ms else None, bytes=nbytes, T=T)

                    add(f"mla_{op}_cublas_cold", "", bmm)
                    set_knobs(*saved)
                    cfg = t_mla.absorb_config(H, D, L) if op == "absorb_q" else t_mla.latent_to_v_config(H, V, L)
                    add(f"mla_{op}_cold", f"default {cfg} warps={saved[2]}", fn)
                    if T != 1:
                        continue
                    old_pdl = os.environ.get("HIGHSPEED_PDL")
                    os.environ["HIGHSPEED_PDL"] = "0"
                    try:
                        add(f"mla_{op}_cold", f"default {cfg} warps={saved[2]} pdl=off", fn)
                    finally:
                        if old_pdl is None:
                            del os.environ["HIGHSPEED_PDL"]
                        else:
                            os.environ["HIGHSPEED_PDL"] = old_pdl
                    seen = {(cfg, saved[2])}
                    for tile, mp, nw in knobs:
                        set_knobs(tile, mp, nw)
                        cfg = t_mla.absorb_config(H, D, L) if op == "absorb_q" else t_mla.latent_to_v_config(H, V, L)
                        if (cfg, nw) not in seen:   # knob settings that give the same launch are timed once
                            seen.add((cfg, nw))
                            add(f"mla_{op}_cold", f"{cfg} warps={nw} (TILE={tile} MIN_PROGRAMS={mp})", fn)
                    set_knobs(*saved)
            del w_kvs, w_uks, w_uvs
            torch.cuda.empty_cache()
    finally:
        set_knobs(*saved)


SECTIONS = {"moe_select": bench_select_experts, "fused_moe": bench_fused_moe, "linear": bench_linear,
            "moe": bench_moe, "attention": bench_attention, "norm": bench_norm, "rope": bench_rope,
            "sampling": bench_sampling, "dsa": bench_dsa, "mla_proj": bench_mla_proj}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="JSON record to write")
    ap.add_argument("--budget", type=float, default=300.0, help="seconds; sections stop starting past it")
    ap.add_argument("--only", default="", help="comma-separated sections: " + ",".join(SECTIONS))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py needs a CUDA device")
    r = Runner(args.out, args.budget)
    commit = os.environ.get("HIGHSPEED_COMMIT")   # the GPU image has no git: the caller names the commit
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                    cwd=Path(__file__).parent).stdout.strip() or None
        except OSError:
            commit = None
    r.record.update(card=torch.cuda.get_device_name(), date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    commit=commit, command="python " + " ".join(sys.argv), torch=torch.__version__,
                    triton=triton.__version__, sms=torch.cuda.get_device_properties(0).multi_processor_count)
    torch.manual_seed(0)
    measure_copy_bw(r)
    r.save()
    only = [s for s in args.only.split(",") if s] or list(SECTIONS)
    for name in only:
        if r.time_left() < 20:
            print(f"skipping {name}: out of budget")
            r.record.setdefault("skipped", []).append(name)
            continue
        try:
            with torch.no_grad():
                SECTIONS[name](r)
        except Exception:  # one broken section must not cost the others their numbers
            tb = traceback.format_exc()
            print(tb)
            r.record.setdefault("errors", {})[name] = tb
        r.save()
    print("\n=== summary ===")
    for row in r.rows:
        print(fmt_row(row))
    bad = [row for row in r.rows if row.get("rel_err") is not None and not row["rel_err"] < 2e-2]
    bad += [row for row in r.rows if row.get("ids_equal") is False]
    print(f"{len(r.rows)} rows, {len(bad)} failing correctness, {round(time.time() - r.t0)} s")


if __name__ == "__main__":
    main()
