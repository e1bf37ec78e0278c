"""Sampling on the GPU without host synchronisation, matching ``highspeed.ops.sampling.sample`` token for token.

The reference builds the Gumbel noise as several [B, V] int64 tensors (hash rounds) and then takes an argmax:
about a dozen passes over B x V x 8 bytes. Here each row's vocabulary is cut into CHUNK-wide pieces, one program
per (chunk, row), in three launches:
1. ``_chunk_max_kernel``: each chunk's largest logit and its first column (the greedy argmax, and the row maximum
   that min-p needs);
2. ``_chunk_sample_kernel`` (rows with a temperature): hashes (seed, step, column) to the same uniforms as the
   reference, adds the Gumbel noise to the temperature-scaled logits, drops min-p rejects (against the row maximum
   of launch 1) and keeps the chunk's best score;
3. ``_pick_kernel``: per row, the best chunk (the first among ties, as torch.argmax), greedy or sampled.
Top-k / top-p need the sorted order; when a batch uses them the masking stays in the torch reference
(``apply_filters``, a sort) and launch 2 does the noise + argmax on its output.

The chunks are what batch 1 needs: one program walking a row of 154880 columns twice took 0.17 ms on the H200
(run 2), latency-bound on one SM. ``greedy_advance`` is launches 1 and 3 with the decode inputs' advance folded
into 3: the tail of a CUDA-graph decode step.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from highspeed.ops.sampling import SamplingTensors, apply_filters
from highspeed.ops.triton import gdc_launch_dependents, gdc_wait, interpreting, next_power_of_2, pdl

try:  # CUDA's logf, the function torch's log calls: tl.log's faster approximation flipped 1 of 256 rows (H200)
    from triton.language.extra import libdevice as _libdevice
except ImportError:  # pragma: no cover - older Triton
    _libdevice = None

# The interpreter cannot run libdevice calls; its tl.log is numpy's, already exact enough there.
PRECISE_LOG: bool = _libdevice is not None and not interpreting()


@triton.jit
def _log(x, PRECISE: tl.constexpr):
    if PRECISE:
        return _libdevice.log(x)
    else:
        return tl.log(x)


@triton.jit
def _mix32(x):
    """lowbias32 on int64 lanes holding 32-bit values, exactly as the reference (the wrap of the int64 product
    leaves the low 32 bits right)."""
    x = x & 0xFFFFFFFF
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


# Columns per program: V = 151936 (Qwen3) gives 75 programs per row. The [B, chunks] partials are tiny.
CHUNK: int = 2048


@triton.jit
def _chunk_max_kernel(x_ptr, val_ptr, idx_ptr, count_ptr, V, n_chunks, stride_x, CHUNK: tl.constexpr,
                      COUNT: tl.constexpr, PDL: tl.constexpr):
    """Chunk c of row r: its largest logit and that logit's first column. COUNT: program (0, 0) also moves the
    host ring's count one up, for _pick_kernel (the next launch) to read."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    c = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    if COUNT:
        if (c == 0) & (row == 0):
            tl.store(count_ptr, tl.load(count_ptr) + 1)
    cols = c * CHUNK + tl.arange(0, CHUNK)
    x = tl.load(x_ptr + row * stride_x + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
    tl.store(val_ptr + row * n_chunks + c, tl.max(x, 0))
    tl.store(idx_ptr + row * n_chunks + c, c.to(tl.int64) * CHUNK + tl.argmax(x, 0))


@triton.jit
def _chunk_sample_kernel(
    logits_ptr, filtered_ptr, temp_ptr, min_p_ptr, seed_ptr, step_ptr, val_ptr, sval_ptr, sidx_ptr,
    V, n_chunks, stride_l, stride_f,
    PREFILTERED: tl.constexpr, USE_MIN_P: tl.constexpr, CHUNK: tl.constexpr, BLOCK_C: tl.constexpr,
    PRECISE_LOG: tl.constexpr, PDL: tl.constexpr,
):
    """Chunk c of a sampled row r (greedy rows do nothing): the best Gumbel score and its column."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    c = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    temp = tl.load(temp_ptr + row)
    if temp > 0.0:
        seed = tl.load(seed_ptr + row)
        step = tl.load(step_ptr + row)
        row_hash = _mix32(_mix32(seed ^ (seed >> 32)) ^ _mix32(step * 0x9E3779B9 + 0x632BE5AB))
        cols = c * CHUNK + tl.arange(0, CHUNK)
        cmask = cols < V
        if PREFILTERED:
            z = tl.load(filtered_ptr + row * stride_f + cols, mask=cmask, other=float("-inf"))
        else:
            # IEEE division, as torch's (Triton's '/' is the faster approximate one).
            z = tl.math.div_rn(tl.load(logits_ptr + row * stride_l + cols, mask=cmask, other=float("-inf")), temp)
            if USE_MIN_P:
                # probs < max_prob * min_p  <=>  logit / T < max_logit / T + log(min_p)
                cs = tl.arange(0, BLOCK_C)
                best = tl.max(tl.load(val_ptr + row * n_chunks + cs, mask=cs < n_chunks, other=float("-inf")), 0)
                mp = tl.load(min_p_ptr + row)
                cut = tl.where(mp > 0.0, tl.math.div_rn(best, temp) + _log(tl.maximum(mp, 1e-30), PRECISE_LOG),
                               float("-inf"))
                z = tl.where(z < cut, float("-inf"), z)
        h = _mix32(row_hash ^ _mix32(cols.to(tl.int64) * 0x85EBCA6B + 0x1B873593))
        u = ((h >> 9).to(tl.float32) * 2.0 + 1.0) * (1.0 / 16777216.0)   # as uniform_of_hash: inside (0, 1)
        score = tl.where(cmask, z - _log(-_log(u, PRECISE_LOG), PRECISE_LOG), float("-inf"))
        tl.store(sval_ptr + row * n_chunks + c, tl.max(score, 0))
        tl.store(sidx_ptr + row * n_chunks + c, c.to(tl.int64) * CHUNK + tl.argmax(score, 0))


@triton.jit
def _pick_kernel(
    val_ptr, idx_ptr, sval_ptr, sidx_ptr, temp_ptr, out_ptr, pos_slots_ptr, seq_lens_ptr, ring_ptr, count_ptr,
    n_chunks, stride_ps, stride_ring, ring_len,
    SAMPLED: tl.constexpr, ADVANCE: tl.constexpr, RING: tl.constexpr, BLOCK_C: tl.constexpr, PDL: tl.constexpr,
):
    """Row r's token: its best chunk's column (the first among equal bests), from the greedy partials or, for a
    sampled row (SAMPLED and a temperature), from the Gumbel ones. ADVANCE: then the row's position, slot and
    length + 1 if it has a slot (>= 0; padding rows have -1). RING: the token also goes to row (count % ring_len)
    of the host ring (pinned host memory: the store crosses to the host, which reads it after the step's event)."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    cs = tl.arange(0, BLOCK_C)
    cmask = cs < n_chunks
    part = row * n_chunks + cs
    v = tl.load(val_ptr + part, mask=cmask, other=float("-inf"))
    i = tl.load(idx_ptr + part, mask=cmask, other=0)
    if SAMPLED:
        greedy = tl.load(temp_ptr + row) <= 0.0
        v = tl.where(greedy, v, tl.load(sval_ptr + part, mask=cmask, other=float("-inf")))
        i = tl.where(greedy, i, tl.load(sidx_ptr + part, mask=cmask, other=0))
    # The first chunk holding the maximum (chunks are in column order; an all -inf row gives chunk 0's column).
    first = tl.min(tl.where(v == tl.max(v, 0), cs, BLOCK_C), 0)
    token = tl.sum(tl.where(cs == first, i, 0), 0)
    tl.store(out_ptr + row, token)
    if RING:
        tl.store(ring_ptr + (tl.load(count_ptr) % ring_len) * stride_ring + row, token)
    if ADVANCE:
        slot = tl.load(pos_slots_ptr + stride_ps + row)
        live = slot >= 0
        tl.store(pos_slots_ptr + row, tl.load(pos_slots_ptr + row) + 1, mask=live)
        tl.store(pos_slots_ptr + stride_ps + row, slot + 1, mask=live)
        tl.store(seq_lens_ptr + row, tl.load(seq_lens_ptr + row) + 1, mask=live)


def _chunk_max(logits: torch.Tensor, count: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    B, V = logits.shape
    n = triton.cdiv(V, CHUNK)
    val = torch.empty(B, n, dtype=torch.float32, device=logits.device)
    idx = torch.empty(B, n, dtype=torch.int64, device=logits.device)
    _chunk_max_kernel[(n, B)](logits, val, idx, val if count is None else count, V, n, logits.stride(0),
                              CHUNK=CHUNK, COUNT=count is not None, num_warps=4, **pdl(logits))
    return val, idx, n


def sample(logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """[B, V] float32 logits -> [B] int64 tokens (greedy where temperature is 0)."""
    B, V = logits.shape
    if B == 0:
        return logits.argmax(dim=-1)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    out = torch.empty(B, dtype=torch.int64, device=logits.device)
    val, idx, n = _chunk_max(logits)
    block_c = next_power_of_2(n)
    sval, sidx = val, idx   # placeholders, never read when all rows are greedy
    if not st.all_greedy:
        logits = logits.float()
        prefiltered = st.any_top_k or st.any_top_p
        filtered = apply_filters(logits, st) if prefiltered else logits
        sval, sidx = torch.empty_like(val), torch.empty_like(idx)
        _chunk_sample_kernel[(n, B)](
            logits, filtered, st.temperature, st.min_p, st.seeds, st.steps, val, sval, sidx,
            V, n, logits.stride(0), filtered.stride(0),
            PREFILTERED=prefiltered, USE_MIN_P=st.any_min_p and not prefiltered, CHUNK=CHUNK, BLOCK_C=block_c,
            PRECISE_LOG=PRECISE_LOG, num_warps=8, **pdl(logits),
        )
    _pick_kernel[(B,)](val, idx, sval, sidx, st.temperature, out, out, out, out, out, n, 0, 0, 1,
                       SAMPLED=not st.all_greedy, ADVANCE=False, RING=False, BLOCK_C=block_c, num_warps=1,
                       **pdl(logits))
    return out


def greedy_advance(logits: torch.Tensor, ids: torch.Tensor, pos_slots: torch.Tensor, seq_lens: torch.Tensor,
                   host_ring: torch.Tensor | None = None, ring_count: torch.Tensor | None = None) -> None:
    """Same contract as ``highspeed.ops.sampling.greedy_advance``."""
    B, V = logits.shape
    if (B == 0 or logits.stride(-1) != 1 or ids.shape != (B,) or ids.dtype != torch.int64 or not ids.is_contiguous()
            or pos_slots.shape != (2, B) or pos_slots.stride(1) != 1 or seq_lens.shape != (B,)
            or not seq_lens.is_contiguous()):
        raise ValueError("greedy_advance: logits [B, V] unit-stride, ids [B] int64, pos_slots [2, B], seq_lens [B]")
    ring = host_ring is not None
    if ring and (ring_count is None or host_ring.dim() != 2 or host_ring.shape[1] < B or host_ring.stride(1) != 1
                 or host_ring.dtype != torch.int64 or ring_count.dtype != torch.int64):
        raise ValueError("greedy_advance: host_ring [K, >= B] int64 unit-stride rows, ring_count [1] int64")
    val, idx, n = _chunk_max(logits, ring_count if ring else None)
    _pick_kernel[(B,)](val, idx, val, idx, val, ids, pos_slots, seq_lens, host_ring if ring else ids,
                       ring_count if ring else ids, n, pos_slots.stride(0), host_ring.stride(0) if ring else 0,
                       host_ring.shape[0] if ring else 1,
                       SAMPLED=False, ADVANCE=True, RING=ring, BLOCK_C=next_power_of_2(n), num_warps=1,
                       **pdl(logits))
