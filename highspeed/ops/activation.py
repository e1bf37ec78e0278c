"""Gated activation reference."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from highspeed.ops.dispatch import triton_kernel


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` where ``x[..., :I]`` is gate and ``x[..., I:]`` is up."""
    kernel = triton_kernel("activation", "silu_and_mul", x)
    if kernel is not None:
        return kernel(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
