"""RMSNorm reference (HF semantics: normalise in fp32, cast back to the input dtype, then scale)."""
from __future__ import annotations

import torch

from highspeed.ops.dispatch import triton_kernel


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x / sqrt(mean(x^2) + eps))`` over the last dim."""
    kernel = triton_kernel("norm", "rms_norm", x)
    if kernel is not None:
        return kernel(x, weight, eps)
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add then RMSNorm: returns ``(rms_norm(x + residual), x + residual)``."""
    kernel = triton_kernel("norm", "add_rms_norm", x)
    if kernel is not None:
        return kernel(x, residual, weight, eps)
    s = x + residual
    return rms_norm(s, weight, eps), s
