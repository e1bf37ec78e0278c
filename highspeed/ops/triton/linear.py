"""GEMV for batch-1 decode: ``y[1, N] = x[1, K] @ W[N, K]^T``, optionally with the RMSNorm of x folded in (a
``DeferredNorm`` whose producer stored the sums of squares) and the residual add of y folded out (``residual``:
it returns a ``ResidualSum`` with its programs' sums of squares for the next norm); see ``ops/triton/norm.py``.

Multiply-and-reduce in registers (no tensor cores: one row of x), a few weight rows per program over the whole K
range (no split-K, so deterministic and no second launch). Rows up to ``GEMV_WHOLE["MAX_K"]`` long are loaded
whole before the PDL wait (``WHOLE_ROWS``), so the matrix streams in while the previous kernels run; longer ones
loop over K tiles, the next tile loaded while the current one is used. H200, weights cold in L2 as in a model (benchmarks/kernels.py ``linear``, run 5): it beats cuBLAS on every
attention/shared-expert projection shape of Qwen3-30B-A3B and GLM-4.7-Flash -- o_proj 6.4 vs 9.6 us (cuBLAS takes
split-K plus a reduce launch where N < K), qkv 7.2 vs 7.9, GLM-4.7-Flash q_a+kv_a 3.5 vs 6.6 -- and only lost on
GLM-5's 200 MB o_proj timed alone (53 vs 52 us, 91% of copy bandwidth in cuBLAS). Inside the decode chain it also
takes the lm_head (``MAX_WEIGHT_BYTES``). With more than one row cuBLAS stays: the tensor-core variant tried here (x
padded to 16 rows) was slower or even there.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from highspeed.ops.norm import DeferredNorm, ResidualSum, materialize, unnormed
from highspeed.ops.triton import (gdc_launch_dependents, gdc_wait, interpreting, l2_prefetch, next_power_of_2, pdl,
                                  prefetch_l2, tuned)
from highspeed.ops.triton.norm import (addable_norm, fold_residual, foldable_norm, folded_sum, norm_values,
                                       residual_epilogue, rstd_of, self_normable, sumsq_load, sumsq_rstd)

# The largest weight the batch-1 GEMV takes (None: any); HIGHSPEED_GEMV_MAX_MB sets one in MiB. It was 64 MiB, after
# GLM-5's o_proj timed alone (run 5, above). In the decode chain the lm_head as a GEMV (H200 run 63, two passes):
# Qwen3-30B-A3B 2.069 / 2.070 ms per step against 2.077 / 2.075 with cuBLAS, GLM-4.7-Flash 2.749 / 2.751 against
# 2.763 / 2.763. Its 622 MB took 131 us against cuBLAS's 143 us plus a 2 us memset: it launches during the final
# norm (PDL) and preloads its first rows there.
_MAX_MB = os.environ.get("HIGHSPEED_GEMV_MAX_MB", "").strip()
MAX_WEIGHT_BYTES: int | None = int(_MAX_MB) * 2**20 if _MAX_MB else None
# Launch shapes by N (run 5 sweep): 2 rows x 1024 columns when there are few rows (N < 4096: o_proj, q_a+kv_a,
# shared down: 672-1024 programs), 4 x 512 otherwise (qkv, q_b: 1280 programs).
GEMV_ROW = dict(BLOCK_N=4, BLOCK_K=512, num_warps=4, PREFETCH=True)
GEMV_ROW_NARROW = dict(BLOCK_N=2, BLOCK_K=1024, num_warps=4, PREFETCH=True)
NARROW_N: int = 4096
# Whole-row preload (run 8): each program loads ALL of its weight rows before ``gdc_wait`` ([BLOCK_N, K] in
# registers, about ELEMS elements per program, K split into a power-of-two part K1 and a power-of-two rest K2), so
# under PDL the whole matrix can stream in while the previous kernels still run -- the latency-bound ones
# (attention, norms, router) leave HBM idle -- and after the wait a program pays one read of x and the reduction.
# The first-tile prefetch above moved only a quarter of the weights ahead of the wait. Off with
# HIGHSPEED_GEMV_WHOLE=0 (A/B); rows longer than MAX_K keep the loop. Run 8 (H200, batch-1 graph replay): Qwen3
# 2.606 -> 2.483 ms, GLM-4.7-Flash 3.326 -> 3.241 ms; ELEMS=4096 2.522 / 3.205 ms.
# Rows longer than WIDE_K take WIDE_ELEMS / WIDE_WARPS instead: every program reads all of x, so x's reads from
# L2 add weight_bytes / rows to the weights' -- doubling them for GLM-4.7-Flash's o_proj (K = 5120) at one row
# per program, all programs asking for the same few lines at once. Two rows there (70 registers on Triton 3.6):
# H200 batch-1 decode chain 2.947 / 2.942 ms per step against 2.961 / 2.961 (runs 33, 34; o_proj 6.5 -> 5.8-6.2
# us per layer); four rows 2.950, four on 8 warps 2.969 (run 33). Qwen3's o_proj (K = 4096) with four rows
# instead of two: 2.431 against 2.372 ms (run 33), hence the bound.
# MIN_PROGRAMS: fewer rows per program (down to one) while the grid is smaller. GLM-4.7-Flash's q_a + kv_a (1344
# rows of 2048) in 672 programs of 2 rows instead of 336 of 4: H200 batch-1 decode chain 2.852 / 2.853 ms per step
# against 2.879 / 2.880 (run 51); with 1024 (q_b 1280 programs of 4 rows, too) 2.853 / 2.852; ELEMS=4096 (both)
# 2.865 / 2.867.
# ELEMS=16384 (was 8192): Qwen3-30B-A3B's qkv in 640 programs of 8 rows, o_proj in 512 of 4 (were 1280 of 4 and 1024
# of 2): 2.190 / 2.188 against 2.196 / 2.195 (run 50), 2.182 / 2.184 against 2.195 / 2.197 (run 52). With
# MIN_PROGRAMS, GLM-4.7-Flash's and DeepSeek-V2-Lite's GEMVs keep the shapes they had (2.853 / 2.851 against 2.853 /
# 2.853, run 52). Run 33 had Qwen3's o_proj with 4 rows 2.5% slower, before the merge and W_UV changes of runs 48-51.
GEMV_WHOLE = tuned("GEMV_WHOLE", dict(ELEMS=16384, MAX_K=8192, num_warps=4, WIDE_K=4096, WIDE_ELEMS=10240,
                                      WIDE_WARPS=4, MIN_PROGRAMS=512))
WHOLE_ROWS: bool = os.environ.get("HIGHSPEED_GEMV_WHOLE", "1") != "0"
# A norm without a residual (MLA's q_a_layernorm before q_b_proj) folded into the whole-row GEMV that reads its
# output: every program loads all of x after its wait anyway, so it takes the sums of squares there too, and the
# norm's launch goes. H200 batch-1 decode chain (run 38, two interleaved passes): GLM-4.7-Flash 2.898 / 2.903 ms per
# step against 2.909 / 2.909 (norms -1.2 us per layer, q_b +0.8). HIGHSPEED_SELF_NORM=0: the norm launch.
SELF_NORM: bool = os.environ.get("HIGHSPEED_SELF_NORM", "1") != "0"
# The same for a residual norm whose add is still pending (the input norm of each decoder layer but the first,
# before qkv / MLA's q_a + kv_a): each program loads the block's output and the residual, adds them, takes the sums
# of squares of the sum, and program 0 stores the sum, the residual stream o_proj adds to later. The norm launch
# goes. H200 batch-1 decode chain (run 68, two interleaved passes, the norm weights then still loaded after the
# wait): Qwen3-30B-A3B 2.070 / 2.071 ms per step against 2.080 / 2.078 (norms -1.08 us per layer, qkv +0.6),
# GLM-4.7-Flash 2.746 / 2.745 against 2.757 / 2.757; run 69, the norm weights before the wait and the residual
# asked into L2 by program 0: 2.067 / 2.066 against 2.080 / 2.079, GLM-4.7-Flash 2.729 / 2.731 against 2.753 /
# 2.753. HIGHSPEED_GEMV_ADD_NORM=0: the norm launch.
ADD_NORM: bool = os.environ.get("HIGHSPEED_GEMV_ADD_NORM", "1") != "0"
# Registers for that variant: Triton 3.6 gives it 127 for Qwen3's qkv shape (8 rows of 2048) against 96 without the
# add, i.e. 4 programs per SM instead of 5 and two waves of its 640 programs. Capped (PTX .maxnreg) at this many;
# 0: no cap. HIGHSPEED_GEMV_ADD_NORM_MAXNREG.
ADD_NORM_MAXNREG: int = int(os.environ.get("HIGHSPEED_GEMV_ADD_NORM_MAXNREG", "96"))
# (Only for one row of at most norm.ADD_NORM_MAX_K elements: wider rows spill under the cap.)


def whole_rows(K: int) -> bool:
    """Whether rows of K weights take the whole-row preload (the GEMV, and the MoE router)."""
    return WHOLE_ROWS and K <= GEMV_WHOLE["MAX_K"]


def whole_split(K: int) -> tuple[int, int]:
    """(K1, K2): K1 the largest power of two <= K, K2 the power of two covering the rest (0 when K1 == K)."""
    k1 = 1 << (K.bit_length() - 1)
    return k1, (next_power_of_2(K - k1) if K > k1 else 0)


def whole_block_n(K: int, N: int) -> int:
    """Rows per program for the whole-row preload of N rows: a power of two keeping [rows, K1 + K2] near ELEMS
    elements (WIDE_ELEMS for rows longer than WIDE_K), halved while there are fewer than MIN_PROGRAMS programs."""
    k1, k2 = whole_split(K)
    elems = GEMV_WHOLE["WIDE_ELEMS"] if K > GEMV_WHOLE["WIDE_K"] else GEMV_WHOLE["ELEMS"]
    rows = max(1, min(16, elems // (k1 + k2)))
    rows = 1 << (rows.bit_length() - 1)
    while rows > 1 and triton.cdiv(N, rows) < GEMV_WHOLE["MIN_PROGRAMS"]:
        rows //= 2
    return rows


def whole_warps(K: int) -> int:
    """Warps per program for the whole-row preload (WIDE_WARPS for rows longer than WIDE_K)."""
    return GEMV_WHOLE["WIDE_WARPS"] if K > GEMV_WHOLE["WIDE_K"] else GEMV_WHOLE["num_warps"]


@triton.jit
def whole_rows_load(w_rows, rmask, K, K1: tl.constexpr, K2: tl.constexpr):
    """Whole weight rows at ``w_rows`` ([rows, 1] row pointers, rows masked by ``rmask``): columns [0, K1) and
    [K1, K1 + K2) as two tiles (the second is the first again, unused, when K2 == 0). Weights only, so a kernel
    may call it before its PDL wait (tests/ops/test_pdl_contract.py checks the pointer)."""
    k1 = tl.arange(0, K1)
    w1 = tl.load(w_rows + k1[None, :], mask=rmask[:, None] & (k1 < K)[None, :], other=0.0)
    if K2 > 0:
        k2 = K1 + tl.arange(0, K2)
        w2 = tl.load(w_rows + k2[None, :], mask=rmask[:, None] & (k2 < K)[None, :], other=0.0)
    else:
        w2 = w1
    return w1, w2


@triton.jit
def norm_weights_load(nw_ptr, K, K1: tl.constexpr, K2: tl.constexpr):
    """A norm's weight row in the two tiles of ``whole_rows_dot`` (the second is the first again when K2 == 0). A
    parameter, so a kernel loads it before its PDL wait: read once per step, it is mostly out of L2 by then, and
    after the wait it would add an HBM round trip to the one the activations take."""
    k1 = tl.arange(0, K1)
    g1 = tl.load(nw_ptr + k1, mask=k1 < K, other=0.0)
    if K2 > 0:
        k2 = K1 + tl.arange(0, K2)
        g2 = tl.load(nw_ptr + k2, mask=k2 < K, other=0.0)
    else:
        g2 = g1
    return g1, g2


@triton.jit
def whole_rows_dot(w1, w2, x_row, K, K1: tl.constexpr, K2: tl.constexpr, g1, g2, ss_row, P, eps,
                   NORM: tl.constexpr, BLOCK_P: tl.constexpr, SELF_NORM: tl.constexpr,
                   res_row, sum_row, sum_k, ADD_RES: tl.constexpr, normed_row, STORE_NORMED: tl.constexpr):
    """[rows] fp32 dot products of whole preloaded weight rows (w1: columns [0, K1), w2: [K1, K1 + K2), unused
    when K2 == 0) with the row at ``x_row`` -- with NORM, with its RMSNorm (weights g1, g2 from
    ``norm_weights_load``, the producer's partial sums of squares at ``ss_row``, or with SELF_NORM the sums of
    squares of the loaded row itself: every program holds all of x anyway). ADD_RES (with SELF_NORM): the row normalised is x plus the residual row at
    ``res_row``, rounded to x's dtype as the norm launch rounds it, and its first ``sum_k`` columns (the residual
    stream: K in one program, 0 in the others) are stored at ``sum_row``; with STORE_NORMED also the normalised row
    at ``normed_row`` (for another kernel that reads it). Every load is issued before any of it is used."""
    k1 = tl.arange(0, K1)
    x1 = tl.load(x_row + k1, mask=k1 < K, other=0.0)
    if ADD_RES:
        r1 = tl.load(res_row + k1, mask=k1 < K, other=0.0)
    if K2 > 0:
        k2 = K1 + tl.arange(0, K2)
        x2 = tl.load(x_row + k2, mask=k2 < K, other=0.0)
        if ADD_RES:
            r2 = tl.load(res_row + k2, mask=k2 < K, other=0.0)
    if ADD_RES:
        x1 = (x1.to(tl.float32) + r1.to(tl.float32)).to(x_row.dtype.element_ty)
        tl.store(sum_row + k1, x1, mask=k1 < sum_k)
        if K2 > 0:
            x2 = (x2.to(tl.float32) + r2.to(tl.float32)).to(x_row.dtype.element_ty)
            tl.store(sum_row + k2, x2, mask=k2 < sum_k)
    if NORM:
        if SELF_NORM:
            x1f = x1.to(tl.float32)
            ssq = tl.sum(x1f * x1f, 0)
            if K2 > 0:
                x2f = x2.to(tl.float32)
                ssq += tl.sum(x2f * x2f, 0)
            rstd = rstd_of(ssq, K, eps)
        else:
            rstd = sumsq_rstd(sumsq_load(ss_row, P, BLOCK_P), K, eps)
        xf1 = norm_values(x1, g1, rstd, x_row.dtype.element_ty)
        if STORE_NORMED:
            tl.store(normed_row + k1, xf1.to(x_row.dtype.element_ty), mask=k1 < sum_k)
    else:
        xf1 = x1.to(tl.float32)
    y = tl.sum(w1.to(tl.float32) * xf1[None, :], 1)
    if K2 > 0:
        if NORM:
            xf2 = norm_values(x2, g2, rstd, x_row.dtype.element_ty)
            if STORE_NORMED:
                tl.store(normed_row + k2, xf2.to(x_row.dtype.element_ty), mask=k2 < sum_k)
        else:
            xf2 = x2.to(tl.float32)
        y += tl.sum(w2.to(tl.float32) * xf2[None, :], 1)
    return y


@triton.jit
def tile_rows_dot(w, w_rows, rmask, x_row, K, ROWS: tl.constexpr, BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr,
                  W_EVICT: tl.constexpr):
    """[ROWS] fp32 dot products of the weight rows at ``w_rows`` with the row at ``x_row``, over K in BLOCK_K tiles.
    With PREFETCH, ``w`` is the first tile (loaded before the PDL wait) and each step loads the next tile before
    using the current one; without, ``w`` is unused."""
    acc = tl.zeros([ROWS, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        xv = tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32)
        if PREFETCH:
            kn = k + BLOCK_K
            w_next = tl.load(w_rows + kn[None, :], mask=rmask[:, None] & (kn < K)[None, :], other=0.0,
                             eviction_policy=W_EVICT)
            cur = w
        else:
            cur = tl.load(w_rows + k[None, :], mask=rmask[:, None] & (k < K)[None, :], other=0.0,
                          eviction_policy=W_EVICT)
        acc += cur.to(tl.float32) * xv[None, :]
        if PREFETCH:
            w = w_next
    return tl.sum(acc, 1)


def use_gemv(M: int, N: int, K: int, weight: torch.Tensor) -> bool:
    return M == 1 and (MAX_WEIGHT_BYTES is None or weight.numel() * weight.element_size() <= MAX_WEIGHT_BYTES)


@triton.jit
def _gemv_row_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, res_ptr, nw_ptr, ss_in_ptr, ss_out_ptr, rin_ptr, sum_ptr, N, K, P_in, eps,
    stride_xm, stride_wn, stride_ym, stride_rm, stride_sim, stride_som, stride_rim, stride_sum,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr,
    L2_PREFETCH: tl.constexpr, LINE: tl.constexpr, KLINES: tl.constexpr, W_EVICT: tl.constexpr,
    WHOLE: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
    NORM: tl.constexpr, BLOCK_P: tl.constexpr, SELF_NORM: tl.constexpr, ADD_RES: tl.constexpr,
    RES_PREFETCH: tl.constexpr, ADD_RESIDUAL: tl.constexpr, PDL: tl.constexpr,
):
    # NORM (WHOLE only): x is the residual stream, normalised here (see ops/triton/norm.py); SELF_NORM: x is a
    # norm's input, its sums of squares taken here from the whole row each program loads; ADD_RES: that input is x
    # plus the residual at rin_ptr, and program 0 stores the sum at sum_ptr (ADD_NORM).
    # ADD_RESIDUAL: y is added to the residual rows at res_ptr, and each program stores the sum of squares of its
    # sums.
    if PDL:
        gdc_launch_dependents()
    m = tl.program_id(1).to(tl.int64)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    w_rows = w_ptr + n[:, None].to(tl.int64) * stride_wn
    x_row = x_ptr + m * stride_xm
    if RES_PREFETCH:
        # ADD_RES: the residual was stored tens of microseconds ago (two expert kernels streamed since), so it is
        # likely out of L2: program 0 asks for it again. Only a prefetch: L2 is where the GPU's memory is
        # coherent, so no stale value can come of it, and the load after the wait reads it from there.
        if tl.program_id(0) == 0:
            prefetch_l2(rin_ptr + m * stride_rim + tl.minimum(tl.arange(0, KLINES) * LINE, K - 1))
    if L2_PREFETCH:  # all of this program's weight rows, requested while the previous kernel still runs
        lines = tl.minimum(tl.arange(0, KLINES) * LINE, K - 1)
        prefetch_l2(w_ptr + tl.minimum(n, N - 1)[:, None].to(tl.int64) * stride_wn + lines[None, :])
    if WHOLE:      # every weight of this program, in flight before the wait
        w1, w2 = whole_rows_load(w_rows, nmask, K, K1, K2)
        if NORM:
            g1, g2 = norm_weights_load(nw_ptr, K, K1, K2)
        else:
            g1, g2 = 0.0, 0.0
    elif PREFETCH:   # the first weight tile does not depend on the previous kernel: in flight before the wait
        k = tl.arange(0, BLOCK_K)
        w = tl.load(w_rows + k[None, :], mask=nmask[:, None] & (k < K)[None, :], other=0.0, eviction_policy=W_EVICT)
    else:
        w = 0.0   # no first tile: tile_rows_dot loads every tile itself
    if PDL:
        gdc_wait()
    if ADD_RESIDUAL:
        r = tl.load(res_ptr + m * stride_rm + n, mask=nmask, other=0.0)
    if WHOLE:
        y = whole_rows_dot(w1, w2, x_row, K, K1, K2, g1, g2, ss_in_ptr + m * stride_sim, P_in, eps, NORM, BLOCK_P,
                           SELF_NORM, rin_ptr + m * stride_rim, sum_ptr + m * stride_sum,
                           tl.where(tl.program_id(0) == 0, K, 0), ADD_RES, sum_ptr, False)
    else:
        y = tile_rows_dot(w, w_rows, nmask, x_row, K, BLOCK_N, BLOCK_K, PREFETCH, W_EVICT)
    if HAS_BIAS:
        y += tl.load(b_ptr + n, mask=nmask, other=0.0).to(tl.float32)
    if ADD_RESIDUAL:
        out, part = residual_epilogue(y, r, nmask, y_ptr.dtype.element_ty)
        tl.store(y_ptr + m * stride_ym + n, out, mask=nmask)
        tl.store(ss_out_ptr + m * stride_som + tl.program_id(0), part)
    else:
        tl.store(y_ptr + m * stride_ym + n, y.to(y_ptr.dtype.element_ty), mask=nmask)


def linear(x: torch.Tensor | DeferredNorm, weight: torch.Tensor, bias: torch.Tensor | None = None,
           residual: torch.Tensor | None = None) -> torch.Tensor | ResidualSum:
    """Same contract as ``highspeed.ops.linear.linear``."""
    norm = x if isinstance(x, DeferredNorm) else None
    xin = unnormed(x)
    K = xin.shape[-1]
    N = weight.shape[0]
    M = xin.numel() // K if K else 0
    if (not use_gemv(M, N, K, weight) or weight.dim() != 2 or weight.stride(-1) != 1 or xin.dtype != weight.dtype
            or xin.dtype not in (torch.bfloat16, torch.float16, torch.float32) or xin.requires_grad):
        y = F.linear(materialize(x), weight, bias)
        return y if residual is None else ResidualSum(y, residual)
    whole = whole_rows(K)
    add_norm = norm is not None and whole and ADD_NORM and addable_norm(norm, xin)
    self_norm = norm is not None and whole and (add_norm or SELF_NORM and self_normable(norm, xin))
    if norm is not None and not (whole and foldable_norm(norm, xin)) and not self_norm:
        xin, norm = materialize(norm), None     # its own norm launch, then the GEMV as without one
    x2 = xin.reshape(M, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(M, N, dtype=xin.dtype, device=xin.device)
    cfg = GEMV_ROW_NARROW if N < NARROW_N else GEMV_ROW
    k1, k2 = whole_split(K)
    if whole:
        cfg = dict(cfg, BLOCK_N=whole_block_n(K, N), num_warps=whole_warps(K))
    programs = triton.cdiv(N, cfg["BLOCK_N"])
    add = fold_residual(residual, xin, M, N)
    ss_out = torch.empty(M, programs, dtype=torch.float32, device=xin.device) if add else None
    res = residual.reshape(M, N) if add else y       # unused pointers without them
    parts = norm is not None and not self_norm     # the producer's partial sums of squares are read
    ss_in = norm.sumsq if parts else y
    ss_o = ss_out if ss_out is not None else y
    if add_norm:   # the residual stream x + residual, stored by program 0
        r_in = norm.residual.reshape(M, K)
        s_out = torch.empty(M, K, dtype=xin.dtype, device=xin.device)
    else:
        r_in, s_out = x2, y      # unused pointers
    _gemv_row_kernel[(programs, M)](
        x2, weight, bias if bias is not None else weight, y, res, norm.weight if norm is not None else weight,
        ss_in, ss_o, r_in, s_out, N, K, ss_in.shape[-1] if parts else 0, norm.eps if norm is not None else 0.0,
        x2.stride(0), weight.stride(0), y.stride(0), res.stride(0), ss_in.stride(0), ss_o.stride(0),
        r_in.stride(0), s_out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], PREFETCH=cfg["PREFETCH"],
        KLINES=next_power_of_2(triton.cdiv(K * weight.element_size(), 128)), **l2_prefetch(weight),
        WHOLE=whole, K1=k1, K2=k2, NORM=norm is not None, SELF_NORM=self_norm, ADD_RES=add_norm,
        RES_PREFETCH=add_norm and not interpreting(),
        BLOCK_P=next_power_of_2(ss_in.shape[-1]) if parts else 1,
        ADD_RESIDUAL=add, num_warps=cfg["num_warps"], **pdl(x2),
        **({"maxnreg": ADD_NORM_MAXNREG} if add_norm and ADD_NORM_MAXNREG else {}),
    )
    if add_norm:
        norm.set_residual_out(s_out.view(xin.shape))
    y = y.view(*xin.shape[:-1], N)
    if residual is None:
        return y
    return folded_sum(y, ss_out) if add else ResidualSum(y, residual)
