"""RMSNorm, and RMSNorm fused with the residual add that precedes it in every decoder block.

One program per row; the row stays in registers between the sum of squares and the scaling, so ``rms_norm``
reads x once and writes y once, and ``add_rms_norm`` reads x and residual once and writes the sum and y once
(three round trips through memory instead of the five the unfused add + norm need).
Rounding follows transformers' RMSNorm: statistics in fp32, the normalised row cast back to the input dtype,
then multiplied by the weight. The end of the file holds the same norm as the prologue of another kernel
(``DeferredNorm``), which saves its launch at batch-1 decode.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from highspeed.ops.norm import DeferredNorm
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
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / N + eps)
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
# The same norm as the prologue of a consumer kernel (``DeferredNorm``: the batch-1 GEMV, the decode MoE router).
# Each program of the consumer reads the whole row (a few thousand elements, in L2) for its sum of squares, then
# normalises each tile of it as its main loop reaches it, with the rounding steps of ``_rms_norm_kernel``.
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def norm_prologue_rstd(x_row, res_row, sum_row, K, eps, STORE_SUM, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    """``1 / rms(s)`` of the row ``s = x + residual`` (rounded to x's dtype) or ``s = x``; stores s at ``sum_row``
    where ``STORE_SUM`` (one program per row should). Only after the PDL wait: x and residual are activations."""
    ss = tl.full([], 0.0, tl.float32)   # a scalar: a [BLOCK] accumulator would hold BLOCK / threads more registers
    for k0 in range(0, K, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        kmask = k < K
        s = tl.load(x_row + k, mask=kmask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(res_row + k, mask=kmask, other=0.0)
            s = (s.to(tl.float32) + r.to(tl.float32)).to(x_row.dtype.element_ty)
            if STORE_SUM:
                tl.store(sum_row + k, s, mask=kmask)
        sf = s.to(tl.float32)
        ss += tl.sum(sf * sf, 0)
    return 1.0 / tl.sqrt(ss / K + eps)


@triton.jit
def norm_prologue_tile(x_row, res_row, nw_ptr, k, kmask, rstd, HAS_RESIDUAL: tl.constexpr):
    """Columns ``k`` of the normalised row, in fp32 but holding exactly the x-dtype values ``rms_norm`` returns."""
    s = tl.load(x_row + k, mask=kmask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_row + k, mask=kmask, other=0.0)
        s = (s.to(tl.float32) + r.to(tl.float32)).to(x_row.dtype.element_ty)
    normed = (s.to(tl.float32) * rstd).to(x_row.dtype.element_ty).to(tl.float32)
    w = tl.load(nw_ptr + k, mask=kmask, other=0.0).to(tl.float32)
    return (normed * w).to(x_row.dtype.element_ty).to(tl.float32)


@triton.jit
def norm_onepass_tile(x_row, res_row, sum_row, nw_ptr, k, kmask, STORE_SUM, HAS_RESIDUAL: tl.constexpr):
    """One pass of a consumer that can scale its result by ``rstd`` at the end (the batch-1 GEMV: ``W @ norm(s) =
    rstd * W @ (g * s)``): columns ``k`` of ``g * s`` in fp32 and their sum of squares of ``s``, with ``s = x +
    residual`` (rounded to x's dtype, stored at ``sum_row`` where the int ``STORE_SUM`` is not 0) or ``s = x``. Unlike
    ``norm_prologue_tile`` it skips rms_norm's two roundings to x's dtype (bf16: a few 1e-3 relative per element,
    the size of bf16 noise; fp32: none), and saves the sum-of-squares pass before the main loop: H200 run 6c
    measured that pass at +2.4 us per GEMV, more than the norm launch it replaced."""
    s = tl.load(x_row + k, mask=kmask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_row + k, mask=kmask, other=0.0)
        s = (s.to(tl.float32) + r.to(tl.float32)).to(x_row.dtype.element_ty)
        tl.store(sum_row + k, s, mask=kmask & ((k * 0 + STORE_SUM) != 0))   # block mask (the interpreter's rule)
    sf = s.to(tl.float32)
    g = tl.load(nw_ptr + k, mask=kmask, other=0.0).to(tl.float32)
    return sf * g, tl.sum(sf * sf, 0)


def norm_prologue_block(K: int, cap: int) -> int:
    """Chunk of the sum-of-squares pass: the whole row in one load when it fits ``cap`` (one L2 round trip on the
    critical path after the PDL wait), else ``cap`` per step. Each consumer's launch shape sets the cap so that the
    pass does not raise its register count much (more registers, fewer resident programs)."""
    return min(next_power_of_2(K), cap)


# Whether the consumers run a DeferredNorm in their prologue. Off unless HIGHSPEED_FUSE_NORM=1: on the H200 (run 6d,
# batch-1 graph replay) the prologue made decode slower, not faster -- Qwen3-30B-A3B 2.85 ms with it against 2.64 ms
# with separate norm launches, GLM-4.7-Flash 3.40 against 3.35 ms. (The first, two-pass GEMV prologue: 2.72 ms on
# Qwen3 in run 6c; its profile had each GEMV +2.4 us and the router +1.1 us against the 1.5 us norm launch saved.)
# Without it, every DeferredNorm is one norm launch followed by the same kernels as before.
FUSE_NORM: bool = os.environ.get("HIGHSPEED_FUSE_NORM", "0") == "1"


def fusable_norm(norm: DeferredNorm, x: torch.Tensor) -> bool:
    """Whether a kernel can run this ``DeferredNorm`` (of input ``x``) in its prologue."""
    r, w = norm.residual, norm.weight
    return (FUSE_NORM and not norm.needs_grad() and w.dtype == x.dtype and w.shape == x.shape[-1:] and w.is_contiguous()
            and (r is None or (r.dtype == x.dtype and r.shape == x.shape and r.stride(-1) == 1)))
