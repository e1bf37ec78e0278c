"""Triton paged attention (GQA, absorbed MLA with DSA top-k) and write_kv against highspeed.ops.attention."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from highspeed.context import AttentionContext
from highspeed.ops.attention import mla_attention as ref_mla_attention
from highspeed.ops.attention import paged_attention as ref_paged_attention
from highspeed.ops.attention import write_kv as ref_write_kv
from tests.ops.conftest import DEVICE, HAS_CUDA, TOL, rel_err


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(2024)


def make_ctx(query_lens: list[int], seq_lens: list[int], block_size: int, num_blocks: int,
             num_kv_splits: int | None = None) -> AttentionContext:
    """A cached context whose sequences own randomly scattered blocks (catches block-table indexing bugs)."""
    need = [(s + block_size - 1) // block_size for s in seq_lens]
    assert sum(need) <= num_blocks
    perm = torch.randperm(num_blocks)
    tables = torch.zeros(len(seq_lens), max(need) + 1, dtype=torch.int32)  # +1: padding column, as the runner pads
    used = 0
    for i, n in enumerate(need):
        tables[i, :n] = perm[used:used + n].int()
        used += n
    qsl = [0]
    for q in query_lens:
        qsl.append(qsl[-1] + q)
    ctx = AttentionContext(
        query_lens=list(query_lens), seq_lens=list(seq_lens),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=DEVICE),
        seq_lens_t=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        slot_mapping=torch.zeros(sum(query_lens), dtype=torch.int64, device=DEVICE),
        block_tables=tables.to(DEVICE), block_size=block_size,
        max_query_len=max(query_lens), max_seq_len=max(seq_lens), decode_only=all(q == 1 for q in query_lens),
    )
    if num_kv_splits is not None:
        ctx.extra["num_kv_splits"] = num_kv_splits
    return ctx


GQA_CASES = [
    # query_lens, seq_lens, Hq, Hkv, D, Dv, block_size, splits
    ([1, 1, 1], [5, 17, 40], 4, 2, 16, 16, 4, None),
    ([3, 1, 7], [3, 20, 30], 6, 2, 24, 24, 16, None),        # group of 3, odd head size, mixed prefill/decode
    ([1], [130], 12, 1, 32, 40, 16, 3),                      # forced split-KV, Dv != D
    ([1, 1], [70, 9], 8, 8, 16, 16, 8, 5),                   # MHA, more splits than the short sequence needs
    ([9], [9], 4, 1, 16, 16, 4, None),                       # whole prompt, no cached prefix
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qlens,slens,Hq,Hkv,D,Dv,bs,splits", GQA_CASES)
def test_paged_attention(triton_module, reference, qlens, slens, Hq, Hkv, D, Dv, bs, splits, dtype):
    attn = triton_module("attention")
    ctx = make_ctx(qlens, slens, bs, 40, splits)
    q = torch.randn(sum(qlens), Hq, D, device=DEVICE).to(dtype)
    k_cache = torch.randn(40, bs, Hkv, D, device=DEVICE).to(dtype)
    v_cache = torch.randn(40, bs, Hkv, Dv, device=DEVICE).to(dtype)
    out = attn.paged_attention(q, k_cache, v_cache, ctx, D**-0.5)
    ref = reference(ref_paged_attention, q, k_cache, v_cache, ctx, D**-0.5)
    assert out.shape == ref.shape and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype], rel_err(out, ref)


def _topk_indices(qlens: list[int], slens: list[int], k: int) -> torch.Tensor:
    """Random causal selections per query, -1 padded (some queries see fewer than k positions)."""
    rows = []
    for ql, sl in zip(qlens, slens):
        for j in range(ql):
            p = sl - ql + j
            n = min(k - 2, p + 1)
            row = torch.full((k,), -1, dtype=torch.int32)
            row[:n] = torch.randperm(p + 1)[:n].int()
            rows.append(row[torch.randperm(k)])  # -1 slots anywhere, not only at the end
    return torch.stack(rows).to(DEVICE)


MLA_CASES = [
    # query_lens, seq_lens, H, L, R, block_size, topk, splits
    ([1, 1], [9, 33], 3, 32, 16, 8, None, None),
    ([4, 1], [10, 40], 20, 32, 16, 16, None, 2),             # more heads than one program holds
    ([2, 1], [30, 50], 5, 64, 16, 16, 12, None),             # DSA top-k
    ([1, 1], [30, 70], 5, 64, 16, 16, 12, 2),                # DSA top-k with split-KV
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qlens,slens,H,L,R,bs,topk,splits", MLA_CASES)
def test_mla_attention(triton_module, reference, qlens, slens, H, L, R, bs, topk, splits, dtype):
    attn = triton_module("attention")
    ctx = make_ctx(qlens, slens, bs, 40, splits)
    q = torch.randn(sum(qlens), H, L + R, device=DEVICE).to(dtype)
    cache = torch.randn(40, bs, L + R, device=DEVICE).to(dtype)
    ti = _topk_indices(qlens, slens, topk) if topk else None
    scale = (L + R) ** -0.5
    out = attn.mla_attention(q, cache, ctx, scale, L, ti)
    ref = reference(ref_mla_attention, q, cache, ctx, scale, L, ti)
    assert out.shape == (sum(qlens), H, L) and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype], rel_err(out, ref)


# ---- Batch-1..few decode with short contexts: many splits, grids sized for a longer max_seq_len (CUDA graphs) ----

class _NoHostLengths(list):
    """Host lengths as inside a CUDA graph: reading them is a bug (the kernel must use the device tensors)."""

    def _fail(self, *a: object, **k: object) -> None:
        raise AssertionError("host-side lengths read while planning a graph-safe launch")

    __iter__ = __getitem__ = __len__ = _fail  # type: ignore[assignment]


def _graph_ctx(ctx: AttentionContext, max_seq_len: int) -> AttentionContext:
    return dataclasses.replace(ctx, query_lens=_NoHostLengths(), seq_lens=_NoHostLengths(), max_query_len=1,
                               max_seq_len=max_seq_len, extra={"cuda_graph": True})


@pytest.fixture
def h200_grid(triton_module, monkeypatch):
    """Split as on an H200 (132 SMs x 4 programs) although the interpreter reports 4 SMs."""
    attn = triton_module("attention")
    monkeypatch.setattr(attn, "SPLIT_PROGRAMS_PER_SM", 132)
    return attn


SHORT_GQA_CASES = [
    # seq_lens (one query each), max_seq_len of the grid, Hq, Hkv, D, block_size, merge
    ([37], 384, 8, 2, 32, 16, "fused"),            # splits past the end, length not a multiple of any tile
    ([1, 50, 200], 256, 8, 2, 32, 16, "separate"),  # a padded graph row (length 1) beside longer ones
    ([16, 64], 64, 4, 1, 16, 8, "fused"),          # lengths exactly a tile; max_seq_len = the real maximum
    ([129], 4096, 6, 2, 16, 16, "separate"),       # 64 splits, all but a few inactive
]


def _merge_mode(attn, monkeypatch, merge: str) -> int:
    """Force the fused merge (any size) or the separate _combine_kernel; returns the calls to make (the second
    call of a fused merge finds the arrival counters that the first one reset)."""
    monkeypatch.setattr(attn, "FUSED_MERGE_MAX_ELEMS", 1 << 20 if merge == "fused" else 0)
    if merge == "fused":
        monkeypatch.setattr(attn, "_combine_kernel", None)   # a separate merge launch would fail
    return 2 if merge == "fused" else 1


@pytest.mark.parametrize("slens,max_len,Hq,Hkv,D,bs,merge", SHORT_GQA_CASES)
def test_paged_attention_short_decode(h200_grid, reference, monkeypatch, slens, max_len, Hq, Hkv, D, bs, merge):
    attn = h200_grid
    calls = _merge_mode(attn, monkeypatch, merge)
    nb = sum((s + bs - 1) // bs for s in slens) + 2
    ctx = make_ctx([1] * len(slens), slens, bs, nb)
    q = torch.randn(len(slens), Hq, D, device=DEVICE)
    k_cache = torch.randn(nb, bs, Hkv, D, device=DEVICE)
    v_cache = torch.randn(nb, bs, Hkv, D, device=DEVICE)
    ref = reference(ref_paged_attention, q, k_cache, v_cache, ctx, D**-0.5)
    gctx = _graph_ctx(ctx, max_len)
    for _ in range(calls):
        out = attn.paged_attention(q, k_cache, v_cache, gctx, D**-0.5)
        assert rel_err(out, ref) < TOL[torch.float32], rel_err(out, ref)
    for buf in attn._counters.values():
        assert int(buf.abs().sum()) == 0


SHORT_MLA_CASES = [
    # seq_lens, max_seq_len, H, L, R, block_size, topk, merge
    ([40], 200, 20, 512, 64, 16, None, "separate"),   # GLM-4.7-Flash: 20 heads in one program, 512 + 64 latent
    ([1, 23], 128, 20, 512, 64, 16, None, "fused"),
    ([30, 70], 96, 20, 32, 16, 16, None, "fused"),    # narrow latent: two head blocks (16 + 4 heads)
    ([30, 70], 128, 5, 64, 16, 16, 24, "fused"),      # DSA top-k: every split active, some slots empty
]


@pytest.mark.parametrize("slens,max_len,H,L,R,bs,topk,merge", SHORT_MLA_CASES)
def test_mla_attention_short_decode(h200_grid, reference, monkeypatch, slens, max_len, H, L, R, bs, topk, merge):
    attn = h200_grid
    calls = _merge_mode(attn, monkeypatch, merge)
    nb = sum((s + bs - 1) // bs for s in slens) + 2
    ctx = make_ctx([1] * len(slens), slens, bs, nb)
    q = torch.randn(len(slens), H, L + R, device=DEVICE)
    cache = torch.randn(nb, bs, L + R, device=DEVICE)
    ti = _topk_indices([1] * len(slens), slens, topk) if topk else None
    scale = (L + R) ** -0.5
    ref = reference(ref_mla_attention, q, cache, ctx, scale, L, ti)
    gctx = _graph_ctx(ctx, max_len)
    for _ in range(calls):
        out = attn.mla_attention(q, cache, gctx, scale, L, ti)
        assert rel_err(out, ref) < TOL[torch.float32], rel_err(out, ref)
    for buf in attn._counters.values():
        assert int(buf.abs().sum()) == 0


def test_combine_slices(triton_module):
    """The merge's Dv slice: the shapes run 48 measured (Qwen3-30B-A3B batch 1: 32 heads x 128 -> 32-wide;
    GLM-4.7-Flash: 20 x 512 -> 64-wide), and wide grids keep 128 (batch 8 of Qwen3: 256 rows)."""
    attn = triton_module("attention")
    assert attn.combine_block_dv(32, 128) == 32
    assert attn.combine_block_dv(20, 512) == 64
    assert attn.combine_block_dv(256, 128) == 128 and attn.combine_block_dv(64, 512) == 128
    assert attn.combine_block_dv(1, 16) == 16   # never wider than Dv, never split below 32


def test_split_plan(triton_module):
    """Decode at small grids splits down to one tile per program; prefill and long contexts keep the old rule
    (>= 4 tiles per split, at most 64 splits, about 4 programs per SM)."""
    attn = triton_module("attention")

    def old_rule(max_keys: int, block_n: int, base: int) -> tuple[int, int]:
        n_tiles = max(1, -(-max_keys // block_n))
        splits = max(1, min(-(-4 * 132 // base), n_tiles // 4, 64))
        per = -(-n_tiles // splits)
        return -(-n_tiles // per), per

    for max_keys in (1, 17, 100, 384, 1000, 4096, 32768):
        for base in (1, 4, 8, 32, 100, 256, 600):
            splits, bn, per = attn._split_plan(max_keys, 64, base, False, 16 * 128, 132)
            assert (splits, per) == old_rule(max_keys, 64, base) and bn == 64
            splits, bn, per = attn._split_plan(max_keys, 64, base, True, 16 * 128, 132)
            assert 16 <= bn <= 64 and splits * per * bn >= max_keys and splits <= 64
            if max_keys >= 4 * 64 * min(-(-528 // base), 64):   # long context: unchanged
                assert (splits, per, bn) == (*old_rule(max_keys, 64, base), 64)
    # Qwen3-30B-A3B at batch 1 in a graph for 384 tokens: 12 one-tile splits of 32 keys per KV head.
    assert attn._split_plan(384, 64, 4, True, 8 * 128, 132, min_block_n=32) == (12, 32, 1)
    assert attn._split_plan(128, 64, 4, True, 8 * 128, 132, min_block_n=32) == (4, 32, 1)
    assert attn._split_plan(128, 64, 4, True, 8 * 128, 132) == (8, 16, 1)
    # GLM-4.7-Flash (20 heads x 512 in one program): 16-key tiles, one per program.
    assert attn._split_plan(384, 32, 1, True, 32 * 512, 132) == (24, 16, 1)


def test_mla_config_choice(triton_module):
    """Batch-1 MLA decode over short contexts takes 16-head blocks with 32-key tiles when there are more than 16
    heads (GLM-4.7-Flash, GLM-5); long contexts, 16 heads (DeepSeek-V2-Lite) and many sequences keep their shapes."""
    attn = triton_module("attention")

    def cfg(seqs: int, max_len: int, heads: int, rank: int = 512) -> dict:
        ctx = make_ctx([1] * seqs, [max_len] * seqs, 16, seqs * (max_len // 16 + 1))
        ctx.max_seq_len = max_len
        return attn._mla_config(rank, ctx, heads)

    assert cfg(1, 384, 20) is attn.MLA_SHORT_FEW_SEQS and attn.MLA_SHORT_FEW_SEQS["heads"] == 16
    assert cfg(1, 384, 64) is attn.MLA_SHORT_FEW_SEQS
    assert cfg(1, attn.MLA_SHORT_MAX_KEYS + 1, 20) is attn.MLA_WIDE_FEW_SEQS
    assert cfg(1, 384, 16) is attn.MLA_WIDE_FEW_SEQS
    assert cfg(8, 384, 20) is attn.MLA_WIDE
    assert cfg(1, 384, 20, rank=128) is attn.MLA_NARROW
    # The short shape keeps the program count of the wide one: half the splits, twice the head blocks.
    assert attn._split_plan(384, 32, 2, True, 16 * 512, 132, min_block_n=32) == (12, 32, 1)
    assert attn._split_plan(384, 32, 1, True, 32 * 512, 132) == (24, 16, 1)


def test_gqa_config_choice(triton_module):
    """Decode of few sequences takes GQA_DECODE_FEW_SEQS (8 warps); prefill, many sequences and the 32-key tiles
    of wide heads keep the GQA shape."""
    attn = triton_module("attention")

    def cfg(q_lens: list[int], D: int = 128) -> dict:
        ctx = make_ctx(q_lens, [384] * len(q_lens), 16, len(q_lens) * 30)
        return attn._gqa_config(D, D, ctx)

    few = {**attn.GQA, **attn.GQA_DECODE_FEW_SEQS}
    assert cfg([1]) == few and few["num_warps"] == 8 != attn.GQA["num_warps"]
    assert cfg([1] * 8) == attn.GQA and cfg([5]) == attn.GQA
    assert cfg([1], D=256) == {**few, "block_n": 32} and cfg([1] * 8, D=256) == dict(attn.GQA, block_n=32)


def test_partial_dtype(triton_module, monkeypatch):
    """Split partials: 16-bit for 16-bit MLA queries by default, fp32 for GQA and for every fp32 query."""
    attn = triton_module("attention")
    bf16, f32 = torch.bfloat16, torch.float32
    assert attn._partial_dtype(bf16, True) == bf16 and attn._partial_dtype(torch.float16, True) == torch.float16
    assert attn._partial_dtype(bf16, False) == f32 and attn._partial_dtype(f32, True) == f32
    monkeypatch.setattr(attn, "_PARTIALS_ENV", "16")
    assert attn._partial_dtype(bf16, False) == bf16 and attn._partial_dtype(f32, False) == f32
    monkeypatch.setattr(attn, "_PARTIALS_ENV", "32")
    assert attn._partial_dtype(bf16, True) == f32


def test_combine_late_trigger_default(triton_module):
    """By default only MLA's merge (V is the latent K) lets its dependent launch after the wait (H200 run 25)."""
    attn = triton_module("attention")
    assert attn.combine_late_trigger(True) and not attn.combine_late_trigger(False)


