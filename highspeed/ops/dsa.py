"""DSA (DeepSeek-V3.2 / GLM-5) lightning-indexer references: which earlier tokens each query attends to.

``score[t, s] = sum_h w[t, h] * relu(scale * q[t, h] . k[s])`` over the causal positions ``s`` of the query's own
sequence; the ``topk`` best positions (0-based token index, -1 padded) restrict ``mla_attention``. The paged
reference loops over sequences on the host (it reads ``ctx.query_lens`` / ``ctx.seq_lens``); the Triton version
(``highspeed/ops/triton/dsa.py``) reads only device tensors, so it can run inside a captured CUDA graph.
"""
from __future__ import annotations

import torch

from highspeed.context import AttentionContext
from highspeed.ops.attention import _sequences, causal_mask, gather_sequence
from highspeed.ops.dispatch import triton_kernel


def indexer_topk(
    q: torch.Tensor, weights: torch.Tensor, k: torch.Tensor, topk: int, scale: float
) -> torch.Tensor:
    """DSA lightning-indexer selection for the last ``Tq`` positions of one sequence with keys ``k[S, D]``.

    ``score[t, s] = sum_h weights[t, h] * relu(scale * q[t, h] . k[s])`` over causal ``s``; returns the
    ``topk`` best positions per query as int32 ``[Tq, topk]``, padded with -1 where fewer are visible."""
    num_q, seq_len = q.shape[0], k.shape[0]
    logits = torch.relu((q.float() @ k.float().T) * scale)                   # [Tq, Hi, S]
    scores = (weights.float()[:, None, :] @ logits).squeeze(1)                # [Tq, S]
    allowed = causal_mask(num_q, seq_len, q.device)
    scores = scores.masked_fill(~allowed, float("-inf"))
    n = min(topk, seq_len)
    values, idx = scores.topk(n, dim=-1)
    idx = torch.where(torch.isfinite(values), idx, torch.full_like(idx, -1)).to(torch.int32)
    if n < topk:
        idx = torch.cat([idx, idx.new_full((num_q, topk - n), -1)], dim=-1)
    return idx


def dsa_topk_indices(
    q: torch.Tensor,
    weights: torch.Tensor,
    index_k_cache: torch.Tensor,
    ctx: AttentionContext,
    topk: int,
    scale: float,
) -> torch.Tensor:
    """Paged DSA indexer: ``q[T, Hi, D]`` (rope applied), ``weights[T, Hi]`` fp32 (already times Hi^-0.5),
    indexer keys cached as ``[num_blocks, block_size, D]``; returns int32 ``[T, topk]`` sequence positions
    (-1 padded) for ``mla_attention``. The new tokens' keys must already be written."""
    kernel = triton_kernel("dsa", "dsa_topk_indices", q)
    if kernel is not None:
        return kernel(q, weights, index_k_cache, ctx, topk, scale)
    out = torch.full((q.shape[0], topk), -1, dtype=torch.int32, device=q.device)
    for i, qs, qe, slen in _sequences(ctx):
        if qe == qs:
            continue
        k = gather_sequence(index_k_cache, ctx.block_tables[i], slen)
        out[qs:qe] = indexer_topk(q[qs:qe], weights[qs:qe], k, topk, scale)
    return out
