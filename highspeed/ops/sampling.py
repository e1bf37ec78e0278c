"""Token sampling on the device, with no host synchronisation.

Randomness is a counter-based hash of (seed, step, vocabulary index) rather than a stateful generator: the
noise a request sees depends only on its own seed and how many tokens it has produced, never on the batch it
shares a step with, so seeded sampling is reproducible under any batching and the whole thing can be captured
in a CUDA graph. Sampling is the Gumbel-max trick over the filtered, temperature-scaled logits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from highspeed.ops.dispatch import triton_kernel

_M32 = 0xFFFFFFFF


@dataclass
class SamplingTensors:
    temperature: torch.Tensor   # [B] float32; 0 = greedy
    top_k: torch.Tensor         # [B] int64; 0 = off
    top_p: torch.Tensor         # [B] float32; 1 = off
    min_p: torch.Tensor         # [B] float32; 0 = off
    seeds: torch.Tensor         # [B] int64
    steps: torch.Tensor         # [B] int64: the position of the token being sampled
    # Host-side facts that let us skip work without reading the tensors back.
    all_greedy: bool = False
    any_top_k: bool = False
    any_top_p: bool = False
    any_min_p: bool = False

    @classmethod
    def build(cls, temperature: list[float], top_k: list[int], top_p: list[float], min_p: list[float],
              seeds: list[int], steps: list[int], device: torch.device | str) -> "SamplingTensors":
        # Two host-to-device copies (the float and the integer fields, each packed [3, B]) instead of six, from
        # pinned memory on CUDA so they do not wait for the device: this runs on every sampled decode step.
        floats = torch.tensor([temperature, top_p, min_p], dtype=torch.float32)
        ints = torch.tensor([top_k, [s & (2**63 - 1) for s in seeds], steps], dtype=torch.int64)
        if torch.device(device).type == "cuda":
            floats, ints = floats.pin_memory(), ints.pin_memory()
        floats, ints = floats.to(device, non_blocking=True), ints.to(device, non_blocking=True)
        return cls(
            temperature=floats[0], top_k=ints[0], top_p=floats[1], min_p=floats[2], seeds=ints[1], steps=ints[2],
            all_greedy=all(x == 0 for x in temperature),
            any_top_k=any(k > 0 for k in top_k), any_top_p=any(p < 1.0 for p in top_p),
            any_min_p=any(p > 0 for p in min_p),
        )


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 integer hash on int64 tensors holding 32-bit values (low bits survive wrap-around)."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def uniform_of_hash(h: torch.Tensor) -> torch.Tensor:
    """32-bit hashes -> float32 uniforms (2k + 1) / 2**24 for k = h >> 9: strictly inside (0, 1), every value exact
    in float32. (The 32-bit (h + 0.5) / 2**32 rounded the top 2**-25 of hashes to 1.0: their Gumbel noise was +inf,
    so about one row in 200 of a 150K vocabulary sampled a uniformly random token -- or, beside a filtered -inf
    logit, NaN, which torch's argmax takes.)"""
    return ((h >> 9).to(torch.float32) * 2 + 1) * 2.0**-24


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, V] uniforms in (0, 1), a pure function of (seed, step, column)."""
    row = _mix32(_mix32(seeds ^ (seeds >> 32)) ^ _mix32(steps * 0x9E3779B9 + 0x632BE5AB))
    cols = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)
    return uniform_of_hash(_mix32(row[:, None] ^ _mix32(cols * 0x85EBCA6B + 0x1B873593)[None, :]))


def apply_filters(logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p masks (masked entries become -inf)."""
    temp = torch.where(st.temperature > 0, st.temperature, torch.ones_like(st.temperature))
    logits = logits / temp[:, None]
    if st.any_top_k or st.any_top_p:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
        mask = torch.zeros_like(sorted_logits, dtype=torch.bool)
        if st.any_top_k:
            k = torch.where(st.top_k > 0, st.top_k, torch.full_like(st.top_k, logits.shape[-1]))
            ranks = torch.arange(logits.shape[-1], device=logits.device)[None, :]
            mask |= ranks >= k[:, None]
        if st.any_top_p:
            probs = sorted_logits.masked_fill(mask, float("-inf")).softmax(dim=-1)
            # Keep the smallest prefix whose mass reaches top_p: drop a token if the mass before it already does.
            before = probs.cumsum(dim=-1) - probs
            mask |= before >= st.top_p[:, None]
        sorted_logits = sorted_logits.masked_fill(mask, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, sorted_idx, sorted_logits)
    if st.any_min_p:
        probs = logits.softmax(dim=-1)
        thresh = probs.max(dim=-1, keepdim=True).values * st.min_p[:, None]
        logits = logits.masked_fill(probs < thresh, float("-inf"))
    return logits


