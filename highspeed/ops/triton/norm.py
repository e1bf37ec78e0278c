"""RMSNorm, and RMSNorm fused with the residual add that precedes it in every decoder block.

One program per row; the row stays in registers between the sum of squares and the scaling, so ``rms_norm``
reads x once and writes y once, and ``add_rms_norm`` reads x and residual once and writes the sum and y once
(three round trips through memory instead of the five the unfused add + norm need).
Rounding follows transformers' RMSNorm: statistics in fp32, the normalised row cast back to the input dtype,
then multiplied by the weight. The end of the file holds the pieces that fold the norm into the kernels that
write and read the residual stream at batch-1 decode (``DeferredNorm`` with ``sumsq``), saving its launch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from highspeed.ops.norm import DeferredNorm, ResidualSum
from highspeed.ops.triton import gdc_launch_dependents, gdc_wait, next_power_of_2, pdl


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, y_ptr, sum_ptr,
    N, eps,
    stride_x, stride_r, stride_y, stride_s,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
):
    if PDL:
        gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)   # a parameter: safe before the PDL wait
    if PDL:
        gdc_wait()
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        # Round the sum to the model dtype first: the residual stream is stored in that dtype.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * stride_s + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = rstd_of(tl.sum(xf * xf, 0), N, eps)
    normed = (xf * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, (normed * w).to(y_ptr.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    shape = x.shape
    N = shape[-1]
    x2 = x.reshape(-1, N)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    y = torch.empty(shape, dtype=x.dtype, device=x.device)
    y2 = y.view(-1, N)
    if residual is not None:
        r2 = residual.reshape(-1, N)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
        s = torch.empty(shape, dtype=x.dtype, device=x.device)
        s2 = s.view(-1, N)
    else:
        r2, s, s2 = x2, None, y2  # unused pointers
    if rows == 0:
        return y, s
    block = next_power_of_2(N)
    num_warps = 1 if block <= 256 else 4 if block <= 2048 else 8 if block <= 8192 else 16
    _rms_norm_kernel[(rows,)](
        x2, r2, weight, y2, s2, N, float(eps),
        x2.stride(0), r2.stride(0), y2.stride(0), s2.stride(0),
        HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=num_warps, **pdl(x2),
    )
    return y, s


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dimension."""
    return _launch(x, None, weight, eps)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) in one pass."""
    y, s = _launch(x, residual, weight, eps)
    assert s is not None
    return y, s


# ----------------------------------------------------------------------------------------------------------------
# The norm folded into the kernels around it at batch-1 decode (``DeferredNorm`` with ``sumsq``): the kernel that
# writes the residual stream (the GEMV, the fused MoE's down kernel) adds the residual in its epilogue and stores
# each program's sum of squares of the rows it wrote (``residual_epilogue``); the kernels that read the norm's
# output (the GEMV, the MoE router and gate/up kernel) add those partials up into ``rstd`` (``sumsq_load``, one
# load issued with the row's own, then ``sumsq_rstd``) and normalise the row as they load it (``norm_values``).
# Nothing waits for a whole-row reduction, and the norm launch -- ~1.5 us of pure latency on the H200 -- is gone.
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def residual_epilogue(y, r, mask, OUT_TY: tl.constexpr):
    """``s = y + r`` for a producer's fp32 results ``y`` and the residual values ``r`` (loaded right after the
    PDL wait, so the load is not a round trip at the end): y rounded to the model dtype first (the unfused op's
    output), the sum rounded once (the residual stream's dtype). Returns (s, sum of s^2 over ``mask``)."""
    s = (y.to(OUT_TY).to(tl.float32) + r.to(tl.float32)).to(OUT_TY)
    sf = tl.where(mask, s.to(tl.float32), 0.0)
    return s, tl.sum(sf * sf, 0)


@triton.jit
def sumsq_load(ss_row, P, BLOCK_P: tl.constexpr):
    """The P partial sums of squares a producer stored for one row (issued early; reduced by ``sumsq_rstd``)."""
    p = tl.arange(0, BLOCK_P)
    return tl.load(ss_row + p, mask=p < P, other=0.0)


@triton.jit
def rstd_of(sumsq, K, eps):
    """``1 / rms`` of a row of K elements from its sum of squares."""
    return 1.0 / tl.sqrt(sumsq / K + eps)


@triton.jit
def sumsq_rstd(parts, K, eps):
    """``1 / rms`` of a row of K elements from its loaded partial sums of squares."""
    return rstd_of(tl.sum(parts, 0), K, eps)


@triton.jit
def norm_values(x, nw, rstd, OUT_TY: tl.constexpr):
    """Loaded row values ``x`` normalised and scaled by the loaded weights ``nw``, with ``_rms_norm_kernel``'s
    roundings (so exactly the values ``rms_norm`` returns, held in fp32)."""
    normed = (x.to(tl.float32) * rstd).to(OUT_TY).to(tl.float32)
    return (normed * nw.to(tl.float32)).to(OUT_TY).to(tl.float32)


def _readable_norm(norm: DeferredNorm, x: torch.Tensor) -> bool:
    """What every way of folding a ``DeferredNorm`` into the kernel reading ``x`` needs: no autograd to see
    through the kernel, and a weight and row the kernel can read as they are."""
    w = norm.weight
    return (not norm.needs_grad() and w.dtype == x.dtype and w.shape == x.shape[-1:] and w.is_contiguous()
            and x.stride(-1) == 1)


def _norm_of_ready_row(norm: DeferredNorm, x: torch.Tensor) -> bool:
    """The folds of a norm whose residual is already added (``foldable_norm``, ``self_normable``)."""
    return norm.residual is None and _readable_norm(norm, x)


# The widest row whose pending residual add and norm a consumer does itself (``addable_norm``): Qwen3-30B-A3B's and
# GLM-4.7-Flash's hidden size. Wider rows spill (the GEMV under its register cap, Triton 3.6: 240 bytes at
# GLM-4.5-Air's 4096, 72 at GLM-5's 6144; the router took 128 and 221 registers), and H200 run 71 measured that:
# GLM-4.5-Air (20 layers) 3.926 ms per step against 3.33, GLM-5 (5 layers) 1.962 against 1.73.
ADD_NORM_MAX_K: int = 2048


def addable_norm(norm: DeferredNorm, x: torch.Tensor) -> bool:
    """Whether a whole-row consumer kernel can fold this ``DeferredNorm`` of its one-row input ``x`` with its
    pending residual add: it loads x and the residual, adds, takes the sums of squares, and stores the sum (the
    residual stream) itself. Not once the norm has run (its output is then read as it is), and not for rows wider
    than ADD_NORM_MAX_K."""
    r = norm.residual
    return (r is not None and norm.sumsq is None and norm._out is None and norm._residual_out is None
            and x.numel() == x.shape[-1] <= ADD_NORM_MAX_K and _readable_norm(norm, x)
            and r.dtype == x.dtype and r.shape == x.shape and r.is_contiguous())


def foldable_norm(norm: DeferredNorm, x: torch.Tensor) -> bool:
    """Whether a consumer kernel can fold this ``DeferredNorm`` of its input ``x``: its producer stored the
    sums of squares, and the residual is already added."""
    ss = norm.sumsq
    return (ss is not None and _norm_of_ready_row(norm, x) and ss.is_contiguous() and ss.dim() == 2
            and ss.shape[0] == x.numel() // max(1, x.shape[-1]))


def self_normable(norm: DeferredNorm, x: torch.Tensor) -> bool:
    """Whether a whole-row consumer kernel can fold this ``DeferredNorm`` of its input ``x`` by taking the sums
    of squares itself: a norm of x alone (no residual to add, so nothing else to write) whose producer did not
    store them (then ``foldable_norm`` reads those)."""
    return norm.sumsq is None and _norm_of_ready_row(norm, x)


def folded_sum(out: torch.Tensor, sumsq: torch.Tensor | None) -> ResidualSum:
    """A producer's result once it added the residual: the residual stream, with its partial sums of squares for
    the consumers to read -- none with HIGHSPEED_FOLD_NORM=self, whose consumers take the sums themselves."""
    from highspeed.ops import norm as norm_ops

    return ResidualSum(out, None, None if norm_ops.FOLD_SELF else sumsq)


def fold_residual(residual: torch.Tensor | None, like: torch.Tensor, rows: int, cols: int) -> bool:
    """Whether a producer adds ``residual`` in its epilogue (and stores the sums of squares): always, unless
    HIGHSPEED_FOLD_NORM=0, which leaves the add to the next norm launch, as without the fold."""
    from highspeed.ops import norm as norm_ops

    return (norm_ops.FOLD_NORM and residual is not None and residual.dtype == like.dtype
            and residual.numel() == rows * cols and residual.shape[-1] == cols and residual.is_contiguous())
