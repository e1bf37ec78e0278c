"""``merge_proj`` on the GPU: o_proj by head groups, each program merging its group's split-KV partials itself.

A program owns BLOCK_N output rows of one head group g and one token: before the PDL wait it loads its whole
weight tile ``W[rows, g's HG * Dv columns]`` (like the batch-1 GEMV, so o_proj's weights stream in while
attention runs); after it, for each of the group's heads, the split partials and log-sum-exps (one round trip,
all independent loads), the merge exactly as ``_combine_kernel`` does it (rounded to the model dtype), and the
product. Its fp32 sums go to ``parts[g, t, rows]`` for the next norm to add up.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from highspeed.ops.merge_proj import AttentionSplits, merge_proj_torch
from highspeed.ops.norm import PartialSums
from highspeed.ops.triton import gdc_launch_dependents, gdc_wait, next_power_of_2, pdl

WEIGHT_ELEMS: int = 8192   # weights per program, as the GEMV's whole-row preload (linear.py GEMV_WHOLE)


@triton.jit
def _merge_proj_kernel(
    part_ptr, lse_ptr, w_ptr, out_ptr, N, num_splits,
    stride_pt, stride_ph, stride_ps, stride_lt, stride_lh, stride_wn, stride_og, stride_ot,
    HG: tl.constexpr, D_V: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr, MERGED: tl.constexpr,
    PDL: tl.constexpr,
):
    # MERGED: part holds the merged output itself (one split, no lse): only the split o_proj runs.
    if PDL:
        gdc_launch_dependents()
    g = tl.program_id(1)
    t = tl.program_id(2).to(tl.int64)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    k = tl.arange(0, HG * D_V)
    w_rows = w_ptr + n[:, None].to(tl.int64) * stride_wn + g * (HG * D_V)
    w = tl.load(w_rows + k[None, :], mask=nmask[:, None], other=0.0)   # a parameter: before the wait
    if PDL:
        gdc_wait()
    sp = tl.arange(0, BLOCK_S)
    smask = sp < num_splits
    dv = tl.arange(0, D_V)
    hh = tl.arange(0, HG)
    o = tl.zeros([HG, D_V], dtype=tl.float32)
    for h in tl.static_range(HG):
        head = (g * HG + h).to(tl.int64)
        if MERGED:
            oh = tl.load(part_ptr + t * stride_pt + head * stride_ph + dv).to(tl.float32)
        else:
            lse = tl.load(lse_ptr + t * stride_lt + head * stride_lh + sp, mask=smask, other=float("-inf"))
            parts = tl.load(part_ptr + t * stride_pt + head * stride_ph + sp[:, None] * stride_ps + dv[None, :],
                            mask=smask[:, None], other=0.0)
            live = lse > float("-inf")
            mx = tl.max(lse, 0)
            wt = tl.where(live, tl.exp2(lse - tl.where(mx == float("-inf"), 0.0, mx)), 0.0)
            parts = tl.where(live[:, None], parts, 0.0)
            den = tl.sum(wt, 0)
            oh = tl.sum(parts * wt[:, None], 0) / tl.where(den == 0.0, 1.0, den)
            oh = oh.to(w_ptr.dtype.element_ty).to(tl.float32)   # the merged output's rounding (the model dtype)
        o = tl.where(hh[:, None] == h, oh[None, :], o)
    x = tl.reshape(o, [HG * D_V])
    acc = tl.sum(w.to(tl.float32) * x[None, :], 1)
    tl.store(out_ptr + g * stride_og + t * stride_ot + n, acc, mask=nmask)


def merge_proj(s: AttentionSplits, weight: torch.Tensor, heads_per_group: int) -> PartialSums:
    """Same contract as ``highspeed.ops.merge_proj.merge_proj``."""
    T, H, S, Dv = s.part.shape
    N = weight.shape[0]
    hg = heads_per_group
    if (weight.dim() != 2 or weight.shape[1] != H * Dv or weight.stride(-1) != 1 or weight.dtype != s.dtype
            or s.part.stride(-1) != 1 or (s.lse is not None and s.lse.stride(-1) != 1) or H % hg
            or Dv != next_power_of_2(Dv)
            or hg != next_power_of_2(hg) or hg * Dv > WEIGHT_ELEMS):
        return merge_proj_torch(s, weight, hg)
    groups = H // hg
    out = torch.empty(groups, T, N, dtype=torch.float32, device=s.part.device)
    block_n = max(1, WEIGHT_ELEMS // (hg * Dv))
    lse = s.lse if s.lse is not None else s.part   # unused pointer when MERGED
    _merge_proj_kernel[(triton.cdiv(N, block_n), groups, T)](
        s.part, lse, weight, out, N, S,
        s.part.stride(0), s.part.stride(1), s.part.stride(2), lse.stride(0), lse.stride(1),
        weight.stride(0), out.stride(0), out.stride(1),
        HG=hg, D_V=Dv, BLOCK_S=next_power_of_2(S), BLOCK_N=block_n, MERGED=s.lse is None, num_warps=4,
        **pdl(s.part),
    )
    return PartialSums(out, s.dtype)