def sample(logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """[B, V] float32 logits -> [B] int64 tokens. Greedy rows take the argmax of the raw logits. On CUDA the
    Triton kernels (highspeed/ops/triton/sampling.py) give the same tokens."""
    kernel = triton_kernel("sampling", "sample", logits)
    if kernel is not None:
        return kernel(logits, st)
    greedy = logits.argmax(dim=-1)
    if st.all_greedy:
        return greedy
    filtered = apply_filters(logits.float(), st)
    gumbel = -torch.log(-torch.log(uniform_noise(st.seeds, st.steps, logits.shape[-1])))
    sampled = (filtered + gumbel).argmax(dim=-1)
    return torch.where(st.temperature > 0, sampled, greedy)


def logprobs_topk(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of the raw model distribution: (chosen [B], top values [B, k], top ids [B, k])."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(-1, tokens[:, None]).squeeze(-1)
    if k > 0:
        vals, ids = lp.topk(k, dim=-1)
    else:
        vals = lp.new_empty(lp.shape[0], 0)
        ids = tokens.new_empty(lp.shape[0], 0)
    return chosen, vals, ids


def greedy_advance(logits: torch.Tensor, ids: torch.Tensor, pos_slots: torch.Tensor, seq_lens: torch.Tensor,
                   host_ring: torch.Tensor | None = None, ring_count: torch.Tensor | None = None) -> None:
    """The tail of a greedy decode step, for the next one: ``ids[b] = argmax(logits[b])`` (the first index among
    ties, as torch.argmax), and every live row (``pos_slots[1, b] >= 0``: a slot to write) one token further:
    position, slot and length + 1. Padding rows (slot -1) stay as they are.

    ``logits`` [B, V] (any float dtype: the argmax of bf16 logits is that of their fp32 copies), ``ids`` [B] int64,
    ``pos_slots`` [2, B] int64 (positions, slots), ``seq_lens`` [B] int32, all written in place. The CUDA-graph
    decoder runs this inside its graph (highspeed/engine/runner.py), so a steady greedy step is one replay.

    With ``host_ring`` [K, >= B] int64 and ``ring_count`` [1] int64: the count goes one up and the tokens are also
    written to ``host_ring[count % K, :B]``. On CUDA the ring is pinned host memory that the Triton kernel writes
    itself, so the host reads a step's tokens after its event with no copy launched behind the graph; the reference
    below needs the ring and the count on one device (the CPU, where tests run it)."""
    kernel = triton_kernel("sampling", "greedy_advance", logits)
    if kernel is not None:
        kernel(logits, ids, pos_slots, seq_lens, host_ring, ring_count)
        return
    ids.copy_(logits.argmax(dim=-1))
    if host_ring is not None:
        assert ring_count is not None
        ring_count += 1
        host_ring[:, :ids.shape[0]].index_copy_(0, ring_count % host_ring.shape[0], ids[None])
    live = pos_slots[1] >= 0
    pos_slots += live
    seq_lens += live
