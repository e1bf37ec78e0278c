"""Rotary position embedding: the cos/sin table builder and the rotation reference.

The table is ``[max_position, rotary_dim]``: the first half holds ``cos(pos * inv_freq)``, the second half
``sin(pos * inv_freq)``, both already multiplied by the RoPE attention factor (YaRN's mscale ratio), so the
rotation kernel never needs to know the scaling type.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from highspeed.ops.dispatch import triton_kernel
from highspeed.ops.norm import rms_norm


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    """DeepSeek's YaRN magnitude correction (also used for the MLA softmax scale)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(dim: int, base: float, p: dict[str, Any], max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    # Mirrors transformers' _compute_yarn_parameters, the numerical oracle.
    original = p.get("original_max_position_embeddings") or max_position_embeddings
    factor = p.get("factor")
    if factor is None:
        factor = max_position_embeddings / original
    attention_factor = p.get("attention_factor")
    mscale, mscale_all_dim = p.get("mscale"), p.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_get_mscale(factor)
    beta_fast = p.get("beta_fast") or 32
    beta_slow = p.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def _llama3_inv_freq(inv_freq: torch.Tensor, p: dict[str, Any]) -> torch.Tensor:
    factor, low_ff, high_ff = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low_ff, old_len / high_ff
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_ff) / (high_ff - low_ff)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_inv_freq(
    rotary_dim: int, base: float, scaling: dict[str, Any] | None = None, max_position_embeddings: int = 0
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies ``[rotary_dim // 2]`` (fp32) and the attention factor applied to cos/sin."""
    p = dict(scaling or {})
    kind = p.get("rope_type", p.get("type", "default")) or "default"
    if kind == "yarn":
        return _yarn_inv_freq(rotary_dim, base, p, max_position_embeddings)
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / p["factor"], 1.0
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, p), 1.0
    raise ValueError(f"unsupported rope_type {kind!r} (supported: default, linear, llama3, yarn)")


def build_cos_sin_cache(
    rotary_dim: int,
    max_position: int,
    base: float,
    scaling: dict[str, Any] | None = None,
    max_position_embeddings: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """fp32 table ``[max_position, rotary_dim]`` = ``cat(cos, sin)`` times the attention factor."""
    inv_freq, attention_factor = rope_inv_freq(rotary_dim, base, scaling, max_position_embeddings or max_position)
    inv_freq = inv_freq.to(device)
    freqs = torch.arange(max_position, dtype=torch.float32, device=device)[:, None] * inv_freq[None, :]
    return torch.cat([freqs.cos() * attention_factor, freqs.sin() * attention_factor], dim=-1)


def rope(
    x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, rotary_dim: int, interleaved: bool
) -> torch.Tensor:
    """Rotate ``x[..., :rotary_dim]`` of ``x[T, ..., D]`` by each token's position; the rest passes through.

    NeoX (``interleaved=False``) pairs dim ``i`` with ``i + rotary_dim/2``; interleaved (GPT-J / DeepSeek
    ``rope_interleave``) pairs ``2i`` with ``2i+1`` and keeps them in place. Returns a new tensor in x's dtype.
    """
    kernel = triton_kernel("rope", "rope", x)
    if kernel is not None:
        return kernel(x, positions, cos_sin, rotary_dim, interleaved)
    half = rotary_dim // 2
    cs = cos_sin[positions].float()
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (half,)
    cos, sin = cs[:, :half].reshape(shape), cs[:, half:rotary_dim].reshape(shape)
    rot = x[..., :rotary_dim].float()
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    else:
        x1, x2 = rot[..., :half], rot[..., half:]
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    if rotary_dim == x.shape[-1]:
        return out.to(x.dtype)
    return torch.cat([out.to(x.dtype), x[..., rotary_dim:]], dim=-1)


def rope_and_write_kv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
    rotary_dim: int, interleaved: bool, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    q_norm_weight: torch.Tensor | None = None, k_norm_weight: torch.Tensor | None = None,
    v_norm_weight: torch.Tensor | None = None, eps: float = 1e-6, q_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``q' = rope(q); k' = rope(k)``; store ``k'`` and ``v`` at ``slot_mapping`` (< 0 skips); return ``(q', k')``.

    One kernel on CUDA instead of four (two rotations, two cache writes). The caches are
    ``[num_blocks, block_size, ...]`` and may be last-dimension slices of one tensor: MLA passes its latent cache
    as ``v_cache = latent[..., :L]`` (the compressed KV) and ``k_cache = latent[..., L:]`` (the rope key).

    Optional RMSNorms (weights in the input's dtype, one ``eps``) run first, over each head's whole last dim:
    ``q_norm_weight`` / ``k_norm_weight`` are Qwen3's per-head QK-norm, ``v_norm_weight`` MLA's
    ``kv_a_layernorm`` of the latent (only the cache sees the normed v). ``q_out`` (same shape as q, may be a
    strided view) receives q' instead of a new tensor, e.g. the rope slice of MLA's absorbed query.
    """
    kernel = triton_kernel("rope", "rope_and_write_kv", q)
    if kernel is not None:
        return kernel(q, k, v, positions, cos_sin, rotary_dim, interleaved, k_cache, v_cache, slot_mapping,
                      q_norm_weight, k_norm_weight, v_norm_weight, eps, q_out)
    # Exactly the unfused model code: each norm rounds to the model dtype, then the rotation.
    if q_norm_weight is not None:
        q = rms_norm(q, q_norm_weight, eps)
    if k_norm_weight is not None:
        k = rms_norm(k, k_norm_weight, eps)
    if v_norm_weight is not None:
        v = rms_norm(v, v_norm_weight, eps)
    q_rot = rope(q, positions, cos_sin, rotary_dim, interleaved)
    if q_out is not None:
        q_rot = q_out.copy_(q_rot)
    k_out = rope(k, positions, cos_sin, rotary_dim, interleaved)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    block, offset = slots // k_cache.shape[1], slots % k_cache.shape[1]
    # Indexing by (block, offset) writes through non-contiguous cache views too.
    k_cache[block, offset] = k_out[keep].reshape(-1, *k_cache.shape[2:]).to(k_cache.dtype)
    v_cache[block, offset] = v[keep].reshape(-1, *v_cache.shape[2:]).to(v_cache.dtype)
    return q_rot, k_out
