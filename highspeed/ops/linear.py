"""Dense projection reference: ``y = x @ W^T (+ b)``. On CUDA, decode-sized inputs (a few rows) go to a Triton
GEMV (``highspeed/ops/triton/linear.py``); everything else stays with cuBLAS."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from highspeed.ops.dispatch import triton_kernel


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x[..., K] @ weight[N, K]^T + bias[N]`` in x's dtype (fp32 accumulation)."""
    kernel = triton_kernel("linear", "linear", x)
    if kernel is not None:
        return kernel(x, weight, bias)
    return F.linear(x, weight, bias)
