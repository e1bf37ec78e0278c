"""Attention references: KV-cache writes, paged GQA attention and absorbed MLA attention (the DSA indexer that
feeds MLA its top-k is in ``dsa.py``).

Layout shared by every paged op: a cache tensor is ``[num_blocks, block_size, *per_token_shape]``; token ``j`` of
sequence ``i`` lives in block ``ctx.block_tables[i, j // block_size]`` at offset ``j % block_size``. Sequence ``i``
owns query rows ``sum(query_lens[:i]) : sum(query_lens[:i+1])``, which are its last ``query_lens[i]`` positions of
``seq_lens[i]``; each query sees keys at positions <= its own (causal).

The references loop over sequences on the host (they read ``ctx.query_lens`` / ``ctx.seq_lens``); the Triton
kernels replace them on CUDA.
"""
from __future__ import annotations

import torch

from highspeed.context import AttentionContext
from highspeed.ops.dispatch import triton_kernel
from highspeed.ops.rope import rope_and_write_kv


def write_kv(cache: torch.Tensor, slot_mapping: torch.Tensor, values: torch.Tensor) -> None:
    """Store ``values[T, ...]`` at flat slots ``slot_mapping[T]`` (``block * block_size + offset``); -1 skips."""
    kernel = triton_kernel("attention", "write_kv", cache)
    if kernel is not None:
        return kernel(cache, slot_mapping, values)
    flat = cache.view(-1, *cache.shape[2:])
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        slot_mapping, values = slot_mapping[keep], values[keep]
    flat[slot_mapping.long()] = values.to(cache.dtype)


