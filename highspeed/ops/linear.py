"""Dense projection reference: ``y = x @ W^T (+ b)``. On CUDA, decode-sized inputs (a few rows) go to a Triton
GEMV (``highspeed/ops/triton/linear.py``), which can also run a deferred RMSNorm of its input in its prologue
(``HIGHSPEED_FUSE_NORM=1``); everything else stays with cuBLAS."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from highspeed.ops.dispatch import triton_kernel
from highspeed.ops.norm import DeferredNorm, materialize, unnormed


def linear(x: torch.Tensor | DeferredNorm, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x[..., K] @ weight[N, K]^T + bias[N]`` in x's dtype (fp32 accumulation). ``x`` may be a ``DeferredNorm``:
    then the input is its output, and its ``residual_out`` is set."""
    kernel = triton_kernel("linear", "linear", unnormed(x))
    if kernel is not None:
        return kernel(x, weight, bias)
    return F.linear(materialize(x), weight, bias)
