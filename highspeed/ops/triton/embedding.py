"""The token embedding gather as a Triton kernel, for the PDL chain (``highspeed.ops.triton.pdl``).

torch's index_select is a plain launch: the first GEMV (the first layer's projection, whose input norm it folds)
can launch only when the gather has finished. This gather lets its dependents launch at once. In the decode graph
that edge, from the graph's first kernel, did not take effect on the H200 (run 63: the GEMV still started 1.3 us
after the gather ended; not understood); the gather is shorter than index_select there, 1-2 us per step. Ids
outside ``[0, V)`` give zero rows (the torch reference raises)."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from highspeed.ops.triton import gdc_launch_dependents, gdc_wait, next_power_of_2, pdl

# HIGHSPEED_EMBED_KERNEL=0: torch's gather instead (A/B).
ON: bool = os.environ.get("HIGHSPEED_EMBED_KERNEL", "1") != "0"
BLOCK_H: int = 1024


@triton.jit
def _embedding_kernel(ids_ptr, w_ptr, out_ptr, V, H, stride_w, stride_o, BLOCK: tl.constexpr, PDL: tl.constexpr):
    if PDL:  # the ids may come from the kernel before (the graph's greedy tail writes them in the step before)
        gdc_launch_dependents()
        gdc_wait()
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    tok = tl.load(ids_ptr + t + tl.zeros([BLOCK], dtype=tl.int64)).to(tl.int64)   # the id in every lane
    ok = (tok >= 0) & (tok < V) & (cols < H)
    row = tl.load(w_ptr + tl.where(ok, tok, 0) * stride_w + cols, mask=ok, other=0.0)
    tl.store(out_ptr + t * stride_o + cols, row, mask=cols < H)


def embedding(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Same contract as ``highspeed.ops.embedding.embedding``."""
    if not ON or weight.dim() != 2 or weight.stride(-1) != 1 or ids.is_floating_point() or ids.device != weight.device:
        return F.embedding(ids, weight)
    V, H = weight.shape
    flat = ids.reshape(-1).contiguous()
    out = torch.empty(flat.numel(), H, dtype=weight.dtype, device=weight.device)
    if flat.numel():
        block = min(BLOCK_H, next_power_of_2(H))
        _embedding_kernel[(flat.numel(), triton.cdiv(H, block))](
            flat, weight, out, V, H, weight.stride(0), out.stride(0), BLOCK=block, num_warps=4, **pdl(weight))
    return out.reshape(*ids.shape, H)
