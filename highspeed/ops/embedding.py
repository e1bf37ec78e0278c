"""Token embedding lookup reference: ``weight[ids]``. On CUDA a Triton gather (``highspeed/ops/triton/
embedding.py``) that takes part in the PDL chain."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from highspeed.ops.dispatch import triton_kernel


def embedding(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``weight[ids]``: ``ids`` of any shape (integer), ``weight`` [V, H] -> ``[*ids.shape, H]`` in weight's dtype."""
    kernel = triton_kernel("embedding", "embedding", weight)
    if kernel is not None:
        return kernel(ids, weight)
    return F.embedding(ids, weight)