@pytest.mark.parametrize("shape", [(2, 3), (4, 5, 7), (1, 576)])
def test_write_kv(triton_module, reference, shape):
    attn = triton_module("attention")
    nb, bs = 6, 4
    cache = torch.randn(nb, bs, *shape, device=DEVICE)
    ref_cache = cache.clone()
    slots = torch.tensor([3, -1, 17, 0, 23], device=DEVICE)
    values = torch.randn(5, *shape, device=DEVICE)
    attn.write_kv(cache, slots, values)
    reference(ref_write_kv, ref_cache, slots, values)
    assert torch.equal(cache, ref_cache)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_model_sized_decode(triton_module, reference):
    """GLM-4.5 GQA (96/8 heads, 128 dims) and GLM-5 MLA (64 heads, 512+64) decode at long context."""
    attn = triton_module("attention")
    ctx = make_ctx([1] * 4, [3000, 17, 1025, 4096], 64, 200)
    q = torch.randn(4, 96, 128, device=DEVICE, dtype=torch.bfloat16)
    kc = torch.randn(200, 64, 8, 128, device=DEVICE, dtype=torch.bfloat16)
    vc = torch.randn(200, 64, 8, 128, device=DEVICE, dtype=torch.bfloat16)
    ref = reference(ref_paged_attention, q, kc, vc, ctx, 128**-0.5)
    assert rel_err(attn.paged_attention(q, kc, vc, ctx, 128**-0.5), ref) < TOL[torch.bfloat16]
    qm = torch.randn(4, 64, 576, device=DEVICE, dtype=torch.bfloat16)
    lc = torch.randn(200, 64, 576, device=DEVICE, dtype=torch.bfloat16)
    ref_m = reference(ref_mla_attention, qm, lc, ctx, 192**-0.5, 512)
    assert rel_err(attn.mla_attention(qm, lc, ctx, 192**-0.5, 512), ref_m) < TOL[torch.bfloat16]
    ctx = make_ctx([37, 1], [100, 50], 64, 200)  # MLA prefill path (several tokens per program)
    qm = torch.randn(38, 64, 576, device=DEVICE, dtype=torch.bfloat16)
    ref_m = reference(ref_mla_attention, qm, lc, ctx, 192**-0.5, 512)
    assert rel_err(attn.mla_attention(qm, lc, ctx, 192**-0.5, 512), ref_m) < TOL[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_short_decode_cuda_graph_replays(triton_module, reference):
    """Qwen3-30B-A3B GQA (32/4 x 128) and GLM-4.7-Flash MLA (20 x 512+64) at batch 1 in graphs captured for 384
    tokens, replayed while the device-side length grows: splits turn active one by one, and the fused merge's
    counters must be back at zero after every replay."""
    attn = triton_module("attention")
    bs = 16
    ctx = make_ctx([1], [120], bs, 30)
    qg = torch.randn(1, 32, 128, device=DEVICE, dtype=torch.bfloat16)
    kc = torch.randn(30, bs, 4, 128, device=DEVICE, dtype=torch.bfloat16)
    vc = torch.randn(30, bs, 4, 128, device=DEVICE, dtype=torch.bfloat16)
    qm = torch.randn(1, 20, 576, device=DEVICE, dtype=torch.bfloat16)
    lc = torch.randn(30, bs, 576, device=DEVICE, dtype=torch.bfloat16)
    gctx = _graph_ctx(ctx, 384)
    # Whole blocks for every length below: the block table must cover 384 tokens.
    gctx.block_tables = torch.randperm(30, device=DEVICE)[:24].int()[None, :].contiguous()
    ctx.block_tables = gctx.block_tables
    fns = [lambda: attn.paged_attention(qg, kc, vc, gctx, 128**-0.5),
           lambda: attn.mla_attention(qm, lc, gctx, 192**-0.5, 512)]
    refs = [lambda: reference(ref_paged_attention, qg, kc, vc, ctx, 128**-0.5),
            lambda: reference(ref_mla_attention, qm, lc, ctx, 192**-0.5, 512)]
    for fn, ref_fn in zip(fns, refs):
        fn()   # eager warm-up: compiles, allocates the counters
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = fn()
        for n in [120, 121, 128, 129, 200, 255, 256, 257, 383, 384, 1, 17]:
            ctx.seq_lens = [n]
            gctx.seq_lens_t.fill_(n)
            for _ in range(3):
                g.replay()
                torch.cuda.synchronize()
                assert rel_err(out, ref_fn()) < TOL[torch.bfloat16], (n, rel_err(out, ref_fn()))
                for buf in attn._counters.values():   # the fused merge's, where some launch used it
                    assert int(buf.abs().sum()) == 0


ROPE_ATTN_CASES = [
    # seq_lens (decode: one new token each), Hq, Hkv, D, rotary_dim, interleaved, qk_norm, block_size, splits
    ([5, 17, 40], 4, 2, 16, 16, False, True, 4, None),     # Qwen3-like: full NeoX rotary, QK-norm
    ([1, 33], 6, 2, 24, 12, False, False, 8, 3),           # partial rotary (GLM-4.5), odd head size, a 1-token seq
    ([70], 8, 8, 16, 8, True, True, 8, 5),                 # interleaved, MHA, forced splits
    ([9, 2], 4, 1, 32, 32, False, True, 16, None),         # MQA
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("slens,Hq,Hkv,D,rot,inter,qk_norm,bs,splits", ROPE_ATTN_CASES)
def test_rope_paged_attention_decode(triton_module, reference, slens, Hq, Hkv, D, rot, inter, qk_norm, bs, splits,
                                     dtype):
    """The fused decode kernel (QK-norm + RoPE of q in each program, the new k/v built in registers and written to
    the cache) against the reference composition rope_and_write_kv -> paged_attention."""
    from highspeed.ops.attention import rope_paged_attention as ref_rope_paged_attention
    from highspeed.ops.rope import build_cos_sin_cache

    attn = triton_module("attention")
    qlens = [1] * len(slens)
    ctx = make_ctx(qlens, slens, bs, 40, splits)
    T = len(slens)
    # The new token of sequence i sits at position slens[i] - 1, in its own block table's slot.
    tables = ctx.block_tables.cpu()
    slots = [int(tables[i, (s - 1) // bs]) * bs + (s - 1) % bs for i, s in enumerate(slens)]
    ctx.slot_mapping = torch.tensor(slots, dtype=torch.int64, device=DEVICE)
    positions = torch.tensor([s - 1 for s in slens], dtype=torch.int64, device=DEVICE)
    cos_sin = build_cos_sin_cache(rot, 128, 10000.0, device=DEVICE)
    # q/k/v as strided views of one projection output, as the model passes them.
    qkv = torch.randn(T, (Hq + 2 * Hkv) * D, device=DEVICE).to(dtype)
    q, k, v = qkv.split([Hq * D, Hkv * D, Hkv * D], dim=-1)
    q, k, v = q.view(T, Hq, D), k.view(T, Hkv, D), v.view(T, Hkv, D)
    qw = (torch.rand(D, device=DEVICE) + 0.5).to(dtype) if qk_norm else None
    kw = (torch.rand(D, device=DEVICE) + 0.5).to(dtype) if qk_norm else None
    k_cache = torch.randn(40, bs, Hkv, D, device=DEVICE).to(dtype)
    v_cache = torch.randn(40, bs, Hkv, D, device=DEVICE).to(dtype)
    kc_ref, vc_ref = k_cache.clone(), v_cache.clone()
    args = (positions, cos_sin, rot, inter)
    out = attn.rope_paged_attention(q, k, v, *args, k_cache, v_cache, ctx, D**-0.5, qw, kw, 1e-6)
    ref = reference(ref_rope_paged_attention, q, k, v, *args, kc_ref, vc_ref, ctx, D**-0.5, qw, kw, 1e-6)
    assert out.shape == ref.shape and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype], rel_err(out, ref)
    # The caches hold the same new rows (and nothing else changed).
    assert rel_err(k_cache, kc_ref) < TOL[dtype] and rel_err(v_cache, vc_ref) < TOL[dtype]
    flat = k_cache.view(-1, Hkv, D)[ctx.slot_mapping]
    assert rel_err(flat, kc_ref.view(-1, Hkv, D)[ctx.slot_mapping]) < TOL[dtype]
    # The new token matters: attention without it (a stale cache row) differs.
    k_stale, v_stale = torch.randn_like(k_cache), v_cache.clone()
    stale = reference(ref_paged_attention, out.new_zeros(out.shape[0], Hq, D) + 1, k_stale, v_stale, ctx, 1.0)
    assert rel_err(stale, ref) > 10 * TOL[dtype]


def test_rope_paged_attention_prefill_falls_back(triton_module, reference):
    """A batch with a multi-token sequence runs the RoPE kernel, then paged attention: same result."""
    from highspeed.ops.attention import rope_paged_attention as ref_rope_paged_attention
    from highspeed.ops.rope import build_cos_sin_cache

    attn = triton_module("attention")
    qlens, slens, Hq, Hkv, D, bs = [3, 1], [3, 20], 4, 2, 16, 8
    ctx = make_ctx(qlens, slens, bs, 40)
    tables = ctx.block_tables.cpu()
    pos = [p for ql, sl in zip(qlens, slens) for p in range(sl - ql, sl)]
    seq_of = [i for i, ql in enumerate(qlens) for _ in range(ql)]
    ctx.slot_mapping = torch.tensor([int(tables[i, p // bs]) * bs + p % bs for i, p in zip(seq_of, pos)],
                                    dtype=torch.int64, device=DEVICE)
    positions = torch.tensor(pos, dtype=torch.int64, device=DEVICE)
    cos_sin = build_cos_sin_cache(D, 64, 10000.0, device=DEVICE)
    T = sum(qlens)
    q, k, v = torch.randn(T, Hq, D, device=DEVICE), torch.randn(T, Hkv, D, device=DEVICE), torch.randn(
        T, Hkv, D, device=DEVICE)
    k_cache, v_cache = torch.randn(2, 40, bs, Hkv, D, device=DEVICE)
    kc_ref, vc_ref = k_cache.clone(), v_cache.clone()
    out = attn.rope_paged_attention(q, k, v, positions, cos_sin, D, False, k_cache, v_cache, ctx, D**-0.5)
    ref = reference(ref_rope_paged_attention, q, k, v, positions, cos_sin, D, False, kc_ref, vc_ref, ctx, D**-0.5)
    assert rel_err(out, ref) < TOL[torch.float32] and rel_err(k_cache, kc_ref) < TOL[torch.float32]


# ---- The DECODE path (one query per sequence: loads issued up front, K and V together) ----
# Every case runs with DECODE_FAST on and off: both must match the reference, and each other exactly under the
# interpreter (same arithmetic in the same order). The caches hold NaN wherever a kernel must not read: the slots
# past each sequence's end in its last block, and a poison block that every table entry past the sequence's own
# blocks points to. A key past the end that slipped through a mask turns the output into NaN.

class _LaunchSpy:
    """Stands in for _paged_attn_kernel and records each launch's DECODE flag (which path ran)."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.decode: list[bool] = []

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def call(*args, **kwargs):
            self.decode.append(bool(kwargs["DECODE"]))
            return launch(*args, **kwargs)

        return call


@pytest.fixture
def decode_attn(triton_module, monkeypatch):
    """The attention module with 16-key tiles (so that small contexts have several tiles and splits) and a spy on
    the attention launches."""
    attn = triton_module("attention")
    monkeypatch.setattr(attn, "GQA", dict(attn.GQA, block_n=16, decode_min_block_n=16))
    monkeypatch.setattr(attn, "MLA_NARROW", dict(attn.MLA_NARROW, block_n=16))
    spy = _LaunchSpy(attn._paged_attn_kernel)
    monkeypatch.setattr(attn, "_paged_attn_kernel", spy)
    return attn, spy


def _poisoned_decode_ctx(slens: list[int], bs: int, max_len: int, splits: int,
                         *per_token: tuple[int, ...]) -> tuple[AttentionContext, AttentionContext, list[torch.Tensor]]:
    """(host context for the reference, graph-style context for the kernel, caches of shape [nb, bs, *shape] for
    each per-token shape), NaN-poisoned as described above. The kernel's context has no host lengths and a grid
    sized for ``max_len`` keys in ``splits`` splits."""
    need = [(s + bs - 1) // bs for s in slens]
    nb = sum(need) + 1
    poison = nb - 1
    ctx = make_ctx([1] * len(slens), slens, bs, nb - 1)
    tables = ctx.block_tables.cpu()
    caches = [torch.randn(nb, bs, *shape, device=DEVICE) for shape in per_token]
    for i, (s, n) in enumerate(zip(slens, need)):
        tables[i, n:] = poison
        for c in caches:
            c[int(tables[i, n - 1]), s - (n - 1) * bs:] = float("nan")
    for c in caches:
        c[poison] = float("nan")
    ctx.block_tables = tables.to(DEVICE)
    gctx = dataclasses.replace(ctx, query_lens=_NoHostLengths(), seq_lens=_NoHostLengths(), max_query_len=1,
                               max_seq_len=max_len, extra={"num_kv_splits": splits})
    return ctx, gctx, caches


DECODE_CASES = [
    # seq_lens (one query each), max_seq_len of the grid, forced splits; 16-key tiles, 8-token blocks.
    # 3 splits of 2 tiles (32 keys): length 1 (splits 1-2 past its end), 32 (exactly one split: split 1 starts at
    # its end), 45 (a partial second tile), 17, 96 (every split full).
    ([1, 32, 45, 17, 96], 96, 3),
    # A grid planned for fewer keys than a sequence has: the last split takes the rest (3 tiles, the last beyond
    # the plan).
    ([70, 5], 48, 2),
    # 8 one-tile splits over 128 keys; the block tables cover only 72, so the first table entries of splits 5-7
    # lie past the table's width (masked by the width alone).
    ([33, 64, 2], 128, 8),
]


@pytest.mark.parametrize("slens,max_len,splits", DECODE_CASES)
def test_paged_attention_decode_path(decode_attn, reference, monkeypatch, slens, max_len, splits):
    attn, spy = decode_attn
    Hq, Hkv, D, Dv, bs = 6, 2, 24, 40, 8     # group of 3, head sizes that are not powers of two
    ctx, gctx, (k_cache, v_cache) = _poisoned_decode_ctx(slens, bs, max_len, splits, (Hkv, D), (Hkv, Dv))
    q = torch.randn(len(slens), Hq, D, device=DEVICE)
    ref = reference(ref_paged_attention, q, k_cache, v_cache, ctx, D**-0.5)
    assert torch.isfinite(ref).all()
    outs = []
    for fast in (True, False):
        monkeypatch.setattr(attn, "DECODE_FAST", fast)
        outs.append(attn.paged_attention(q, k_cache, v_cache, gctx, D**-0.5))
        assert rel_err(outs[-1], ref) < TOL[torch.float32], (fast, rel_err(outs[-1], ref))
    assert spy.decode == [True, False]
    if not HAS_CUDA:
        assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("merge", ["separate", "fused"])
def test_paged_attention_decode_path_merge(decode_attn, reference, monkeypatch, merge):
    """The DECODE path under both merges (the fused one counts only the active splits)."""
    attn, spy = decode_attn
    calls = _merge_mode(attn, monkeypatch, merge)
    slens, Hq, Hkv, D, bs = [1, 32, 45], 4, 1, 16, 8
    ctx, gctx, (k_cache, v_cache) = _poisoned_decode_ctx(slens, bs, 96, 3, (Hkv, D), (Hkv, D))
    q = torch.randn(len(slens), Hq, D, device=DEVICE)
    ref = reference(ref_paged_attention, q, k_cache, v_cache, ctx, D**-0.5)
    for _ in range(calls):
        out = attn.paged_attention(q, k_cache, v_cache, gctx, D**-0.5)
        assert rel_err(out, ref) < TOL[torch.float32], rel_err(out, ref)
    assert spy.decode == [True] * calls
    for buf in attn._counters.values():
        assert int(buf.abs().sum()) == 0


ROPE_DECODE_CASES = [
    # seq_lens, max_seq_len, splits, rotary_dim, interleaved, qk_norm
    ([1, 32, 45, 17, 96], 96, 3, 24, False, True),
    ([33, 64, 2], 128, 8, 16, True, False),     # partial interleaved rotary, no norm
    ([70, 5], 48, 2, 16, False, True),          # the new token in a tile past the planned range
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("slens,max_len,splits,rot,inter,qk_norm", ROPE_DECODE_CASES)
def test_rope_paged_attention_decode_path(decode_attn, reference, monkeypatch, slens, max_len, splits, rot, inter,
                                          qk_norm, dtype):
    """ROPE_NEW through the DECODE path: q rotated at the first tile, the new key/value used in place of their
    cache row (poisoned here: the kernel must not read it) and written after the loop."""
    from highspeed.ops.attention import rope_paged_attention as ref_rope_paged_attention
    from highspeed.ops.rope import build_cos_sin_cache

    attn, spy = decode_attn
    Hq, Hkv, D, bs = 6, 2, 24, 8
    ctx, gctx, (k_cache, v_cache) = _poisoned_decode_ctx(slens, bs, max_len, splits, (Hkv, D), (Hkv, D))
    tables = ctx.block_tables.cpu()
    slots = [int(tables[i, (s - 1) // bs]) * bs + (s - 1) % bs for i, s in enumerate(slens)]
    ctx.slot_mapping = gctx.slot_mapping = torch.tensor(slots, dtype=torch.int64, device=DEVICE)
    for c in (k_cache, v_cache):
        c.view(-1, Hkv, D)[ctx.slot_mapping] = float("nan")   # the new rows: not in the cache yet
    k_cache, v_cache = k_cache.to(dtype), v_cache.to(dtype)
    positions = torch.tensor([s - 1 for s in slens], dtype=torch.int64, device=DEVICE)
    cos_sin = build_cos_sin_cache(rot, 256, 10000.0, device=DEVICE)
    T = len(slens)
    qkv = torch.randn(T, (Hq + 2 * Hkv) * D, device=DEVICE).to(dtype)
    q, k, v = qkv.split([Hq * D, Hkv * D, Hkv * D], dim=-1)
    q, k, v = q.view(T, Hq, D), k.view(T, Hkv, D), v.view(T, Hkv, D)
    qw = (torch.rand(D, device=DEVICE) + 0.5).to(dtype) if qk_norm else None
    kw = (torch.rand(D, device=DEVICE) + 0.5).to(dtype) if qk_norm else None
    args = (positions, cos_sin, rot, inter)
    kc_ref, vc_ref = k_cache.clone(), v_cache.clone()
    ref = reference(ref_rope_paged_attention, q, k, v, *args, kc_ref, vc_ref, ctx, D**-0.5, qw, kw, 1e-6)
    assert torch.isfinite(ref).all()
    outs = []
    for fast in (True, False):
        monkeypatch.setattr(attn, "DECODE_FAST", fast)
        kc, vc = k_cache.clone(), v_cache.clone()
        outs.append(attn.rope_paged_attention(q, k, v, *args, kc, vc, gctx, D**-0.5, qw, kw, 1e-6))
        assert rel_err(outs[-1], ref) < TOL[dtype], (fast, rel_err(outs[-1], ref))
        # The same new rows written, nothing else touched (the poison stays where it was).
        assert torch.equal(kc.isnan(), kc_ref.isnan()) and torch.equal(vc.isnan(), vc_ref.isnan())
        assert rel_err(kc.nan_to_num(), kc_ref.nan_to_num()) < TOL[dtype]
        assert rel_err(vc.nan_to_num(), vc_ref.nan_to_num()) < TOL[dtype]
    assert spy.decode == [True, False]
    if not HAS_CUDA:
        assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("slens,max_len,splits", DECODE_CASES[:2])
def test_mla_attention_decode_path(decode_attn, reference, monkeypatch, slens, max_len, splits):
    attn, spy = decode_attn
    H, L, R, bs = 5, 32, 16, 8
    ctx, gctx, (cache,) = _poisoned_decode_ctx(slens, bs, max_len, splits, (L + R,))
    q = torch.randn(len(slens), H, L + R, device=DEVICE)
    scale = (L + R) ** -0.5
    ref = reference(ref_mla_attention, q, cache, ctx, scale, L)
    assert torch.isfinite(ref).all()
    outs = []
    for fast in (True, False):
        monkeypatch.setattr(attn, "DECODE_FAST", fast)
        outs.append(attn.mla_attention(q, cache, gctx, scale, L))
        assert rel_err(outs[-1], ref) < TOL[torch.float32], (fast, rel_err(outs[-1], ref))
    assert spy.decode == [True, False]
    if not HAS_CUDA:
        assert torch.equal(outs[0], outs[1])


def test_decode_path_only_for_one_query_per_sequence(decode_attn, reference):
    """The host takes DECODE only when max_q == 1 and T == num_seqs (then query_start_loc is arange). Not for a
    batch with a sequence without a query (max_q == 1 but T < S: token i is not sequence i), nor for prefill or
    DSA top-k."""
    attn, spy = decode_attn
    ctx = make_ctx([1, 0, 1], [9, 4, 30], 8, 10)
    q = torch.randn(2, 4, 16, device=DEVICE)
    k_cache, v_cache = torch.randn(2, 10, 8, 2, 16, device=DEVICE)
    out = attn.paged_attention(q, k_cache, v_cache, ctx, 0.25)
    assert rel_err(out, reference(ref_paged_attention, q, k_cache, v_cache, ctx, 0.25)) < TOL[torch.float32]
    ctx = make_ctx([3, 1], [3, 20], 8, 10)
    attn.paged_attention(torch.randn(4, 4, 16, device=DEVICE), k_cache, v_cache, ctx, 0.25)
    ctx = make_ctx([1, 1], [30, 50], 16, 10)
    cache = torch.randn(10, 16, 48, device=DEVICE)
    qm = torch.randn(2, 5, 48, device=DEVICE)
    ti = _topk_indices([1, 1], [30, 50], 12)
    out = attn.mla_attention(qm, cache, ctx, 48**-0.5, 32, ti)
    assert rel_err(out, reference(ref_mla_attention, qm, cache, ctx, 48**-0.5, 32, ti)) < TOL[torch.float32]
    assert spy.decode == [False, False, False]
