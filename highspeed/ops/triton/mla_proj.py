"""GEMVs for the two per-head products of absorbed MLA at decode (a token or two), in place of ``torch.bmm``.

cuBLAS runs these batch-1 products at well under copy bandwidth (H200, GLM-4.7-Flash, H=20 D=192 L=512 V=256:
3.96 us for q @ W_UK's 3.9 MB, 3.53 us for latent @ W_UV^T's 5.2 MB; a copy would take about 1 us each). Both are
pure weight streams, so the kernels are built like ``linear.py``'s row GEMV: multiply-and-reduce in fp32 registers
(no tensor cores: one or two rows of activation), each program owning one head's tile of output columns over the
whole reduction (no split-K: deterministic, no second launch), the first weight tile loaded before the PDL wait
and the next one while the current is used; small tiles so that even 20 heads give hundreds of programs for the
132 SMs. Both tokens of a pair are done by the same program, so the weight is read once for T=2.

- ``absorb_q`` reduces over W_UK's *strided* dim D: a program holds a [BLOCK_D, BLOCK_L] tile (rows contiguous
  along L, coalesced) and sums down the rows.
- ``latent_to_v`` reduces over W_UV's contiguous dim L: a program holds BLOCK_V rows, as the row GEMV does.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from highspeed.ops.triton import gdc_launch_dependents, gdc_wait, next_power_of_2, pdl, tuned
from highspeed.ops.triton.rope import rope_context, rope_write_program, rope_and_write_kv, rope_write_launch

# More tokens: torch.bmm (cuBLAS), since each further token pair would re-read the weight. HIGHSPEED_MLA_PROJ_MAX_T=0
# turns the kernels off (an A/B switch).
MAX_T: int = int(os.environ.get("HIGHSPEED_MLA_PROJ_MAX_T", "2"))
# Launch-shape knobs: TILE = weight elements per program per step, MIN_PROGRAMS = shrink the column tile until the
# grid has this many programs. None = the per-op choice below; benchmarks/kernels.py sets them to sweep.
TILE: int | None = None
MIN_PROGRAMS: int | None = None
NUM_WARPS: int = 4
# H200 run 6b sweep (results/kernels-h200-run6b-mla-proj.json, weights cold in L2, us per call with PDL):
#   absorb_q    GLM-4.7-Flash (2M-element W_UK): 2.4 at (8192, 264) vs 2.9 at (4096, 512) and 3.8 in cuBLAS; the
#               larger W_UK of DeepSeek-V3 (8.4M) and GLM-5 (6.3M) were faster in cuBLAS (6.5 vs 7.4, 5.7 vs 6.8),
#               hence ABSORB_MAX_ELEMS;
#   latent_to_v GLM-4.7-Flash 2.3 at (4096, 512) vs 4.2 in cuBLAS; DeepSeek-V3 / GLM-5 5.8 / 5.7 at (2048, 264)
#               vs 6.6 / 6.6 in cuBLAS (7.0 / 6.8 at (4096, 512)).
# HIGHSPEED_TUNE_ABSORB_Q="TILE=..,MIN_PROGRAMS=.." for A/Bs in the decode chain: fewer absorb programs let the MLA
# attention after the fused absorb + RoPE launch become resident earlier (run 20 timeline).
_ABSORB_Q = tuned("ABSORB_Q", dict(TILE=8192, MIN_PROGRAMS=264))
ABSORB_KNOBS = (_ABSORB_Q["TILE"], _ABSORB_Q["MIN_PROGRAMS"])
# absorb_q and the RoPE + latent-cache write (rope_and_write_kv) in one launch (absorb_q_rope_write): the two
# depend only on q_b_proj / kv_a, not on each other, so one chain link of the decode step goes.
# HIGHSPEED_FUSE_ABSORB_ROPE=0: two launches (the A/B baseline).
FUSE_ABSORB_ROPE: bool = os.environ.get("HIGHSPEED_FUSE_ABSORB_ROPE", "1") != "0"
# A reduction that fits one tile (D <= BLOCK_D, L <= BLOCK_L) may run without the loop, whose prefetch of a next
# tile costs registers even when masked off: GLM-4.7-Flash's W_UV kernel 94 -> 32, absorb 143 -> 56 (Triton 3.6).
# More programs then fit at once, the chain's later kernels launch sooner, and their weight preloads may queue
# ahead of the latency-bound absorb, attention and merge. H200 runs 24-25, GLM-4.7-Flash batch 1 (W_UV in 640
# programs of [8, 512]): 3.29-3.31 ms per step with both, 3.26 absorb only, 3.19 W_UV only, 3.10 neither;
# DeepSeek-V2-Lite-like 2.115 with both against 2.133. With W_UV in 320 programs of [16, 512] (160 registers
# looped, 56 in one step) W_UV alone won: 2.830 against 2.841, both 2.856 (run 54, one pass each); repeated in run 55
# (two passes, beside another attention variant): GLM-4.7-Flash 2.917 / 2.917 against 2.929 / 2.928 looped,
# DeepSeek-V2-Lite 2.119 / 2.120 against 2.125 / 2.124. Hence latent_to_v by default.
# HIGHSPEED_MLA_PROJ_ONE_STEP = latent_to_v (default) | 0 (neither) | 1 (both) | absorb_q.
_ONE_STEP_ENV = os.environ.get("HIGHSPEED_MLA_PROJ_ONE_STEP", "latent_to_v")
ONE_STEP_OPS: frozenset[str] = frozenset(
    () if _ONE_STEP_ENV == "0" else ("absorb_q", "latent_to_v") if _ONE_STEP_ENV == "1" else (_ONE_STEP_ENV,))
if not ONE_STEP_OPS <= {"absorb_q", "latent_to_v"}:
    raise ValueError(f"HIGHSPEED_MLA_PROJ_ONE_STEP={_ONE_STEP_ENV!r}: expected 0, 1, absorb_q or latent_to_v")
ABSORB_MAX_ELEMS: int = 4 * 2**20
# W_UV's launch shape: rows of TILE / BLOCK_L per program, fewer while the grid is below MIN_PROGRAMS. GLM-4.7-Flash's
# 640 programs of [8, 512] (TILE=4096, MIN_PROGRAMS=512) were not all resident beside the MLA attention and the
# merge, which delayed o_proj's early launch (run 16 timeline). 320 programs of [16, 512]: H200 batch-1 decode
# chain 2.880 / 2.877 ms per step against 2.896 / 2.898 (run 49, after the merge's narrower slices; run 17, before
# them, had it 0.5% slower). HIGHSPEED_TUNE_LATENT_TO_V="TILE=..,MIN_PROGRAMS=.." for A/Bs.
_LATENT_TO_V = tuned("LATENT_TO_V", dict(TILE=8192, MIN_PROGRAMS=256))
LATENT_TO_V_KNOBS = (_LATENT_TO_V["TILE"], _LATENT_TO_V["MIN_PROGRAMS"])
LATENT_TO_V_LARGE_KNOBS = (2048, 264)   # W_UV of at least LARGE_ELEMS elements
LARGE_ELEMS: int = 4 * 2**20
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def knobs(op: str, weight_elems: int) -> tuple[int, int]:
    """(TILE, MIN_PROGRAMS) for ``op`` on a weight of this many elements: the module overrides when set."""
    if TILE is not None and MIN_PROGRAMS is not None:
        return TILE, MIN_PROGRAMS
    if op == "absorb_q":
        return ABSORB_KNOBS
    return LATENT_TO_V_LARGE_KNOBS if weight_elems >= LARGE_ELEMS else LATENT_TO_V_KNOBS


def absorb_one_step(D: int, block_d: int) -> bool:
    """Whether the absorb programs run their reduction over D without the loop (``ONE_STEP_OPS``)."""
    return "absorb_q" in ONE_STEP_OPS and D <= block_d


def absorb_config(H: int, D: int, L: int) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_L): column tile from 64 down to 16 until the grid is wide enough, rows to fill TILE."""
    tile, min_programs = knobs("absorb_q", H * D * L)
    block_l = min(64, max(16, next_power_of_2(L)))
    while block_l > 16 and H * triton.cdiv(L, block_l) < min_programs:
        block_l //= 2
    return max(16, min(next_power_of_2(D), tile // block_l)), block_l


def latent_to_v_config(H: int, V: int, L: int) -> tuple[int, int]:
    """(BLOCK_V, BLOCK_L): the whole reduction per step up to TILE / 8 (512), rows to fill TILE, fewer rows if the
    grid is thin."""
    tile, min_programs = knobs("latent_to_v", H * V * L)
    block_l = max(16, min(next_power_of_2(L), tile // 8))
    block_v = max(2, min(next_power_of_2(V), tile // block_l))
    while block_v > 2 and H * triton.cdiv(V, block_v) < min_programs:
        block_v //= 2
    return block_v, block_l


@triton.jit
def _absorb_q_kernel(
    q_ptr, w_ptr, o_ptr, T, D, L,
    stride_qt, stride_qh, stride_wh, stride_wd, stride_ot, stride_oh,
    TWO: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, ONE_STEP: tl.constexpr, PDL: tl.constexpr,
):
    """out[t, h, l] = sum_d q[t, h, d] * w[h, d, l]; grid (L blocks, H, token pairs)."""
    if PDL:
        gdc_launch_dependents()
    cols = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    head = tl.program_id(1).to(tl.int64)
    # The weight never depends on the previous kernel: its first tile is in flight before the wait.
    w_rows, w = _absorb_first_tile(w_ptr, head, cols, D, L, stride_wh, stride_wd, BLOCK_D)
    if PDL:
        gdc_wait()
    _absorb_rest(q_ptr, o_ptr, w_rows, w, head, tl.program_id(2).to(tl.int64) * 2, cols, T, D, L,
                 stride_qt, stride_qh, stride_wd, stride_ot, stride_oh, TWO, BLOCK_D, BLOCK_L, ONE_STEP)


@triton.jit
def _absorb_first_tile(w_ptr, head, cols, D, L, stride_wh, stride_wd, BLOCK_D: tl.constexpr):
    """Row pointers of head's W_UK columns ``cols``, and its first [BLOCK_D, BLOCK_L] tile (weights only: a
    kernel may call this before its PDL wait)."""
    w_rows = w_ptr + head * stride_wh + cols[None, :]
    d_first = tl.arange(0, BLOCK_D)
    w = tl.load(w_rows + d_first[:, None] * stride_wd, mask=(d_first < D)[:, None] & (cols < L)[None, :], other=0.0)
    return w_rows, w


@triton.jit
def _absorb_rest(q_ptr, o_ptr, w_rows, w, head, t0, cols, T, D, L,
                 stride_qt, stride_qh, stride_wd, stride_ot, stride_oh, TWO: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_L: tl.constexpr, ONE_STEP: tl.constexpr):
    """After the wait: the reduction over D for tokens t0 (and t0 + 1 with TWO), w the first tile, and the store.
    ONE_STEP: D <= BLOCK_D, no loop (see ONE_STEP_OPS)."""
    cmask = cols < L
    q0 = q_ptr + t0 * stride_qt + head * stride_qh
    # 1 if the pair has a second token, else 0 (T odd, last pair); masks scale their bounds by it (an integer, not
    # a bool: Triton's interpreter rejects a bool scalar & a bool block as a mask).
    n1 = tl.minimum(T - 1 - t0, 1)
    acc0 = tl.zeros([BLOCK_L], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_L], dtype=tl.float32)
    for d0 in range(0, BLOCK_D if ONE_STEP else D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dmask = d < D
        if ONE_STEP:
            w_next = w
        else:
            d_next = d + BLOCK_D
            w_next = tl.load(w_rows + d_next[:, None] * stride_wd, mask=(d_next < D)[:, None] & cmask[None, :],
                             other=0.0)
        wf = w.to(tl.float32)
        x0 = tl.load(q0 + d, mask=dmask, other=0.0).to(tl.float32)
        # Reduce each step (one cross-warp sum per step; D takes 1-3 steps) rather than keep a 2-D accumulator:
        # half the registers, which the prefetched tile needs.
        acc0 += tl.sum(wf * x0[:, None], 0)
        if TWO:
            x1 = tl.load(q0 + stride_qt + d, mask=d < D * n1, other=0.0).to(tl.float32)
            acc1 += tl.sum(wf * x1[:, None], 0)
        w = w_next
    o0 = o_ptr + t0 * stride_ot + head * stride_oh + cols
    tl.store(o0, acc0.to(o_ptr.dtype.element_ty), mask=cmask)
    if TWO:
        tl.store(o0 + stride_ot, acc1.to(o_ptr.dtype.element_ty), mask=cols < L * n1)


@triton.jit
def _absorb_rope_kernel(
    qn_ptr, wuk_ptr, qabs_ptr, T, D, L, n_absorb, n_lblocks, n_heads, n_rope_hb,
    stride_qnt, stride_qnh, stride_wuh, stride_wud, stride_qat, stride_qah,
    q_ptr, k_ptr, v_ptr, q_out_ptr, k_out_ptr, k_cache_ptr, v_cache_ptr, pos_ptr, cs_ptr, slot_ptr,
    qw_ptr, kw_ptr, vw_ptr, eps,
    num_q_heads, num_k_heads, num_q_blocks, Dq, Dk, Dv,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_qot, stride_qoh, stride_kot, stride_koh,
    stride_kcs, stride_kch, stride_vcs, stride_vch, stride_cs,
    TWO: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, ONE_STEP: tl.constexpr,
    HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
    BLOCK_V: tl.constexpr, INTERLEAVED: tl.constexpr,
    Q_NORM: tl.constexpr, K_NORM: tl.constexpr, V_NORM: tl.constexpr, EARLY_CTX: tl.constexpr, PDL: tl.constexpr,
):
    """``absorb_q`` (programs [0, n_absorb): L block, head, token pair) and ``rope_and_write_kv`` (the rest: token,
    head block) in one launch; both read only q_b_proj's and kv_a's outputs, so neither waits for the other."""
    if PDL:
        gdc_launch_dependents()
    pid = tl.program_id(0)
    if pid < n_absorb:
        cols = (pid % n_lblocks) * BLOCK_L + tl.arange(0, BLOCK_L)
        head = ((pid // n_lblocks) % n_heads).to(tl.int64)
        w_rows, w = _absorb_first_tile(wuk_ptr, head, cols, D, L, stride_wuh, stride_wud, BLOCK_D)
        if PDL:
            gdc_wait()
        _absorb_rest(qn_ptr, qabs_ptr, w_rows, w, head, (pid // (n_lblocks * n_heads)).to(tl.int64) * 2, cols,
                     T, D, L, stride_qnt, stride_qnh, stride_wud, stride_qat, stride_qah, TWO, BLOCK_D, BLOCK_L,
                     ONE_STEP)
    else:
        r = pid - n_absorb
        t = (r // n_rope_hb).to(tl.int64)
        if EARLY_CTX:   # before the wait: see highspeed.ops.triton.EARLY_CTX_ROPE
            cos, sin, slot = rope_context(cs_ptr, pos_ptr, slot_ptr, t, stride_cs, HALF, BLOCK_HALF)
        if PDL:
            gdc_wait()
        if not EARLY_CTX:
            cos, sin, slot = rope_context(cs_ptr, pos_ptr, slot_ptr, t, stride_cs, HALF, BLOCK_HALF)
        rope_write_program(
            t, r % n_rope_hb, cos, sin, slot,
            q_ptr, k_ptr, v_ptr, q_out_ptr, k_out_ptr, k_cache_ptr, v_cache_ptr, pos_ptr, cs_ptr, slot_ptr,
            qw_ptr, kw_ptr, vw_ptr, eps, num_q_heads, num_k_heads, num_q_blocks, Dq, Dk, Dv,
            stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_qot, stride_qoh, stride_kot,
            stride_koh, stride_kcs, stride_kch, stride_vcs, stride_vch, stride_cs,
            HEADS, HALF, BLOCK_HALF, BLOCK_PASS, BLOCK_V, INTERLEAVED, Q_NORM, K_NORM, V_NORM)


@triton.jit
def _latent_to_v_kernel(
    x_ptr, w_ptr, o_ptr, T, V, L,
    stride_xt, stride_xh, stride_wh, stride_wv, stride_ot, stride_oh,
    TWO: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_L: tl.constexpr, ONE_STEP: tl.constexpr, PDL: tl.constexpr,
):
    """out[t, h, v] = sum_l x[t, h, l] * w[h, v, l]; grid (V blocks, H, token pairs). ONE_STEP: L <= BLOCK_L."""
    if PDL:
        gdc_launch_dependents()
    rows = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    head = tl.program_id(1).to(tl.int64)
    t0 = tl.program_id(2).to(tl.int64) * 2
    rmask = rows < V
    w_rows = w_ptr + head * stride_wh + rows[:, None] * stride_wv
    l_first = tl.arange(0, BLOCK_L)
    w = tl.load(w_rows + l_first[None, :], mask=rmask[:, None] & (l_first < L)[None, :], other=0.0)
    if PDL:
        gdc_wait()
    x0 = x_ptr + t0 * stride_xt + head * stride_xh
    n1 = tl.minimum(T - 1 - t0, 1)   # 1 if the pair has a second token, as in _absorb_q_kernel
    acc0 = tl.zeros([BLOCK_V], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_V], dtype=tl.float32)
    for l0 in range(0, BLOCK_L if ONE_STEP else L, BLOCK_L):
        k = l0 + tl.arange(0, BLOCK_L)
        kmask = k < L
        if ONE_STEP:
            w_next = w
        else:
            k_next = k + BLOCK_L
            w_next = tl.load(w_rows + k_next[None, :], mask=rmask[:, None] & (k_next < L)[None, :], other=0.0)
        wf = w.to(tl.float32)
        xv0 = tl.load(x0 + k, mask=kmask, other=0.0).to(tl.float32)
        acc0 += tl.sum(wf * xv0[None, :], 1)
        if TWO:
            xv1 = tl.load(x0 + stride_xt + k, mask=k < L * n1, other=0.0).to(tl.float32)
            acc1 += tl.sum(wf * xv1[None, :], 1)
        w = w_next
    o0 = o_ptr + t0 * stride_ot + head * stride_oh + rows
    tl.store(o0, acc0.to(o_ptr.dtype.element_ty), mask=rmask)
    if TWO:
        tl.store(o0 + stride_ot, acc1.to(o_ptr.dtype.element_ty), mask=rows < V * n1)


def _use_kernel(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, rows: int, cols: int) -> bool:
    """x[T, H, *], w[H, rows, cols], out[T, H, *], all unit-stride in the last dim and of one dtype."""
    return (x.dim() == 3 and w.dim() == 3 and out.dim() == 3 and 0 < x.shape[0] <= MAX_T and out.numel() > 0
            and w.shape == (x.shape[1], rows, cols) and out.shape[:2] == x.shape[:2]
            and x.dtype == w.dtype == out.dtype and x.dtype in _DTYPES and not x.requires_grad
            and x.stride(-1) == 1 and w.stride(-1) == 1 and out.stride(-1) == 1)


def _absorb_kernel_fits(q_nope: torch.Tensor, w_uk: torch.Tensor, out: torch.Tensor) -> bool:
    return _use_kernel(q_nope, w_uk, out, q_nope.shape[-1], out.shape[-1]) and (
        TILE is not None or w_uk.shape[0] * w_uk.shape[1] * w_uk.shape[2] <= ABSORB_MAX_ELEMS)


def absorb_q(q_nope: torch.Tensor, w_uk: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Same contract as ``highspeed.ops.mla_proj.absorb_q``."""
    if not _absorb_kernel_fits(q_nope, w_uk, out):
        torch.bmm(q_nope.transpose(0, 1), w_uk, out=out.transpose(0, 1))
        return out
    (T, H, D), L = q_nope.shape, out.shape[-1]
    block_d, block_l = absorb_config(H, D, L)
    _absorb_q_kernel[(triton.cdiv(L, block_l), H, triton.cdiv(T, 2))](
        q_nope, w_uk, out, T, D, L,
        q_nope.stride(0), q_nope.stride(1), w_uk.stride(0), w_uk.stride(1), out.stride(0), out.stride(1),
        TWO=T > 1, BLOCK_D=block_d, BLOCK_L=block_l, ONE_STEP=absorb_one_step(D, block_d), num_warps=NUM_WARPS,
        **pdl(q_nope),
    )
    return out


def latent_to_v(latent: torch.Tensor, w_uv: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Same contract as ``highspeed.ops.mla_proj.latent_to_v``."""
    if not _use_kernel(latent, w_uv, out, out.shape[-1], latent.shape[-1]):
        torch.bmm(latent.transpose(0, 1), w_uv.transpose(1, 2), out=out.transpose(0, 1))
        return out
    (T, H, L), V = latent.shape, out.shape[-1]
    block_v, block_l = latent_to_v_config(H, V, L)
    _latent_to_v_kernel[(triton.cdiv(V, block_v), H, triton.cdiv(T, 2))](
        latent, w_uv, out, T, V, L,
        latent.stride(0), latent.stride(1), w_uv.stride(0), w_uv.stride(1), out.stride(0), out.stride(1),
        TWO=T > 1, BLOCK_V=block_v, BLOCK_L=block_l, ONE_STEP="latent_to_v" in ONE_STEP_OPS and L <= block_l,
        num_warps=NUM_WARPS, **pdl(latent),
    )
    return out


def absorb_q_rope_write(q_nope: torch.Tensor, w_uk: torch.Tensor, out: torch.Tensor, **rope_kw) -> None:
    """Same contract as ``highspeed.ops.mla_proj.absorb_q_rope_write``: one launch when the absorb kernel takes
    the shape (FUSE_ABSORB_ROPE), else the two launches."""
    if not (FUSE_ABSORB_ROPE and _absorb_kernel_fits(q_nope, w_uk, out)):
        absorb_q(q_nope, w_uk, out)
        rope_and_write_kv(**rope_kw)
        return
    grid, r_args, r_consts, _, _ = rope_write_launch(**rope_kw)
    if grid[0] == 0:
        absorb_q(q_nope, w_uk, out)
        return
    (T, H, D), L = q_nope.shape, out.shape[-1]
    block_d, block_l = absorb_config(H, D, L)
    n_l = triton.cdiv(L, block_l)
    n_absorb = n_l * H * triton.cdiv(T, 2)
    consts = dict(r_consts, num_warps=NUM_WARPS)   # the absorb programs' warps; rope's work fits either way
    _absorb_rope_kernel[(n_absorb + grid[0] * grid[1],)](
        q_nope, w_uk, out, T, D, L, n_absorb, n_l, H, grid[1],
        q_nope.stride(0), q_nope.stride(1), w_uk.stride(0), w_uk.stride(1), out.stride(0), out.stride(1),
        *r_args, TWO=T > 1, BLOCK_D=block_d, BLOCK_L=block_l, ONE_STEP=absorb_one_step(D, block_d), **consts,
        **pdl(q_nope),
    )
