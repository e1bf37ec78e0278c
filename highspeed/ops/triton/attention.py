"""Attention over the paged KV cache: GQA (``paged_attention``), absorbed MLA with optional DSA top-k
(``mla_attention``), and the cache write (``write_kv``).

One flash-attention kernel serves every case. A program owns ``BLOCK_Q`` query tokens of one sequence times
``HEADS`` query heads that share one KV head (GQA group, or a block of MLA heads, which all share the latent),
so each K/V tile read from the cache feeds ``BLOCK_Q * HEADS`` rows of ``tl.dot``. Keys are split into a part A
and an optional part B (MLA: ``c`` and ``k_pe``), and for MLA the values are part A of the keys themselves
(``V_IS_K``), so the latent is read once per tile. Decode (one query per sequence) at small batch has too few
programs to fill the GPU, so the key range is split over ``num_splits`` programs (flash-decoding) whose partial
results are merged with their log-sum-exps, by ``_combine_kernel`` or, when the partials of one program's rows are
small, inside the same launch by whichever split finishes last (``FUSED_MERGE``, see ``_split_counters``).

The grid and the split count depend only on host-known shapes (``ctx.max_seq_len``, the batch): inside a CUDA
graph the real lengths exist only on the device (``ctx.seq_lens_t``). Splits that start past a sequence's real
length exit at once and the merge skips them, so a graph sized for ``max_model_len`` pays little for short
sequences. Such small decode launches move a few KB each, so their time is the chain of dependent memory round
trips; pure decode launches (one query per sequence, no top-k) take the kernel's ``DECODE`` path, which issues
every load that depends on no other load first (``DECODE_FAST``).

Queries are causal per sequence: query ``i`` of a sequence with ``q`` new tokens and ``s`` total sits at position
``s - q + i`` and sees keys ``0..s - q + i``. With ``topk_indices`` (DSA) a query sees only the listed positions
(``-1`` = unused slot), still at most its own position.
"""
from __future__ import annotations

import math
import os
from functools import lru_cache

import torch
import triton
import triton.language as tl

from highspeed.context import AttentionContext
from highspeed.ops.triton import (EARLY_CTX_ATTN, gdc_launch_dependents, gdc_wait, interpreting, next_power_of_2,
                                  pdl, tuned)
from highspeed.ops.triton import rope as t_rope
from highspeed.ops.triton.rope import _rope_lanes, _rope_tile

_LOG2E = 1.4426950408889634

# Launch shapes, module-level so benchmarks/kernels.py can sweep them. heads: query heads per program (rows of the
# dot with BLOCK_Q = 1); block_n: keys per tile; max_rows: rows per program when several query tokens share it
# (prefill); num_stages: software-pipelining depth (None = Triton's default).
# decode_min_block_n: the smallest key tile decode may split down to (H200 run 5, Qwen3-30B-A3B B=1 at 384 keys:
# 12 x 32-key splits 5.1 us, 24 x 16 9.0 us, 6 x 64 6.8 us; at 128 keys 32 is also best).
# HIGHSPEED_TUNE_ATTN_GQA / HIGHSPEED_TUNE_ATTN_MLA_FEW_SEQS="decode_min_block_n=.." etc. for A/Bs in the decode chain.
GQA = tuned("ATTN_GQA", dict(heads=64, block_n=64, num_warps=4, max_rows=64, num_stages=None, decode_min_block_n=32))
# Decode of few sequences (fewer than MLA_FEW_SEQS, below) changes these GQA keys: 8 warps (177 registers against
# 247 on Triton 3.6). H200, Qwen3-30B-A3B batch-1 decode chain at 384 keys: 2.379 against 2.402 ms per step (run
# 30), 2.370 against 2.395 (run 32; attention 7.16 -> 6.10 us per layer in the timeline), 2.372 against 2.400
# (run 33); GLM-4.5-Air 3.570 against 3.569 (run 34). Two pipeline stages instead of Triton's default three (the
# decode splits are one key tile each at short contexts, so the stages only shape the first tile's loads): Qwen3
# 2.164 / 2.164 against 2.178 / 2.176 (run 56; attention 5.93 -> 5.64 us per layer); four stages 2.459 / 2.457.
GQA_DECODE_FEW_SEQS = tuned("ATTN_GQA_DECODE_FEW_SEQS", dict(num_warps=8, num_stages=2))
# 512-wide latents (H200 run 2, GLM-5 shapes): all 64 heads in one program reads each latent tile once for every
# head: 2.2x faster than 16 heads at B=32 decode, 1.9x at prefill. With very few sequences the grid is then too
# small (the split count is capped), and 32 heads won at B=1 (83 vs 116 us at 32K context).
MLA_WIDE = dict(heads=64, block_n=32, num_warps=8, max_rows=64, num_stages=2)
MLA_WIDE_FEW_SEQS = tuned("ATTN_MLA_FEW_SEQS", dict(heads=32, block_n=32, num_warps=8, max_rows=32, num_stages=2,
                                                    decode_min_block_n=16))
MLA_FEW_SEQS: int = 8          # below this many (sequence, query-tile) pairs use MLA_WIDE_FEW_SEQS (measured: 1, 32)
# Few sequences over short contexts (at most MLA_SHORT_MAX_KEYS keys: a graph captured for a longer max_model_len
# keeps the rule above) with more than 16 heads: 16-head blocks with 32-key tiles, i.e. the same number of programs
# as 32-head blocks with 16-key tiles, but half the splits for the merge to read -- and no more padding rows for
# GLM-4.7-Flash's 20 heads (16 + 4 against 20 of 32). H200, batch-1 decode chain at 384 keys (runs 30-31):
# GLM-4.7-Flash 2.970 ms per step against 3.055 (twice), GLM-5 1.762 against 1.771; 16-head blocks alone 3.082,
# 32-key tiles alone 3.042-3.038; DeepSeek-V2-Lite's 16 heads (one block either way) got only the longer tiles:
# 2.171 against 2.130, hence the head bound. Long contexts re-read the latent once per head block (run 2, GLM-5
# shapes at 32K keys: 16 heads 118 us against 83 with 32), hence the key bound: at 2048 keys an extra block
# re-reads 2.4 MB, under a microsecond (the bound itself is not measured).
MLA_SHORT_FEW_SEQS = tuned("ATTN_MLA_SHORT_FEW_SEQS", dict(heads=16, block_n=32, num_warps=8, max_rows=32,
                                                           num_stages=2, decode_min_block_n=32))
