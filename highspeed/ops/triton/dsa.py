"""DSA lightning indexer over the paged indexer-key cache (``dsa_topk_indices``), without host-side lengths.

One kernel writes every query's scores ``score[t, s] = sum_h w[t, h] * relu(scale * q[t, h] . k[s])`` into a
``[T, max_keys]`` fp32 buffer, ``-inf`` where ``s`` is not visible to ``t`` (later than the query, or past the
buffer's width); ``torch.topk`` then picks the best ``topk`` columns and non-finite picks become -1. Lengths come
only from device tensors (``seq_lens_t``, ``query_start_loc``, block tables) and the buffer's width from the
host-known bound ``ctx.max_seq_len`` (max_model_len inside a captured decode graph), so the whole op captures.

A program owns ``BLOCK_Q`` query tokens of one sequence times all indexer heads (``BLOCK_Q * BLOCK_H`` rows of
``tl.dot``) and a chunk of ``tiles_per_prog`` key tiles; tiles wholly past the tile's last visible position are
only filled with ``-inf`` (no key reads), which is most of the buffer when a graph sizes it for max_model_len.
Queries are causal per sequence: query ``i`` of a sequence with ``q`` new tokens and ``s`` total sits at position
``s - q + i``. Every token row must belong to a sequence (``query_start_loc[-1] == T``), as the runner builds it.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import triton
import triton.language as tl

from highspeed.context import AttentionContext
from highspeed.ops.triton import interpreting, next_power_of_2

# Launch shapes, module-level so benchmarks/kernels.py can sweep them. block_n: keys per tile; max_rows: rows of
# the dot (query tokens x padded heads) per program when several query tokens share it (prefill); max_tiles: key
# tiles per program at most; programs_per_sm: how many programs the key range is split into, per SM, when that
# leaves each at least one tile. Not yet tuned on a GPU.
INDEXER = dict(block_n=64, num_warps=4, max_rows=128, prefill_warps=8, max_tiles=16, programs_per_sm=4)
# Largest score buffer per launch; longer prefills are scored and selected in windows of token rows.
MAX_SCORE_BYTES = 1 << 30


@lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


@triton.jit
def _indexer_scores_kernel(
    q_ptr, w_ptr, k_ptr, out_ptr,
    block_tables_ptr, seq_lens_ptr, query_start_ptr,
    scale, block_size, max_keys, tiles_per_prog, row_lo, row_hi,
    stride_qt, stride_qh, stride_wt, stride_kb, stride_ks, stride_ot, stride_bt,
    H: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr,
):
    seq = tl.program_id(0)
    q_tile = tl.program_id(1)
    chunk = tl.program_id(2)

    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    first = q_tile * BLOCK_Q
    n_rows = tl.minimum(q_len - first, BLOCK_Q)        # query tokens of this tile (<= 0: none)
    if n_rows <= 0:
        return
    if (q_start + first >= row_hi) | (q_start + first + n_rows <= row_lo):
        return                                          # outside this launch's window of rows
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_start = seq_len - q_len                         # position of the sequence's first new token
    last_visible = ctx_start + first + n_rows - 1       # the tile's last query sees keys 0..last_visible

    # Dot rows m = (query token qi, head hh); heads padded to BLOCK_H (masked rows get weight 0).
    m = tl.arange(0, BLOCK_Q * BLOCK_H)
    qi = first + m // BLOCK_H
    hh = m % BLOCK_H
    row_ok = (qi < q_len) & (hh < H)
    tok = (q_start + qi).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + tok[:, None] * stride_qt + hh[:, None].to(tl.int64) * stride_qh + d[None, :],
                mask=row_ok[:, None] & (d[None, :] < D), other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    w = tl.load(w_ptr + tok * stride_wt + hh, mask=row_ok, other=0.0)

    # Output rows: one per query token of the tile.
    oq = first + tl.arange(0, BLOCK_Q)
    o_tok = (q_start + oq).to(tl.int64)
    o_ok = (oq < q_len) & (o_tok >= row_lo) & (o_tok < row_hi)
    o_pos = ctx_start + oq
    o_rows = out_ptr + (o_tok - row_lo) * stride_ot

    lo = chunk * tiles_per_prog * BLOCK_N
    hi = tl.minimum(max_keys, lo + tiles_per_prog * BLOCK_N)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    compute_hi = tl.minimum(hi, last_visible + 1)
    for n0 in range(lo, compute_hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n <= last_visible
        blk = tl.load(bt_row + n // block_size, mask=n_ok, other=0).to(tl.int64)
        k_rows = k_ptr + blk * stride_kb + (n % block_size).to(tl.int64) * stride_ks
        k = tl.load(k_rows[:, None] + d[None, :], mask=n_ok[:, None] & (d[None, :] < D), other=0.0)
        if DOT_F32:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.maximum(s * scale, 0.0) * w[:, None]
        score = tl.sum(tl.reshape(s, (BLOCK_Q, BLOCK_H, BLOCK_N)), axis=1)
        visible = o_ok[:, None] & (n[None, :] <= o_pos[:, None])
        score = tl.where(visible, score, float("-inf"))
        tl.store(o_rows[:, None] + n[None, :], score, mask=o_ok[:, None] & (n[None, :] < hi))
    # Tiles past every query of this tile: nothing visible, no keys to read.
    fill_lo = lo + tl.cdiv(tl.maximum(compute_hi - lo, 0), BLOCK_N) * BLOCK_N
    neg = tl.full((BLOCK_Q, BLOCK_N), float("-inf"), dtype=tl.float32)
    for n0 in range(fill_lo, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        tl.store(o_rows[:, None] + n[None, :], neg, mask=o_ok[:, None] & (n[None, :] < hi))


def indexer_scores(
    q: torch.Tensor, weights: torch.Tensor, index_k_cache: torch.Tensor, ctx: AttentionContext, scale: float,
    max_keys: int, row_lo: int = 0, row_hi: int | None = None, cfg: dict | None = None,
) -> torch.Tensor:
    """fp32 ``[row_hi - row_lo, max_keys]``: the indexer scores of token rows ``row_lo:row_hi`` (default all),
    ``-inf`` at positions the query cannot see."""
    cfg = INDEXER if cfg is None else cfg
    T, H, D = q.shape
    row_hi = T if row_hi is None else row_hi
    out = torch.empty(row_hi - row_lo, max_keys, dtype=torch.float32, device=q.device)
    S = ctx.num_seqs
    if out.numel() == 0 or S == 0:
        return out.fill_(float("-inf"))
    if q.stride(-1) != 1:
        q = q.contiguous()
    if weights.dtype != torch.float32 or weights.stride(-1) != 1:
        weights = weights.float().contiguous()
    block_h = max(16, next_power_of_2(H))
    max_q = ctx.max_query_len or max(ctx.query_lens)
    block_q = 1 if max_q == 1 else max(1, min(next_power_of_2(max_q), cfg["max_rows"] // block_h))
    q_tiles = triton.cdiv(max_q, block_q)
    block_n = cfg["block_n"]
    n_tiles = triton.cdiv(max_keys, block_n)
    want = triton.cdiv(S * q_tiles * n_tiles, cfg["programs_per_sm"] * _num_sms(q.device))
    tiles_per_prog = max(1, min(cfg["max_tiles"], want))
    bt = ctx.block_tables
    grid = (S, q_tiles, triton.cdiv(n_tiles, tiles_per_prog))
    _indexer_scores_kernel[grid](
        q, weights, index_k_cache, out,
        bt, ctx.seq_lens_t, ctx.query_start_loc,
        float(scale), ctx.block_size, max_keys, tiles_per_prog, row_lo, row_hi,
        q.stride(0), q.stride(1), weights.stride(0), index_k_cache.stride(0), index_k_cache.stride(1),
        out.stride(0), bt.stride(0),
        H=H, D=D, BLOCK_H=block_h, BLOCK_D=max(16, next_power_of_2(D)), BLOCK_Q=block_q, BLOCK_N=block_n,
        DOT_F32=interpreting() or q.dtype == torch.float32,
        num_warps=cfg["num_warps"] if block_q == 1 else cfg["prefill_warps"],
    )
    return out


def _select(scores: torch.Tensor, topk: int) -> torch.Tensor:
    """int32 ``[rows, topk]``: the ``topk`` best columns of each row, -1 for non-finite picks and padding.
    Unsorted: attention takes the picks as a set, and torch's sort of the picks costs as much as the selection."""
    n = min(topk, scores.shape[1])
    values, idx = scores.topk(n, dim=-1, sorted=False)
    idx = torch.where(torch.isfinite(values), idx, -1).to(torch.int32)
    if n < topk:
        idx = torch.cat([idx, idx.new_full((idx.shape[0], topk - n), -1)], dim=-1)
    return idx


def dsa_topk_indices(
    q: torch.Tensor, weights: torch.Tensor, index_k_cache: torch.Tensor, ctx: AttentionContext, topk: int,
    scale: float,
) -> torch.Tensor:
    """int32 ``[T, topk]``: each query's ``topk`` highest-scoring visible positions of its own sequence, -1 padded
    (see ``highspeed.ops.dsa.dsa_topk_indices``; the picks of a row are in no particular order)."""
    if ctx.block_tables is None:
        raise ValueError("the Triton DSA indexer needs ctx.block_tables (a context with a KV cache)")
    T = q.shape[0]
    max_keys = ctx.max_seq_len or max(ctx.seq_lens, default=0)
    rows = max(1, MAX_SCORE_BYTES // (4 * max(1, max_keys)))
    if T <= rows:
        return _select(indexer_scores(q, weights, index_k_cache, ctx, scale, max_keys), topk)
    # Long prefill (eager only: a decode graph has at most a few hundred rows): bound the score buffer.
    return torch.cat([
        _select(indexer_scores(q, weights, index_k_cache, ctx, scale, max_keys, lo, min(T, lo + rows)), topk)
        for lo in range(0, T, rows)
    ])
