"""Sampling on the GPU without host synchronisation, matching ``highspeed.ops.sampling.sample`` token for token.

The reference builds the Gumbel noise as several [B, V] int64 tensors (hash rounds) and then takes an argmax:
about a dozen passes over B x V x 8 bytes. Here one program per row makes two passes over the fp32 logits:
pass 1 finds the greedy argmax (and the row maximum, which min-p needs), pass 2 hashes (seed, step, column) to
the same uniforms as the reference, adds the Gumbel noise to the temperature-scaled logits, drops min-p
rejects and keeps a running argmax. Top-k / top-p need the sorted order; when a batch uses them the masking
stays in the torch reference (``apply_filters``, a sort) and the kernel does the noise + argmax on its output.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from highspeed.ops.sampling import SamplingTensors, apply_filters
from highspeed.ops.triton import interpreting

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


@triton.jit
def _sample_kernel(
    logits_ptr, filtered_ptr, temp_ptr, min_p_ptr, seed_ptr, step_ptr, out_ptr,
    V, stride_l, stride_f,
    PREFILTERED: tl.constexpr, USE_MIN_P: tl.constexpr, BLOCK: tl.constexpr, PRECISE_LOG: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols0 = tl.arange(0, BLOCK)
    # Pass 1: greedy argmax of the raw logits (first index among ties, like torch.argmax).
    best = tl.full([], float("-inf"), tl.float32)
    best_i = tl.full([], 0, tl.int64)
    for v0 in range(0, V, BLOCK):
        cols = v0 + cols0
        x = tl.load(logits_ptr + row * stride_l + cols, mask=cols < V, other=float("-inf"))
        m = tl.max(x, 0)
        i = tl.argmax(x, 0).to(tl.int64) + v0
        take = m > best
        best_i = tl.where(take, i, best_i)
        best = tl.where(take, m, best)
    temp = tl.load(temp_ptr + row)
    if temp <= 0.0:
        tl.store(out_ptr + row, best_i)
    else:
        seed = tl.load(seed_ptr + row)
        step = tl.load(step_ptr + row)
        row_hash = _mix32(_mix32(seed ^ (seed >> 32)) ^ _mix32(step * 0x9E3779B9 + 0x632BE5AB))
        if USE_MIN_P:
            # probs < max_prob * min_p  <=>  logit / T < max_logit / T + log(min_p)
            mp = tl.load(min_p_ptr + row)
            cut = tl.where(mp > 0.0, tl.math.div_rn(best, temp) + _log(tl.maximum(mp, 1e-30), PRECISE_LOG),
                           float("-inf"))
        s_best = tl.full([], float("-inf"), tl.float32)
        s_best_i = tl.full([], 0, tl.int64)
        for v0 in range(0, V, BLOCK):
            cols = v0 + cols0
            cmask = cols < V
            if PREFILTERED:
                z = tl.load(filtered_ptr + row * stride_f + cols, mask=cmask, other=float("-inf"))
            else:
                # IEEE division, as torch's (Triton's '/' is the faster approximate one).
                z = tl.math.div_rn(tl.load(logits_ptr + row * stride_l + cols, mask=cmask, other=float("-inf")), temp)
                if USE_MIN_P:
                    z = tl.where(z < cut, float("-inf"), z)
            h = _mix32(row_hash ^ _mix32(cols.to(tl.int64) * 0x85EBCA6B + 0x1B873593))
            u = ((h.to(tl.float64) + 0.5) / 4294967296.0).to(tl.float32)
            score = z - _log(-_log(u, PRECISE_LOG), PRECISE_LOG)
            score = tl.where(cmask, score, float("-inf"))
            m = tl.max(score, 0)
            i = tl.argmax(score, 0).to(tl.int64) + v0
            take = m > s_best
            s_best_i = tl.where(take, i, s_best_i)
            s_best = tl.where(take, m, s_best)
        tl.store(out_ptr + row, s_best_i)


def sample(logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """[B, V] float32 logits -> [B] int64 tokens (greedy where temperature is 0)."""
    B, V = logits.shape
    if st.all_greedy or B == 0:
        return logits.argmax(dim=-1)
    logits = logits.float()
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    prefiltered = st.any_top_k or st.any_top_p
    filtered = apply_filters(logits, st) if prefiltered else logits
    out = torch.empty(B, dtype=torch.int64, device=logits.device)
    _sample_kernel[(B,)](
        logits, filtered, st.temperature, st.min_p, st.seeds, st.steps, out,
        V, logits.stride(0), filtered.stride(0),
        PREFILTERED=prefiltered, USE_MIN_P=st.any_min_p and not prefiltered,
        BLOCK=min(4096, triton.next_power_of_2(V)), PRECISE_LOG=PRECISE_LOG, num_warps=8,
    )
    return out