MLA_SHORT_MAX_KEYS: int = 2048
MLA_NARROW = dict(heads=16, block_n=64, num_warps=4, max_rows=64, num_stages=None)  # small (test) latents
# Split-KV aims for this many programs per SM when the plain grid is smaller (H200 run 2, GQA B=1 at 32K context:
# 4/SM 43.5 us, 8/SM 43.5 us, 2/SM 54.3 us, 1/SM 83 us).
SPLIT_PROGRAMS_PER_SM = 4
MAX_KV_SPLITS = 64
# Prefill keeps >= 4 key tiles per split to amortise the merge. Decode (one query per sequence) splits down to one
# tile per program, and halves its key tile (not below DECODE_MIN_BLOCK_N) while the context has fewer tiles than
# the splits wanted: at batch 1 and a few hundred keys the old rule left 4 programs (GQA) walking every tile
# serially, 9 us per layer for Qwen3-30B-A3B on the H200, where one tile's latency is what a program should pay.
# Long contexts are unaffected: they already have >= 4 tiles per wanted split.
DECODE_MIN_BLOCK_N = 16
# Decode may merge inside the attention launch (no _combine_kernel launch) when one program's partials, padded to
# powers of two ([splits, rows, Dv] fp32), fit in this many elements: the last split to finish reads them all.
# Off (0): on the H200 (run 5) the fused merge cost more than the launch it saves -- Qwen3-30B-A3B B=1, 12 x
# 32-key splits: 8.6 us fused vs 5.1 us with _combine_kernel; 4 x 32 at 128 keys: 7.1 vs 4.4 us (timed alone;
# HIGHSPEED_FUSED_MERGE_MAX_ELEMS=8192 times it in the decode chain).
FUSED_MERGE_MAX_ELEMS = int(os.environ.get("HIGHSPEED_FUSED_MERGE_MAX_ELEMS", "0"))
# Decode launches (one query per sequence, no top-k) take the kernel's DECODE path: the token index is the sequence
# index, and every load that depends on no other is issued at once, so a program waits on two dependent memory
# round trips before its first dot instead of four to seven (~0.6-1 us each on the H200). Off
# (HIGHSPEED_ATTN_DECODE_FAST=0): the general path, as before (an A/B switch).
DECODE_FAST: bool = os.environ.get("HIGHSPEED_ATTN_DECODE_FAST", "1") != "0"
# The DECODE path loads the step's context (lengths, block table; with ROPE_NEW the position, slot and cos/sin)
# before its PDL wait (``EARLY_CTX_ATTN``; why that is safe, and what it measured: highspeed/ops/triton/__init__.py).
# When the split merge lets its dependent launch: at its start (it then preloads its weights while attention runs)
# or after its own wait, once attention has finished. The preload's traffic slows attention's few latency-bound
# loads; whether hiding the dependent's weights is worth that depends on their size (H200 run 25, batch 1):
#   MLA (the merge feeds W_UV, 5 MB in GLM-4.7-Flash): late 3.053 ms per step against 3.100;
#   GQA (it feeds o_proj, 17 MB in Qwen3-30B-A3B):    late 2.488 against 2.399 (attention -1.8 us per layer, but
#                                                       the merge +3.2: its loads queue behind o_proj's instead).
# HIGHSPEED_COMBINE_LATE_TRIGGER = mla (default) | 1 (always) | 0 (never).
_LATE_TRIGGER_ENV = os.environ.get("HIGHSPEED_COMBINE_LATE_TRIGGER", "mla")
# With EARLY_CTX the DECODE path also loads the per-head QK-norm weights (Qwen3) before its wait:
# parameters, like the RoPE table. H200 run 69: even (Qwen3-30B-A3B 2.067 / 2.066 ms per step against 2.066 / 2.069
# with them after the wait), as was its first K/V tile asked into L2 before the wait on top (2.065 / 2.066; also in
# run 58): the round trip after the wait is not set by these loads' HBM latency.


def combine_late_trigger(v_is_k: bool) -> bool:
    """Whether the merge of this attention (``v_is_k``: MLA, values are the latent keys) triggers late."""
    return _LATE_TRIGGER_ENV == "1" or (_LATE_TRIGGER_ENV == "mla" and v_is_k)


# The merge's launch shape: one program per (token, head, BLOCK_DV-wide slice of Dv), the slice halved (down to 32)
# until there are MIN_PROGRAMS programs. The merge is a latency-bound read of every split's partial; more, smaller
# programs issue those reads in parallel. H200 run 48, batch 1, decode chain: Qwen3-30B-A3B (32 heads x 128) 2.228
# ms per step with 128-wide slices, 2.196 with 64, 2.192 with 32; GLM-4.7-Flash (20 heads x 512) 2.919-2.921 with
# 128, 2.901-2.903 with 64, 2.973-2.974 with 256, 2.937-2.938 with 512 on 8 warps. HIGHSPEED_TUNE_COMBINE for A/Bs.
COMBINE = tuned("COMBINE", dict(BLOCK_DV=128, MIN_PROGRAMS=128, num_warps=4))


def combine_block_dv(rows: int, d_v: int) -> int:
    """The merge's Dv slice for ``rows`` (token, head) pairs of width ``d_v`` (see COMBINE)."""
    cdv = min(COMBINE["BLOCK_DV"], next_power_of_2(d_v))
    while cdv > 32 and rows * triton.cdiv(d_v, cdv) < COMBINE["MIN_PROGRAMS"]:
        cdv //= 2
    return cdv


_COUNTERS = 4096   # per device; a launch needs one per (query tile, head block) and splits only tiny grids


@lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


_counters: dict[torch.device, torch.Tensor] = {}


def _split_counters(device: torch.device, needed: int) -> torch.Tensor | None:
    """Zeroed int32 arrival counters for the fused merge, one per (query tile, head block); every launch leaves
    them zero again (the merging program resets its own), so one buffer per device serves every layer and graph
    replay. Launches on one device must not overlap in time (one stream). None when there are too few, or when the
    buffer would first be allocated inside a CUDA-graph capture (the eager warm-up allocates it): then the caller
    merges with _combine_kernel."""
    if needed > _COUNTERS:
        return None
    buf = _counters.get(device)
    if buf is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        buf = _counters[device] = torch.zeros(_COUNTERS, dtype=torch.int32, device=device)
    return buf


# ---- DECODE helpers: rope._rope_tile split into its loads and its arithmetic (sharing rope._rope_lanes), and one
# key tile's loads and its online-softmax step, so that the decode path can issue every load before the first
# value it waits for.

@triton.jit
def _write_new_kv(k_ptr, v_ptr, slot, block_size, kv_head, stride_kb, stride_ks, stride_kh,
                  stride_vb, stride_vs, stride_vh, k_new, v_new, da, dv, D_A: tl.constexpr, D_V: tl.constexpr):
    """The new token's key and value rows into the paged cache at ``slot`` (negative: a padded token, skipped)."""
    if slot >= 0:
        blk = slot // block_size
        off = slot % block_size
        tl.store(k_ptr + blk * stride_kb + off * stride_ks + kv_head * stride_kh + da[None, :], k_new,
                 mask=(da < D_A)[None, :])
        tl.store(v_ptr + blk * stride_vb + off * stride_vs + kv_head * stride_vh + dv[None, :], v_new,
                 mask=(dv < D_V)[None, :])


@triton.jit
def _rope_rows(rows, rmask, d, D, HALF: tl.constexpr, INTERLEAVED: tl.constexpr):
    """What rope._rope_tile loads of the rows before it needs the position: each element and its rotation partner,
    in their own dtype (_rope_apply widens them)."""
    pair, _, _, _ = _rope_lanes(d, HALF, INTERLEAVED)
    m = rmask & (d < D)[None, :]
    x = tl.load(rows + d[None, :], mask=m, other=0.0)
    xp = tl.load(rows + pair[None, :], mask=m, other=0.0)
    return x, xp


