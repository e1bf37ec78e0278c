"""The end of the attention block at batch-1 decode as one op: split-KV attention partials merged per head and
multiplied by o_proj, without the merge launch between them.

Decode attention splits each head's keys over several programs, which leave fp32 partial outputs and their
log-sum-exps (``AttentionSplits``); normally a merge launch combines them and o_proj (a GEMV) follows. Here each
o_proj program merges only the heads whose columns it multiplies -- a group of HG heads -- so o_proj is split by
head groups into fp32 partial sums (``PartialSums``), which the post-attention norm adds up as it loads them
(``ops.norm.add_rms_norm``). One launch of the chain goes; nothing is atomic, so the result is deterministic.

Off unless HIGHSPEED_MERGE_O_PROJ=1 (an A/B switch until measured on a GPU; ``models/attention.py`` uses it).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from highspeed.ops.dispatch import triton_kernel
from highspeed.ops.norm import PartialSums

# HIGHSPEED_MERGE_O_PROJ=2 (a diagnostic): the merge launch stays and o_proj alone is split by head groups.
_MODE = os.environ.get("HIGHSPEED_MERGE_O_PROJ", "0")
MERGE_O_PROJ: bool = _MODE in ("1", "2")
AFTER_MERGE: bool = _MODE == "2"


@dataclass
class AttentionSplits:
    """Unmerged split-KV attention of T tokens: ``part[T, H, S, Dv]`` fp32 partial outputs and ``lse[T, H, S]``
    their log2-sum-exps (-inf: a split that saw no key); the output is their exp2(lse)-weighted mean, in
    ``dtype``."""

    part: torch.Tensor
    lse: torch.Tensor | None     # None: one split that is already the output (``part[:, :, 0]``)
    dtype: torch.dtype


def merge_splits(s: AttentionSplits) -> torch.Tensor:
    """The merged attention output ``[T, H, Dv]`` in ``s.dtype`` (what the merge launch writes)."""
    if s.lse is None:
        return s.part[:, :, 0].to(s.dtype)
    lse = s.lse.float()
    live = lse > float("-inf")
    mx = lse.max(dim=-1, keepdim=True).values
    mx = torch.where(mx == float("-inf"), torch.zeros_like(mx), mx)
    w = torch.where(live, torch.exp2(lse - mx), torch.zeros_like(lse))
    parts = torch.where(live[..., None], s.part.float(), torch.zeros_like(s.part, dtype=torch.float32))
    den = w.sum(-1)
    o = (parts * w[..., None]).sum(-2) / torch.where(den == 0, torch.ones_like(den), den)[..., None]
    return o.to(s.dtype)


def head_groups(num_heads: int, head_dim: int, max_groups: int = 8, max_cols: int = 2048, max_k: int = 8192) -> int:
    """Heads per group (HG): the smallest power of two dividing ``num_heads`` that leaves at most ``max_groups``
    groups (the partial sums the norm adds) with at most ``max_cols`` weight columns per group; 0 if none, or if
    o_proj's rows are longer than ``max_k`` (the batch-1 GEMV's whole-row preload bound: wider o_proj weights,
    e.g. GLM-4.5-Air's 100 MB, are not the latency-bound case this is for)."""
    if num_heads * head_dim > max_k:
        return 0
    hg = 1
    while hg <= num_heads:
        if num_heads % hg == 0 and num_heads // hg <= max_groups and hg * head_dim <= max_cols:
            return hg
        hg *= 2
    return 0


def merge_proj(s: AttentionSplits, weight: torch.Tensor, heads_per_group: int) -> PartialSums:
    """``merge_splits(s).reshape(T, H * Dv) @ weight[N, H * Dv]^T`` as ``PartialSums`` over the head groups:
    ``parts[g] = o[:, group g's heads] @ weight[:, group g's columns]^T`` in fp32."""
    kernel = triton_kernel("merge_proj", "merge_proj", s.part)
    if kernel is not None:
        return kernel(s, weight, heads_per_group)
    return merge_proj_torch(s, weight, heads_per_group)


def merge_proj_torch(s: AttentionSplits, weight: torch.Tensor, heads_per_group: int) -> PartialSums:
    """``merge_proj`` in torch (the reference, and the kernel's fallback for shapes it does not take)."""
    o = merge_splits(s)
    T, H, Dv = o.shape
    cols = heads_per_group * Dv
    flat = o.reshape(T, H * Dv).float()
    w = weight.float()
    parts = torch.stack([flat[:, g * cols:(g + 1) * cols] @ w[:, g * cols:(g + 1) * cols].T
                         for g in range(H // heads_per_group)])
    return PartialSums(parts, s.dtype)
