"""Skinny GEMM for decode: ``y[M, N] = x[M, K] @ W[N, K]^T`` with M a handful of rows.

Each program owns ``BLOCK_N`` output columns over the whole K range and streams its weight rows through a
software-pipelined ``tl.dot`` against the rows of x padded to 16 (the tensor cores' minimum; the padding costs
nothing when the weights dominate the bytes). No split-K, so the result is deterministic and needs no second
launch. H200 sweep (benchmarks/kernels.py ``linear``, CUDA-graph times, M = 1): cuBLAS is as fast or faster
where N >= K (Qwen3 qkv 6.4 vs 6.8 us, GLM-4.7-Flash q_b 4.5 vs 5.2 us, lm_head within 6%), but where N < K it
falls back to split-K plus a reduce launch and this kernel wins: Qwen3 o_proj 6.7 vs 7.8 us, GLM-4.7-Flash
o_proj 7.9 vs 8.9, its q_a+kv_a 4.3 vs 6.2, the shared expert's down 3.8 vs 4.3. So only those shapes come here
(and only up to ``MAX_WEIGHT_BYTES``: GLM-5's 200 MB o_proj is at 92% of copy bandwidth in cuBLAS already).
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


def use_gemv(M: int, N: int, K: int, weight: torch.Tensor) -> bool:
    return 0 < M <= MAX_ROWS and N < K and weight.numel() * weight.element_size() <= MAX_WEIGHT_BYTES


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