@triton.jit
def _rope_norm_weights(w_ptr, d, D, HALF: tl.constexpr, INTERLEAVED: tl.constexpr, NORM: tl.constexpr):
    """With NORM, the per-head norm weight at each lane and at its rotation partner (placeholders without: never
    read). A parameter: the DECODE path loads it before its PDL wait with the step's context (EARLY_CTX)."""
    pair, _, _, _ = _rope_lanes(d, HALF, INTERLEAVED)
    dm = d < D
    if NORM:
        w = tl.load(w_ptr + d, mask=dm, other=0.0)
        wp = tl.load(w_ptr + pair, mask=dm, other=0.0)
    else:
        w = d
        wp = pair
    return w, wp


@triton.jit
def _rope_cos_sin(cs_row, d, HALF: tl.constexpr, INTERLEAVED: tl.constexpr):
    """The position's cos and sin per lane, as rope._rope_tile loads them (1 and 0 on pass-through lanes)."""
    _, ci, _, rot = _rope_lanes(d, HALF, INTERLEAVED)
    cos = tl.load(cs_row + ci, mask=rot, other=1.0).to(tl.float32)
    sin = tl.load(cs_row + HALF + ci, mask=rot, other=0.0).to(tl.float32)
    return cos, sin


@triton.jit
def _rope_apply(x, xp, w, wp, cos, sin, d, eps, D, HALF: tl.constexpr, INTERLEAVED: tl.constexpr,
                NORM: tl.constexpr, ROUND_TY: tl.constexpr, OUT_TY: tl.constexpr):
    """rope._rope_tile's arithmetic on the values of _rope_loads / _rope_cos_sin, with the same roundings (the
    fused decode must give what the RoPE kernel would have written)."""
    _, _, neg, _ = _rope_lanes(d, HALF, INTERLEAVED)
    x = x.to(tl.float32)
    xp = xp.to(tl.float32)
    if NORM:
        rstd = (1.0 / tl.sqrt(tl.sum(x * x, 1) / D + eps))[:, None]
        # rope._norm_scale with the weight already loaded
        x = ((x * rstd).to(ROUND_TY).to(tl.float32) * w.to(tl.float32)[None, :]).to(OUT_TY).to(tl.float32)
        xp = ((xp * rstd).to(ROUND_TY).to(tl.float32) * wp.to(tl.float32)[None, :]).to(OUT_TY).to(tl.float32)
    return (x * cos[None, :] + xp * tl.where(neg, -sin, sin)[None, :]).to(OUT_TY)


@triton.jit
def _kv_tile(k_ptr, v_ptr, blk, n, n_ok, kv_head, block_size,
             stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, da, db, dv,
             D_A: tl.constexpr, D_B: tl.constexpr, D_V: tl.constexpr, V_IS_K: tl.constexpr):
    """Keys n's rows (in blocks blk; masked by n_ok, so no masked key's block entry is dereferenced): K part A, K
    part B and V, issued back to back so that they are in flight together. Placeholders for missing parts:
    kb = ka without part B (never read), v = ka with V_IS_K (the value)."""
    slot_off = (n % block_size).to(tl.int64)
    k_rows = k_ptr + blk * stride_kb + slot_off * stride_ks + kv_head * stride_kh
    ka = tl.load(k_rows[:, None] + da[None, :], mask=n_ok[:, None] & (da[None, :] < D_A), other=0.0)
    kb = ka
    if D_B > 0:
        kb = tl.load(k_rows[:, None] + D_A + db[None, :], mask=n_ok[:, None] & (db[None, :] < D_B), other=0.0)
    v = ka
    if not V_IS_K:
        v_rows = v_ptr + blk * stride_vb + slot_off * stride_vs + kv_head * stride_vh
        v = tl.load(v_rows[:, None] + dv[None, :], mask=n_ok[:, None] & (dv[None, :] < D_V), other=0.0)
    return ka, kb, v


