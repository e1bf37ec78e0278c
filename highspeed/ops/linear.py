"""Dense projection reference: ``y = x @ W^T (+ b)``, optionally added to the residual stream. On CUDA, one-row
inputs (batch-1 decode) go to a Triton GEMV (``highspeed/ops/triton/linear.py``), which also folds a deferred
RMSNorm of its input and the residual add of its output (with the sums of squares the next norm needs);
everything else stays with cuBLAS."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from highspeed.ops.dispatch import triton_kernel
from highspeed.ops.norm import DeferredNorm, ResidualSum, materialize, unnormed


def linear(x: torch.Tensor | DeferredNorm, weight: torch.Tensor, bias: torch.Tensor | None = None,
           residual: torch.Tensor | None = None) -> torch.Tensor | ResidualSum:
    """``x[..., K] @ weight[N, K]^T + bias[N]`` in x's dtype (fp32 accumulation). ``x`` may be a ``DeferredNorm``:
    then the input is its output, and its ``residual_out`` is set. With ``residual`` (the residual stream, shaped
    like the output) the result is a ``ResidualSum`` of it and the product, the sum rounded to x's dtype once."""
    kernel = triton_kernel("linear", "linear", unnormed(x))
    if kernel is not None:
        return kernel(x, weight, bias, residual)
    y = F.linear(materialize(x), weight, bias)
    return y if residual is None else ResidualSum(y, residual)