def gather_sequence(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first ``seq_len`` tokens of one sequence from a paged cache: ``[seq_len, *per_token_shape]``."""
    block_size = cache.shape[1]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = block_table[:num_blocks].long()
    return cache[blocks].reshape(num_blocks * block_size, *cache.shape[2:])[:seq_len]


def causal_mask(num_queries: int, seq_len: int, device: torch.device | str) -> torch.Tensor:
    """``[num_queries, seq_len]`` bool: the queries are the last ``num_queries`` positions of ``seq_len``."""
    q_pos = torch.arange(seq_len - num_queries, seq_len, device=device)
    return torch.arange(seq_len, device=device)[None, :] <= q_pos[:, None]


def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, allowed: torch.Tensor
) -> torch.Tensor:
    """Softmax attention of ``q[Tq, Hq, D]`` over ``k[S, Hk, D]``, ``v[S, Hk, Dv]`` (GQA: Hq = g * Hk, head h
    reads kv head h // g) where ``allowed[Tq, S]`` is True. Scores and softmax in fp32. Returns ``[Tq, Hq, Dv]``."""
    num_q, hq, _ = q.shape
    hk = k.shape[1]
    # matmul, not einsum: einsum is ~1000x slower for these small shapes on CPU torch builds.
    qg = q.reshape(num_q, hk, hq // hk, q.shape[-1]).permute(1, 2, 0, 3).float()  # [Hk, g, Tq, D]
    scores = (qg @ k.permute(1, 2, 0)[:, None].float()) * scale                    # [Hk, g, Tq, S]
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    out = probs @ v.permute(1, 0, 2)[:, None]                                      # [Hk, g, Tq, Dv]
    return out.permute(2, 0, 1, 3).reshape(num_q, hq, v.shape[-1])


def _sequences(ctx: AttentionContext):
    start = 0
    for i, (qlen, slen) in enumerate(zip(ctx.query_lens, ctx.seq_lens)):
        yield i, start, start + qlen, slen
        start += qlen


def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, ctx: AttentionContext, scale: float
) -> torch.Tensor:
    """Causal GQA attention of ``q[T, Hq, D]`` over each sequence's cached keys/values -> ``[T, Hq, Dv]``.

    The new tokens' keys/values must already be written (``write_kv``)."""
    kernel = triton_kernel("attention", "paged_attention", q)
    if kernel is not None:
        return kernel(q, k_cache, v_cache, ctx, scale)
    out = q.new_empty(q.shape[0], q.shape[1], v_cache.shape[-1])
    for i, qs, qe, slen in _sequences(ctx):
        if qe == qs:
            continue
        k = gather_sequence(k_cache, ctx.block_tables[i], slen)
        v = gather_sequence(v_cache, ctx.block_tables[i], slen)
        out[qs:qe] = dense_attention(q[qs:qe], k, v, scale, causal_mask(qe - qs, slen, q.device))
    return out


def rope_paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
    rotary_dim: int, interleaved: bool, k_cache: torch.Tensor, v_cache: torch.Tensor, ctx: AttentionContext,
    scale: float, q_norm_weight: torch.Tensor | None = None, k_norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """GQA attention from the raw projections: ``rope_and_write_kv`` (optional QK-norm, RoPE, the new k/v into the
    cache at ``ctx.slot_mapping``) then ``paged_attention`` of the rotated q -> ``[T, Hq, Dv]``.

    On CUDA at decode this is one attention launch (plus the split merge): each program normalises and rotates its
    own query rows, and the program whose key range holds the new token builds that key and value in registers and
    writes them to the cache. It saves the RoPE launch, a few microseconds of fixed latency per layer at batch 1."""
    kernel = triton_kernel("attention", "rope_paged_attention", q)
    if kernel is not None:
        return kernel(q, k, v, positions, cos_sin, rotary_dim, interleaved, k_cache, v_cache, ctx, scale,
                      q_norm_weight, k_norm_weight, eps)
    q_rot, _ = rope_and_write_kv(q, k, v, positions, cos_sin, rotary_dim, interleaved, k_cache, v_cache,
                                 ctx.slot_mapping, q_norm_weight, k_norm_weight, None, eps)
    return paged_attention(q_rot, k_cache, v_cache, ctx, scale)


def topk_mask(topk_indices: torch.Tensor, seq_len: int) -> torch.Tensor:
    """``[Tq, seq_len]`` bool with True at the selected positions (entries of -1 select nothing)."""
    # Unused slots (-1) go to an extra column that is dropped, so they never overwrite a real selection.
    idx = torch.where(topk_indices >= 0, topk_indices.long(), torch.full_like(topk_indices, seq_len, dtype=torch.long))
    mask = torch.zeros(topk_indices.shape[0], seq_len + 1, dtype=torch.bool, device=topk_indices.device)
    return mask.scatter_(1, idx, True)[:, :seq_len]


def mla_attention(
    q: torch.Tensor,
    latent_cache: torch.Tensor,
    ctx: AttentionContext,
    scale: float,
    kv_lora_rank: int,
    topk_indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """Absorbed MLA: multi-query attention of ``q[T, H, L + R]`` over the cached ``[latent(L) | k_pe(R)]`` keys,
    with the latent itself as the value -> ``[T, H, L]``.

    ``topk_indices[T, k]`` (DSA) restricts each query to those positions of its own sequence (0-based token
    index; -1 = unused slot), on top of causality."""
    kernel = triton_kernel("attention", "mla_attention", q)
    if kernel is not None:
        return kernel(q, latent_cache, ctx, scale, kv_lora_rank, topk_indices)
    out = q.new_empty(q.shape[0], q.shape[1], kv_lora_rank)
    for i, qs, qe, slen in _sequences(ctx):
        if qe == qs:
            continue
        kv = gather_sequence(latent_cache, ctx.block_tables[i], slen)[:, None, :]
        allowed = causal_mask(qe - qs, slen, q.device)
        if topk_indices is not None:
            allowed = allowed & topk_mask(topk_indices[qs:qe], slen)
        out[qs:qe] = dense_attention(q[qs:qe], kv, kv[..., :kv_lora_rank], scale, allowed)
    return out