@triton.jit
def _attend_tile(qa, qb, ka, kb, v, visible, qk_scale, m_i, l_i, acc, D_B: tl.constexpr, DOT_F32: tl.constexpr):
    """One key tile of the online softmax: (m_i, l_i, acc) updated with the keys where ``visible``. The same
    arithmetic in the same order as the general key loop in _paged_attn_kernel, so both paths give equal results."""
    if DOT_F32:
        s = tl.dot(qa.to(tl.float32), tl.trans(ka.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(qa, tl.trans(ka))
    if D_B > 0:
        if DOT_F32:
            s += tl.dot(qb.to(tl.float32), tl.trans(kb.to(tl.float32)), input_precision="ieee")
        else:
            s += tl.dot(qb, tl.trans(kb))
    s = tl.where(visible, s * qk_scale, float("-inf"))   # qk_scale includes log2(e): exp2 below
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # rows with nothing visible yet
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if DOT_F32:
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _paged_attn_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, part_ptr, lse_ptr, counter_ptr,
    block_tables_ptr, seq_lens_ptr, query_start_ptr, topk_ptr,
    kn_ptr, vn_ptr, pos_ptr, cs_ptr, slot_ptr, qw_ptr, kw_ptr, eps,
    qk_scale, group, block_size, num_keys_topk, tiles_per_split, num_head_blocks, num_splits, table_width,
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ot, stride_oh,
    stride_pt, stride_ph, stride_ps,
    stride_lt, stride_lh,
    stride_bt, stride_tt,
    stride_knt, stride_knh, stride_vnt, stride_vnh, stride_cs,
    D_A: tl.constexpr, D_B: tl.constexpr, D_V: tl.constexpr,
    BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_Q: tl.constexpr, HEADS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MERGE_M: tl.constexpr, MERGE_S: tl.constexpr,
    V_IS_K: tl.constexpr, USE_TOPK: tl.constexpr, SPLIT: tl.constexpr, FUSED_MERGE: tl.constexpr,
    DOT_F32: tl.constexpr, ROPE_NEW: tl.constexpr, HALF: tl.constexpr, INTERLEAVED: tl.constexpr,
    Q_NORM: tl.constexpr, K_NORM: tl.constexpr, PDL: tl.constexpr, DECODE: tl.constexpr, EARLY_CTX: tl.constexpr,
):
    if PDL:
        # Everything read here (lengths, tables, q, the cache, the counters) may come from the previous kernels --
        # except, with EARLY_CTX, the DECODE path's context loads, which wait below.
        gdc_launch_dependents()
        if not (DECODE and EARLY_CTX):
            gdc_wait()
    seq = tl.program_id(0)
    q_tile = tl.program_id(1)
    pid2 = tl.program_id(2)
    split = pid2 % num_splits
    hb = (pid2 // num_splits) % num_head_blocks
    kv_head = pid2 // (num_splits * num_head_blocks)

    if DECODE:
        # One query per sequence: the host launches this only when max_q == 1 and T == num_seqs, so
        # query_start_loc is arange(S + 1); the token is `seq`, q_len is 1, and every program has its query.
        # The loads are ordered for the shortest chain of dependent round trips (what a decode launch waits on,
        # with a few KB to move): first all that depend on no other load (seq_len, this split's first block-table
        # entries, q; with ROPE_NEW also the position, the slot, the new token's k/v rows and the norm weights),
        # then cos/sin (after the position) and the first K and V tile (after seq_len and the table) together.
        # Two round trips before the first dot, where the general path below chains four (GQA, MLA) to six or
        # seven (ROPE_NEW): query_start, seq_len, [position, cos/sin, slot,] table, K/V (sm_90 SASS, compiled
        # offline).
        tl.static_assert(not USE_TOPK)              # a top-k program's key positions are themselves loads
        tl.static_assert(not (ROPE_NEW and V_IS_K))  # the new token's value replaces a V tile, not part of K
        q_start = seq
        q_len = 1
        seq_len = tl.load(seq_lens_ptr + seq)
        keys_per_split = tiles_per_split * BLOCK_N
        lo = split * keys_per_split
        bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
        n_first = lo + tl.arange(0, BLOCK_N)
        # Masked only by the table row's width, so that it need not wait for seq_len: entries past the sequence's
        # end (padding, stale blocks) may be read here, but every K/V load masks its keys by hi (<= seq_len), so
        # none of them is dereferenced.
        blk_first = tl.load(bt_row + n_first // block_size, mask=n_first // block_size < table_width,
                            other=0).to(tl.int64)

        m = tl.arange(0, BLOCK_M)
        qi = q_tile * BLOCK_Q + m // HEADS
        hh = hb * HEADS + m % HEADS
        row_ok = (m < BLOCK_Q * HEADS) & (qi < q_len) & (hh < group)
        tok = (q_start + qi).to(tl.int64)
        head = kv_head * group + hh
        da = tl.arange(0, BLOCK_DA)
        db = tl.arange(0, BLOCK_DB)
        dv = tl.arange(0, BLOCK_DV)
        q_rows = q_ptr + tok[:, None] * stride_qt + head[:, None].to(tl.int64) * stride_qh
        if ROPE_NEW:
            t0 = seq.to(tl.int64)
            rope_pos = tl.load(pos_ptr + t0)
            slot = tl.load(slot_ptr + t0).to(tl.int64)
            if EARLY_CTX:
                cos, sin = _rope_cos_sin(cs_ptr + rope_pos.to(tl.int64) * stride_cs, da, HALF, INTERLEAVED)
                # The QK-norm weights too: parameters, like the RoPE table.
                qw, qwp = _rope_norm_weights(qw_ptr, da, D_A, HALF, INTERLEAVED, Q_NORM)
                kw, kwp = _rope_norm_weights(kw_ptr, da, D_A, HALF, INTERLEAVED, K_NORM)
        if PDL and EARLY_CTX:
            # The loads above -- the step's context (lengths, block table, position, slot) and the RoPE table --
            # are written by no kernel of a forward (host copies before it; inside a CUDA graph the greedy tail
            # writes them at the very end), so they were issued before the wait, and after it q, the new token's
            # k/v and the first K/V tile all go out in one round trip. Stores stay after the wait.
            gdc_wait()
        if ROPE_NEW:
            # The loads of rope._rope_tile for q and the new key, without the rotation, which needs cos/sin.
            qx, qxp = _rope_rows(q_rows, row_ok[:, None], da, D_A, HALF, INTERLEAVED)
            kx, kxp = _rope_rows(kn_ptr + t0 * stride_knt + kv_head * stride_knh, tl.full([1, 1], 1, tl.int1), da,
                                 D_A, HALF, INTERLEAVED)
            if not EARLY_CTX:
                qw, qwp = _rope_norm_weights(qw_ptr, da, D_A, HALF, INTERLEAVED, Q_NORM)
                kw, kwp = _rope_norm_weights(kw_ptr, da, D_A, HALF, INTERLEAVED, K_NORM)
            v_new = tl.load(vn_ptr + t0 * stride_vnt + kv_head * stride_vnh + dv[None, :],
                            mask=(dv < D_V)[None, :], other=0.0).to(v_ptr.dtype.element_ty)
            if not EARLY_CTX:
                cos, sin = _rope_cos_sin(cs_ptr + rope_pos.to(tl.int64) * stride_cs, da, HALF, INTERLEAVED)
        else:
            qa = tl.load(q_rows + da[None, :], mask=row_ok[:, None] & (da[None, :] < D_A), other=0.0)
        if D_B > 0:
            qb = tl.load(q_rows + D_A + db[None, :], mask=row_ok[:, None] & (db[None, :] < D_B), other=0.0)
        else:
            qb = da   # placeholder: _attend_tile reads qb only with D_B > 0

        # From here on seq_len is needed. Key range as in the general path, with the one query at seq_len - 1.
        ctx_start = seq_len - q_len
        q_pos = ctx_start + qi
        n_keys = seq_len
        hi = tl.minimum(n_keys, lo + keys_per_split)
        hi = tl.where(split == num_splits - 1, n_keys, hi)
        n_active = tl.maximum(tl.minimum((n_keys + keys_per_split - 1) // keys_per_split, num_splits), 1)
        if split >= n_active:
            if SPLIT and not FUSED_MERGE:
                tl.store(lse_ptr + tok * stride_lt + head.to(tl.int64) * stride_lh + split, float("-inf"),
                         mask=row_ok)
            return

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
        if ROPE_NEW:
            p_new = seq_len - 1
            qa = tl.zeros([BLOCK_M, BLOCK_DA], dtype=q_ptr.dtype.element_ty)   # rotated at the first tile
            k_new = tl.zeros([1, BLOCK_DA], dtype=k_ptr.dtype.element_ty)
        # One loop for every tile, so that Triton's software pipeliner still overlaps the tiles of long splits. It
        # issues the first tile's K and V just before the loop, after everything above; hence the block-table
        # entries run one tile ahead (the first tile's came with the first loads, each next tile's are loaded while
        # this tile's K/V are in flight), and q's rotation, which waits for cos/sin, is done inside the loop at the
        # first tile, while that tile's K/V are in flight (before the loop it would hold them back a round trip).
        blk = blk_first
        for n0 in range(lo, hi, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_ok = n < hi
            ka, kb, v = _kv_tile(k_ptr, v_ptr, blk, n, n_ok, kv_head, block_size, stride_kb, stride_ks, stride_kh,
                                 stride_vb, stride_vs, stride_vh, da, db, dv, D_A, D_B, D_V, V_IS_K)
            n_next = n + BLOCK_N
            blk = tl.load(bt_row + n_next // block_size, mask=n_next < hi, other=0).to(tl.int64)
            if ROPE_NEW:
                if n0 == lo:
                    qa = _rope_apply(qx, qxp, qw, qwp, cos, sin, da, eps, D_A, HALF, INTERLEAVED, Q_NORM,
                                     q_ptr.dtype.element_ty, q_ptr.dtype.element_ty)
                    k_new = _rope_apply(kx, kxp, kw, kwp, cos, sin, da, eps, D_A, HALF, INTERLEAVED, K_NORM,
                                        kn_ptr.dtype.element_ty, kn_ptr.dtype.element_ty).to(k_ptr.dtype.element_ty)
                is_new = (n == p_new)[:, None]   # its cache row is written below, after the loop
                ka = tl.where(is_new, k_new, ka)
                v = tl.where(is_new, v_new, v)
            visible = row_ok[:, None] & n_ok[None, :] & (n[None, :] <= q_pos[:, None])
            m_i, l_i, acc = _attend_tile(qa, qb, ka, kb, v, visible, qk_scale, m_i, l_i, acc, D_B, DOT_F32)
        if ROPE_NEW:
            # The new token's cache row, for later steps, by the program whose key range holds it. Only this
            # program reads that row in this launch, and it used k_new / v_new instead.
            if (lo <= p_new) & (p_new < hi):
                _write_new_kv(k_ptr, v_ptr, slot, block_size, kv_head, stride_kb, stride_ks, stride_kh,
                              stride_vb, stride_vs, stride_vh, k_new, v_new, da, dv, D_A, D_V)
    else:
        # The general path: prefill, DSA top-k, and decode with DECODE_FAST off (the A/B baseline).
        q_start = tl.load(query_start_ptr + seq)
        q_len = tl.load(query_start_ptr + seq + 1) - q_start
        if q_tile * BLOCK_Q >= q_len:
            return
        seq_len = tl.load(seq_lens_ptr + seq)
        ctx_start = seq_len - q_len            # position of the first new token

        # Row m of the tile = (query qi, head hh of this program's head block).
        m = tl.arange(0, BLOCK_M)
        qi = q_tile * BLOCK_Q + m // HEADS
        hh = hb * HEADS + m % HEADS
        row_ok = (m < BLOCK_Q * HEADS) & (qi < q_len) & (hh < group)
        tok = (q_start + qi).to(tl.int64)
        head = kv_head * group + hh
        q_pos = ctx_start + qi

        # Key range of this program: positions (or top-k slots) [lo, hi). The grid was sized on the host for the
        # longest possible context; splits starting past this tile's keys are inactive and leave at once (the merge
        # skips them). The last split also takes any keys past the planned range, so a max_seq_len that is too small
        # costs time, not correctness.
        if USE_TOPK:
            n_keys = num_keys_topk
        else:
            last_q = tl.minimum((q_tile + 1) * BLOCK_Q, q_len) - 1
            n_keys = ctx_start + last_q + 1
        keys_per_split = tiles_per_split * BLOCK_N
        lo = split * keys_per_split
        hi = tl.minimum(n_keys, lo + keys_per_split)
        hi = tl.where(split == num_splits - 1, n_keys, hi)
        n_active = tl.maximum(tl.minimum((n_keys + keys_per_split - 1) // keys_per_split, num_splits), 1)
        if split >= n_active:
            if SPLIT and not FUSED_MERGE:
                tl.store(lse_ptr + tok * stride_lt + head.to(tl.int64) * stride_lh + split, float("-inf"), mask=row_ok)
            return

        da = tl.arange(0, BLOCK_DA)
        dv = tl.arange(0, BLOCK_DV)
        q_rows = q_ptr + tok[:, None] * stride_qt + head[:, None].to(tl.int64) * stride_qh
        if ROPE_NEW:
            # Decode from the raw projections (GQA, one token per sequence, BLOCK_Q = 1): q gets its QK-norm and RoPE
            # here, and the new token's key and value are built in registers and stand in for its cache row, which
            # the program whose key range holds it also writes for later steps. No RoPE launch before this one.
            t0 = q_start.to(tl.int64)
            cs_row = cs_ptr + tl.load(pos_ptr + t0).to(tl.int64) * stride_cs
            qa = _rope_tile(q_rows, row_ok[:, None], da, cs_row, qw_ptr, eps, D_A, HALF, INTERLEAVED, Q_NORM,
                            q_ptr.dtype.element_ty)
            k_new = _rope_tile(kn_ptr + t0 * stride_knt + kv_head * stride_knh, tl.full([1, 1], 1, tl.int1), da,
                               cs_row, kw_ptr, eps, D_A, HALF, INTERLEAVED, K_NORM,
                               kn_ptr.dtype.element_ty).to(k_ptr.dtype.element_ty)
            v_new = tl.load(vn_ptr + t0 * stride_vnt + kv_head * stride_vnh + dv[None, :], mask=(dv < D_V)[None, :],
                            other=0.0).to(v_ptr.dtype.element_ty)
            p_new = seq_len - 1
            if (lo <= p_new) & (p_new < hi):
                slot = tl.load(slot_ptr + t0).to(tl.int64)
                _write_new_kv(k_ptr, v_ptr, slot, block_size, kv_head, stride_kb, stride_ks, stride_kh,
                              stride_vb, stride_vs, stride_vh, k_new, v_new, da, dv, D_A, D_V)
        else:
            qa = tl.load(q_rows + da[None, :], mask=row_ok[:, None] & (da[None, :] < D_A), other=0.0)
        if D_B > 0:
            db = tl.arange(0, BLOCK_DB)
            qb = tl.load(q_rows + D_A + db[None, :], mask=row_ok[:, None] & (db[None, :] < D_B), other=0.0)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
        bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
        for n0 in range(lo, hi, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_ok = n < hi
            if USE_TOPK:
                # All rows of a top-k program belong to one token (BLOCK_Q == 1).
                pos = tl.load(topk_ptr + (q_start + q_tile).to(tl.int64) * stride_tt + n, mask=n_ok, other=-1)
                n_ok = n_ok & (pos >= 0)
                pos = tl.where(n_ok, pos, 0)
            else:
                pos = n
            blk = tl.load(bt_row + pos // block_size, mask=n_ok, other=0).to(tl.int64)
            slot_off = (pos % block_size).to(tl.int64)
            k_rows = k_ptr + blk * stride_kb + slot_off * stride_ks + kv_head * stride_kh
            ka = tl.load(k_rows[:, None] + da[None, :], mask=n_ok[:, None] & (da[None, :] < D_A), other=0.0)
            if ROPE_NEW:   # the new token's row may not be in the cache yet (or be this launch's own write)
                is_new = (pos == p_new)[:, None]
                ka = tl.where(is_new, k_new, ka)
            if DOT_F32:
                s = tl.dot(qa.to(tl.float32), tl.trans(ka.to(tl.float32)), input_precision="ieee")
            else:
                s = tl.dot(qa, tl.trans(ka))
            if D_B > 0:
                kb = tl.load(k_rows[:, None] + D_A + db[None, :], mask=n_ok[:, None] & (db[None, :] < D_B), other=0.0)
                if DOT_F32:
                    s += tl.dot(qb.to(tl.float32), tl.trans(kb.to(tl.float32)), input_precision="ieee")
                else:
                    s += tl.dot(qb, tl.trans(kb))
            visible = row_ok[:, None] & n_ok[None, :] & (pos[None, :] <= q_pos[:, None])
            s = tl.where(visible, s * qk_scale, float("-inf"))   # qk_scale includes log2(e): exp2 below

            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # rows with nothing visible yet
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            if V_IS_K:
                v = ka
            else:
                v_rows = v_ptr + blk * stride_vb + slot_off * stride_vs + kv_head * stride_vh
                v = tl.load(v_rows[:, None] + dv[None, :], mask=n_ok[:, None] & (dv[None, :] < D_V), other=0.0)
                if ROPE_NEW:
                    v = tl.where(is_new, v_new, v)
            if DOT_F32:
                acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    o_mask = row_ok[:, None] & (dv[None, :] < D_V)
    out_ptrs = out_ptr + tok[:, None] * stride_ot + head[:, None].to(tl.int64) * stride_oh + dv[None, :]
    if SPLIT:
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
        part_ptrs = part_ptr + tok[:, None] * stride_pt + head[:, None].to(tl.int64) * stride_ph + dv[None, :]
        lse_ptrs = lse_ptr + tok * stride_lt + head.to(tl.int64) * stride_lh
        if FUSED_MERGE:
            if n_active == 1:
                # The only active split (a short sequence in a grid sized for a long one): nothing to merge.
                tl.store(out_ptrs, o.to(out_ptr.dtype.element_ty), mask=o_mask)
            else:
                tl.store(part_ptrs + split * stride_ps, o.to(part_ptr.dtype.element_ty), mask=o_mask)
                tl.store(lse_ptrs + split, lse, mask=row_ok)
                # Arrival count per (query tile, head block). The CTA barrier orders every thread's stores before
                # the one thread's acq_rel atomic (release is cumulative), so the program that sees the count
                # reach n_active - 1 also sees every partial. It merges them and resets the counter for the
                # next launch (stream order makes that visible to it).
                tl.debug_barrier()
                grp = (seq * tl.num_programs(1) + q_tile) * (tl.num_programs(2) // num_splits) + pid2 // num_splits
                arrived = tl.atomic_add(counter_ptr + grp, 1, sem="acq_rel", scope="gpu")
                if arrived == n_active - 1:
                    tl.store(counter_ptr + grp, 0)
                    tl.debug_barrier()
                    mm = tl.arange(0, MERGE_M)
                    qi2 = q_tile * BLOCK_Q + mm // HEADS
                    hh2 = hb * HEADS + mm % HEADS
                    ok2 = (mm < BLOCK_Q * HEADS) & (qi2 < q_len) & (hh2 < group)
                    tok2 = (q_start + qi2).to(tl.int64)
                    head2 = (kv_head * group + hh2).to(tl.int64)
                    sp = tl.arange(0, MERGE_S)
                    use = (sp[:, None] < n_active) & ok2[None, :]                       # [S, M]
                    # .cg: read the other programs' partials from L2, never from a stale L1 line.
                    lse_all = tl.load(lse_ptr + tok2[None, :] * stride_lt + head2[None, :] * stride_lh + sp[:, None],
                                      mask=use, other=float("-inf"), cache_modifier=".cg")
                    parts = tl.load(part_ptr + tok2[None, :, None] * stride_pt + head2[None, :, None] * stride_ph
                                    + sp[:, None, None] * stride_ps + dv[None, None, :],
                                    mask=use[:, :, None] & (dv[None, None, :] < D_V), other=0.0,
                                    cache_modifier=".cg").to(tl.float32)
                    mx = tl.max(lse_all, 0)
                    w = tl.exp2(lse_all - tl.where(mx == float("-inf"), 0.0, mx)[None, :])   # 0 for empty splits
                    den = tl.sum(w, 0)
                    merged = tl.sum(parts * w[:, :, None], 0) / tl.where(den == 0.0, 1.0, den)[:, None]
                    tl.store(out_ptr + tok2[:, None] * stride_ot + head2[:, None] * stride_oh + dv[None, :],
                             merged.to(out_ptr.dtype.element_ty), mask=ok2[:, None] & (dv[None, :] < D_V))
        else:
            tl.store(part_ptrs + split * stride_ps, o.to(part_ptr.dtype.element_ty), mask=o_mask)
            tl.store(lse_ptrs + split, lse, mask=row_ok)
    else:
        tl.store(out_ptrs, o.to(out_ptr.dtype.element_ty), mask=o_mask)


@triton.jit
def _combine_kernel(
    part_ptr, lse_ptr, out_ptr, num_heads, num_splits,
    stride_pt, stride_ph, stride_ps, stride_lt, stride_lh, stride_ot, stride_oh,
    D_V: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr, LATE_TRIGGER: tl.constexpr,
    PDL: tl.constexpr,
):
    """out[t, h, chunk] = the splits' partials weighted by exp2(lse); splits with lse = -inf (past the sequence's
    end, or nothing visible) are skipped and their partials never read."""
    if PDL:
        if not LATE_TRIGGER:
            gdc_launch_dependents()
        gdc_wait()
        if LATE_TRIGGER:
            gdc_launch_dependents()
    pid = tl.program_id(0)
    t = (pid // num_heads).to(tl.int64)
    h = (pid % num_heads).to(tl.int64)
    sp = tl.arange(0, BLOCK_S)
    dv = tl.program_id(1) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    lse = tl.load(lse_ptr + t * stride_lt + h * stride_lh + sp, mask=sp < num_splits, other=float("-inf"))
    live = lse > float("-inf")
    mx = tl.max(lse, 0)
    w = tl.where(live, tl.exp2(lse - tl.where(mx == float("-inf"), 0.0, mx)), 0.0)
    # Loaded without waiting for lse (one round trip, not two); dead splits' memory is unwritten, so drop it.
    parts = tl.load(part_ptr + t * stride_pt + h * stride_ph + sp[:, None] * stride_ps + dv[None, :],
                    mask=(sp[:, None] < num_splits) & (dv[None, :] < D_V), other=0.0)
    parts = tl.where(live[:, None], parts.to(tl.float32), 0.0)
    den = tl.sum(w, 0)
    o = tl.sum(parts * w[:, None], 0) / tl.where(den == 0.0, 1.0, den)
    tl.store(out_ptr + t * stride_ot + h * stride_oh + dv, o.to(out_ptr.dtype.element_ty), mask=dv < D_V)


def _merge_fits(splits: int, row_elems: int) -> bool:
    """Can the last split merge ``splits`` partials of ``row_elems`` (rows x Dv, padded) in its registers?"""
    return splits <= 1 or next_power_of_2(splits) * row_elems <= FUSED_MERGE_MAX_ELEMS


def _split_plan(max_keys: int, block_n: int, base_programs: int, decode: bool, row_elems: int, num_sms: int,
                forced: int | None = None, min_block_n: int = DECODE_MIN_BLOCK_N) -> tuple[int, int, int]:
    """(num_splits, block_n, tiles_per_split) for a grid of ``base_programs`` over at most ``max_keys`` keys.
    Host shapes only, so a CUDA graph captured for ``max_keys`` serves every shorter context."""
    def balanced(splits: int, tile: int) -> tuple[int, int]:   # (splits, tiles per split) after rounding
        n_tiles = max(1, triton.cdiv(max_keys, tile))
        per = triton.cdiv(n_tiles, max(1, min(splits, n_tiles)))
        return triton.cdiv(n_tiles, per), per

    if forced is not None:
        splits, per = balanced(int(forced), block_n)
        return splits, block_n, per
    # Split only when the grid would leave SMs idle.
    target = min(triton.cdiv(SPLIT_PROGRAMS_PER_SM * num_sms, base_programs), MAX_KV_SPLITS)
    if not decode:
        splits, per = balanced(max(1, min(target, triton.cdiv(max_keys, block_n) // 4)), block_n)
        return splits, block_n, per
    splits, per = balanced(target, block_n)
    while block_n > min_block_n:
        # Halve the key tile while that gives more splits, but not at the price of the fused merge: a merge
        # launch (~1.5 us) costs more than a 64-key tile's extra load time (~0.2 us; prediction, not measured).
        more, more_per = balanced(target, block_n // 2)
        if more <= splits or (_merge_fits(splits, row_elems) and not _merge_fits(more, row_elems)):
            break
        block_n, splits, per = block_n // 2, more, more_per
    return splits, block_n, per


# The split partials (each split's normalised output, merged with the log-sum-exps): fp32, or the queries' 16-bit
# dtype, which halves the bytes each split stores and the merge reads. An output rounded to 16 bits before the merge
# and again after it: about one more rounding of the result. H200, batch-1 decode chain (run 56, two passes):
# GLM-4.7-Flash (MLA, 20 heads x 512 latent: 480 KB of fp32 partials per layer) 2.823 / 2.824 ms per step against
# 2.834 / 2.838 (attention -0.3 us, W_UV -0.4, the merge +0.2 per layer); Qwen3-30B-A3B (32 x 128) 2.181 / 2.179
# against 2.178 / 2.176, even. HIGHSPEED_ATTN_PARTIALS = mla (default: 16-bit for MLA) | 16 (always) | 32 (never).
# fp32 queries keep fp32 partials.
_PARTIALS_ENV = os.environ.get("HIGHSPEED_ATTN_PARTIALS", "mla")


def _partial_dtype(q_dtype: torch.dtype, v_is_k: bool) -> torch.dtype:
    narrow = _PARTIALS_ENV == "16" or (_PARTIALS_ENV == "mla" and v_is_k)
    return q_dtype if narrow and q_dtype in (torch.bfloat16, torch.float16) else torch.float32


def _attend(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, ctx: AttentionContext, scale: float,
    *, num_kv_heads: int, d_a: int, d_b: int, d_v: int, v_is_k: bool, cfg: dict,
    topk_indices: torch.Tensor | None,
    kv_strides: tuple[int, int, int], v_strides: tuple[int, int, int], rope: dict | None = None,
) -> torch.Tensor:
    if ctx.block_tables is None:
        raise ValueError("Triton paged attention needs ctx.block_tables (a context with a KV cache)")
    T, Hq, _ = q.shape
    out = torch.empty(T, Hq, d_v, dtype=q.dtype, device=q.device)
    S = ctx.num_seqs
    if T == 0 or S == 0:
        return out
    group = Hq // num_kv_heads
    heads = min(cfg["heads"], group)
    block_n = cfg["block_n"]
    num_head_blocks = triton.cdiv(group, heads)
    max_q = ctx.max_query_len or max(ctx.query_lens)
    if topk_indices is not None:
        block_q = 1
        max_keys = topk_indices.shape[1]
    else:
        # Prefill: several query tokens per program so each K/V tile feeds up to max_rows rows of the dot.
        block_q = 1 if max_q == 1 else max(1, cfg["max_rows"] // heads)
        max_keys = ctx.max_seq_len or max(ctx.seq_lens)
    block_m = max(16, next_power_of_2(block_q * heads))
    q_tiles = triton.cdiv(max_q, block_q)
    base_programs = S * q_tiles * num_kv_heads * num_head_blocks
    decode = max_q == 1
    # DECODE needs query_start_loc == arange(S + 1), which the kernel then never reads. Host shapes prove it (and
    # hold inside a CUDA graph): with max_q == 1 each of the S sequences has at most one query token, so T == S
    # tokens means exactly one each (the runner's decode steps and graphs, highspeed/engine/runner.py).
    fast = DECODE_FAST and decode and T == S and topk_indices is None
    if fast:
        assert block_q == 1 and q_tiles == 1, (block_q, q_tiles)
    block_dv = max(16, next_power_of_2(d_v))
    merge_m = next_power_of_2(block_q * heads)

    num_splits, block_n, tiles_per_split = _split_plan(
        max_keys, block_n, base_programs, decode, merge_m * block_dv, _num_sms(q.device),
        ctx.extra.get("num_kv_splits") if ctx.extra else None, cfg.get("decode_min_block_n", DECODE_MIN_BLOCK_N))
    split = num_splits > 1
    merge_s = next_power_of_2(num_splits)
    counters = None
    if split and decode and _merge_fits(num_splits, merge_m * block_dv):
        counters = _split_counters(q.device, base_programs)
    fused = counters is not None
    if split:
        part = torch.empty(T, Hq, num_splits, d_v, dtype=_partial_dtype(q.dtype, v_is_k), device=q.device)
        lse = torch.empty(T, Hq, num_splits, dtype=torch.float32, device=q.device)
        p_strides, l_strides = (part.stride(0), part.stride(1), part.stride(2)), (lse.stride(0), lse.stride(1))
    else:
        part = lse = out  # unused
        p_strides, l_strides = (0, 0, 0), (0, 0)
    topk = topk_indices if topk_indices is not None else ctx.seq_lens_t
    topk_stride = topk_indices.stride(0) if topk_indices is not None else 0
    bt = ctx.block_tables
    grid = (S, q_tiles, num_kv_heads * num_head_blocks * num_splits)
    launch = {"num_warps": cfg["num_warps"], **pdl(q)}
    if cfg.get("num_stages") is not None:
        launch["num_stages"] = cfg["num_stages"]
    if rope is None:   # placeholders, never read
        r_ptrs, r_strides, r_eps = (q, q, q, q, q, q, q), (0, 0, 0, 0, 0), 0.0
        r_consts = dict(ROPE_NEW=False, HALF=1, INTERLEAVED=False, Q_NORM=False, K_NORM=False)
    else:
        k_new, v_new, cos_sin = rope["k"], rope["v"], rope["cos_sin"]
        qw, kw = rope["q_norm_weight"], rope["k_norm_weight"]
        r_ptrs = (k_new, v_new, rope["positions"], cos_sin, ctx.slot_mapping, q if qw is None else qw,
                  q if kw is None else kw)
        r_strides = (k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1), cos_sin.stride(0))
        r_eps = float(rope["eps"])
        r_consts = dict(ROPE_NEW=True, HALF=rope["rotary_dim"] // 2, INTERLEAVED=bool(rope["interleaved"]),
                        Q_NORM=qw is not None, K_NORM=kw is not None)
    _paged_attn_kernel[grid](
        q, k_cache, v_cache, out, part, lse, counters if fused else ctx.seq_lens_t,
        bt, ctx.seq_lens_t, ctx.query_start_loc, topk, *r_ptrs, r_eps,
        float(scale) * _LOG2E, group, ctx.block_size, max_keys, tiles_per_split, num_head_blocks, num_splits,
        bt.shape[1], q.stride(0), q.stride(1),
        *kv_strides, *v_strides,
        out.stride(0), out.stride(1),
        *p_strides, *l_strides,
        bt.stride(0), topk_stride, *r_strides,
        D_A=d_a, D_B=d_b, D_V=d_v,
        BLOCK_DA=max(16, next_power_of_2(d_a)), BLOCK_DB=max(16, next_power_of_2(max(d_b, 1))), BLOCK_DV=block_dv,
        BLOCK_Q=block_q, HEADS=heads, BLOCK_M=block_m, BLOCK_N=block_n,
        MERGE_M=merge_m if fused else 1, MERGE_S=merge_s if fused else 1,
        V_IS_K=v_is_k, USE_TOPK=topk_indices is not None, SPLIT=split, FUSED_MERGE=fused,
        DOT_F32=interpreting() or q.dtype == torch.float32, DECODE=fast, EARLY_CTX=EARLY_CTX_ATTN, **r_consts,
        **launch,
    )
    if split and not fused:
        cdv = combine_block_dv(T * Hq, d_v)
        _combine_kernel[(T * Hq, triton.cdiv(d_v, cdv))](
            part, lse, out, Hq, num_splits,
            part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
            out.stride(0), out.stride(1),
            D_V=d_v, BLOCK_S=next_power_of_2(num_splits), BLOCK_DV=cdv, LATE_TRIGGER=combine_late_trigger(v_is_k),
            num_warps=COMBINE["num_warps"], **pdl(q),
        )
    return out


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, ctx: AttentionContext,
                    scale: float) -> torch.Tensor:
    """GQA attention of q [T, Hq, D] over k_cache / v_cache [num_blocks, block_size, Hkv, D(v)] -> [T, Hq, Dv]."""
    Hq, Hkv = q.shape[1], k_cache.shape[2]
    if Hq % Hkv != 0:
        raise ValueError(f"{Hq} query heads are not a multiple of {Hkv} KV heads")
    if q.stride(-1) != 1:
        q = q.contiguous()
    return _attend_gqa(q, k_cache, v_cache, ctx, scale)


def _gqa_config(D: int, Dv: int, ctx: AttentionContext) -> dict:
    cfg = GQA if max(D, Dv) <= 128 else dict(GQA, block_n=32)
    max_q = ctx.max_query_len or max(ctx.query_lens, default=1)
    if max_q == 1 and ctx.num_seqs < MLA_FEW_SEQS:
        cfg = {**cfg, **GQA_DECODE_FEW_SEQS}
    return cfg


def _attend_gqa(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, ctx: AttentionContext, scale: float,
                rope: dict | None = None) -> torch.Tensor:
    D, Dv = q.shape[2], v_cache.shape[3]
    return _attend(
        q, k_cache, v_cache, ctx, scale,
        num_kv_heads=k_cache.shape[2], d_a=D, d_b=0, d_v=Dv, v_is_k=False,
        cfg=_gqa_config(D, Dv, ctx), topk_indices=None,
        kv_strides=(k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)),
        v_strides=(v_cache.stride(0), v_cache.stride(1), v_cache.stride(2)), rope=rope,
    )


# Decode attention straight from the raw q/k/v projections (``rope_paged_attention``): one launch instead of the
# RoPE + KV-write launch and the attention launch. Off with HIGHSPEED_FUSED_ROPE_ATTN=0 (an A/B switch).
FUSED_ROPE_ATTN: bool = os.environ.get("HIGHSPEED_FUSED_ROPE_ATTN", "1") != "0"


def rope_paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                         cos_sin: torch.Tensor, rotary_dim: int, interleaved: bool, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, ctx: AttentionContext, scale: float,
                         q_norm_weight: torch.Tensor | None = None, k_norm_weight: torch.Tensor | None = None,
                         eps: float = 1e-6) -> torch.Tensor:
    """Same contract as ``highspeed.ops.attention.rope_paged_attention``. Decode batches (one new token per
    sequence) take the fused kernel; anything else runs the RoPE kernel, then ``paged_attention``."""
    T, Hq, D = q.shape
    Hkv, Dv = k_cache.shape[2], v_cache.shape[3]
    decode = (ctx.max_query_len or max(ctx.query_lens, default=0)) == 1 and ctx.num_seqs == T
    if (not FUSED_ROPE_ATTN or not decode or ctx.slot_mapping is None or ctx.block_tables is None
            or k.shape != (T, Hkv, D) or v.shape != (T, Hkv, Dv) or Hq % Hkv or rotary_dim % 2 or rotary_dim > D
            or q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1 or k_cache.stride(-1) != 1
            or v_cache.stride(-1) != 1 or cos_sin.stride(-1) != 1):
        q_rot, _ = t_rope.rope_and_write_kv(q, k, v, positions, cos_sin, rotary_dim, interleaved, k_cache, v_cache,
                                            ctx.slot_mapping, q_norm_weight, k_norm_weight, None, eps)
        return paged_attention(q_rot, k_cache, v_cache, ctx, scale)
    return _attend_gqa(q, k_cache, v_cache, ctx, scale, rope=dict(
        k=k, v=v, positions=positions, cos_sin=cos_sin, rotary_dim=rotary_dim, interleaved=interleaved,
        q_norm_weight=q_norm_weight, k_norm_weight=k_norm_weight, eps=eps))


def _mla_config(kv_lora_rank: int, ctx: AttentionContext, num_heads: int) -> dict:
    if kv_lora_rank <= 256:
        return MLA_NARROW
    max_q = ctx.max_query_len or max(ctx.query_lens, default=1)
    if ctx.num_seqs * max(1, max_q) >= MLA_FEW_SEQS:
        return MLA_WIDE
    max_keys = ctx.max_seq_len or max(ctx.seq_lens, default=0)
    short = num_heads > MLA_SHORT_FEW_SEQS["heads"] and max_keys <= MLA_SHORT_MAX_KEYS
    return MLA_SHORT_FEW_SEQS if short else MLA_WIDE_FEW_SEQS


def mla_attention(q: torch.Tensor, latent_cache: torch.Tensor, ctx: AttentionContext, scale: float,
                  kv_lora_rank: int, topk_indices: torch.Tensor | None = None) -> torch.Tensor:
    """Absorbed MLA: q [T, H, L + R] against keys [c | k_pe] and values c of latent_cache
    [num_blocks, block_size, L + R] -> [T, H, L]; ``topk_indices`` [T, k] (DSA) restricts the keys."""
    T, H, D = q.shape
    L = kv_lora_rank
    R = D - L
    if latent_cache.shape[-1] != D:
        raise ValueError(f"latent cache width {latent_cache.shape[-1]} != query width {D}")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if topk_indices is not None and topk_indices.stride(-1) != 1:
        topk_indices = topk_indices.contiguous()
    kv_strides = (latent_cache.stride(0), latent_cache.stride(1), 0)
    return _attend(
        q, latent_cache, latent_cache, ctx, scale,
        num_kv_heads=1, d_a=L, d_b=R, d_v=L, v_is_k=True,
        # 512-wide latents: smaller key tiles and more warps, to hold [rows, 512] accumulators in registers.
        cfg=_mla_config(L, ctx, H), topk_indices=topk_indices,
        kv_strides=kv_strides, v_strides=kv_strides,
    )


# ----------------------------------------------------------------------------------------------------------------
# Cache write
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _write_kv_kernel(cache_ptr, values_ptr, slot_ptr, width, stride_vt, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    cb = tl.program_id(1)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:        # padded token (CUDA-graph batch padding): nothing to write
        return
    c = cb * BLOCK + tl.arange(0, BLOCK)
    mask = c < width
    v = tl.load(values_ptr + t.to(tl.int64) * stride_vt + c, mask=mask)
    tl.store(cache_ptr + slot * width + c, v.to(cache_ptr.dtype.element_ty), mask=mask)


def write_kv(cache: torch.Tensor, slot_mapping: torch.Tensor, values: torch.Tensor) -> None:
    """cache.view(num_slots, ...)[slot_mapping[t]] = values[t] for every token t (negative slots skipped)."""
    T = values.shape[0]
    if T == 0:
        return
    if not cache.is_contiguous():
        raise ValueError("write_kv needs a contiguous cache")
    width = math.prod(cache.shape[2:])
    if math.prod(values.shape[1:]) != width:
        raise ValueError(f"values {tuple(values.shape)} do not match cache slots {tuple(cache.shape[2:])}")
    v2 = values.reshape(T, width)
    if v2.stride(-1) != 1:
        v2 = v2.contiguous()
    block = min(1024, next_power_of_2(width))
    _write_kv_kernel[(T, triton.cdiv(width, block))](
        cache, v2, slot_mapping, width, v2.stride(0), BLOCK=block, num_warps=4 if block >= 512 else 1,
    )
