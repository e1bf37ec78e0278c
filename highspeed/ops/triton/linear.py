"""Skinny GEMM for decode: ``y[M, N] = x[M, K] @ W[N, K]^T`` with M a handful of rows.

Two kernels, no split-K (deterministic, no second launch), each program owning some output columns over the
whole K range:
* M = 1 (batch-1 decode): ``_gemv_row_kernel``, multiply-and-reduce in registers with a few weight rows per
  program and double-buffered weight tiles;
* 1 < M <= MAX_ROWS: ``_gemv_kernel``, a software-pipelined ``tl.dot`` against the rows of x padded to 16 (the
  tensor cores' minimum; the padding costs nothing when the weights dominate the bytes).
Which shapes come here is measured (benchmarks/kernels.py ``linear``, KERNEL_NOTES.md): where N < K cuBLAS falls
back to split-K plus a reduce launch and loses; elsewhere cuBLAS stays unless ``ROW_ALL_SHAPES``. Weights above
``MAX_WEIGHT_BYTES`` stay with cuBLAS (GLM-5's 200 MB o_proj is at 92% of copy bandwidth there already).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from highspeed.ops.triton import gdc_launch_dependents, gdc_wait, interpreting, pdl

# Rows up to which the GEMV may run (above: cuBLAS), and the largest weight it takes.
MAX_ROWS: int = 16
MAX_WEIGHT_BYTES: int = 64 * 2**20
GEMV = dict(BLOCK_N=16, BLOCK_K=512, num_warps=4, num_stages=3)   # the fastest of six shapes on all N < K cases


# One row (batch-1 decode): a plain multiply-and-reduce GEMV, no tensor cores, BLOCK_N weight rows per program
# (many more programs than the 16-wide dot tiles allow) and software double-buffered weight tiles.
GEMV_ROW = dict(BLOCK_N=4, BLOCK_K=512, num_warps=4, PREFETCH=True)
ROW_ALL_SHAPES: bool = False    # also take N >= K shapes at M = 1 (else cuBLAS keeps them)


def use_gemv(M: int, N: int, K: int, weight: torch.Tensor) -> bool:
    small = weight.numel() * weight.element_size() <= MAX_WEIGHT_BYTES
    return 0 < M <= MAX_ROWS and small and (N < K or (M == 1 and ROW_ALL_SHAPES))


@triton.jit
def _gemv_row_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, N, K,
    stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:
        gdc_launch_dependents()
    m = tl.program_id(1).to(tl.int64)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    w_rows = w_ptr + n[:, None].to(tl.int64) * stride_wn
    x_row = x_ptr + m * stride_xm
    if PREFETCH:   # the first weight tile does not depend on the previous kernel: in flight before the wait
        k = tl.arange(0, BLOCK_K)
        w = tl.load(w_rows + k[None, :], mask=nmask[:, None] & (k < K)[None, :], other=0.0)
    if PDL:
        gdc_wait()
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        xv = tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32)
        if PREFETCH:
            kn = k + BLOCK_K
            w_next = tl.load(w_rows + kn[None, :], mask=nmask[:, None] & (kn < K)[None, :], other=0.0)
        else:
            w = tl.load(w_rows + k[None, :], mask=nmask[:, None] & (k < K)[None, :], other=0.0)
        acc += w.to(tl.float32) * xv[None, :]
        if PREFETCH:
            w = w_next
    y = tl.sum(acc, 1)
    if HAS_BIAS:
        y += tl.load(b_ptr + n, mask=nmask, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + n, y.to(y_ptr.dtype.element_ty), mask=nmask)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, M, N, K,
    stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_F32: tl.constexpr, PDL: tl.constexpr,
):
    if PDL:
        gdc_launch_dependents()
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    nmask = n < N
    mmask = m < M
    x_rows = x_ptr + m[:, None].to(tl.int64) * stride_xm
    w_rows = w_ptr + n[None, :].to(tl.int64) * stride_wn
    # Iteration 0 is peeled so its weight tile (independent of the previous kernel) loads before the PDL wait.
    k = tl.arange(0, BLOCK_K)
    kmask = k < K
    b = tl.load(w_rows + k[:, None], mask=kmask[:, None] & nmask[None, :], other=0.0)   # [BLOCK_K, BLOCK_N]
    if PDL:
        gdc_wait()
    a = tl.load(x_rows + k[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if DOT_F32:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < K
        a = tl.load(x_rows + k[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(w_rows + k[:, None], mask=kmask[:, None] & nmask[None, :], other=0.0)
        if DOT_F32:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + m[:, None].to(tl.int64) * stride_ym + n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as ``highspeed.ops.linear.linear``."""
    K = x.shape[-1]
    N = weight.shape[0]
    M = x.numel() // K if K else 0
    if (not use_gemv(M, N, K, weight) or weight.dim() != 2 or weight.stride(-1) != 1 or x.dtype != weight.dtype
            or x.dtype not in (torch.bfloat16, torch.float16, torch.float32) or x.requires_grad):
        return F.linear(x, weight, bias)
    x2 = x.reshape(M, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 1:
        cfg = GEMV_ROW
        _gemv_row_kernel[(triton.cdiv(N, cfg["BLOCK_N"]), M)](
            x2, weight, bias if bias is not None else weight, y, N, K,
            x2.stride(0), weight.stride(0), y.stride(0),
            HAS_BIAS=bias is not None, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], PREFETCH=cfg["PREFETCH"],
            num_warps=cfg["num_warps"], **pdl(x2),
        )
        return y.view(*x.shape[:-1], N)
    cfg = GEMV
    bn = cfg["BLOCK_N"]
    _gemv_kernel[(triton.cdiv(N, bn),)](
        x2, weight, bias if bias is not None else weight, y, M, N, K,
        x2.stride(0), weight.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=16, BLOCK_N=bn, BLOCK_K=cfg["BLOCK_K"],
        DOT_F32=interpreting() or x.dtype == torch.float32,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **pdl(x2),
    )
    return y.view(*x.shape[:-1], N)
