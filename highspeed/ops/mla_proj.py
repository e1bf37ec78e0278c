"""The two per-head products of absorbed MLA (paged path), written into views the caller owns:

- ``absorb_q``: ``out[t, h, :L] = q_nope[t, h, :D] @ w_uk[h]`` with ``w_uk[H, D, L]`` (the query folded through W_UK);
- ``latent_to_v``: ``out[t, h, :V] = latent[t, h, :L] @ w_uv[h]^T`` with ``w_uv[H, V, L]`` (attention output
  expanded through W_UV).

``w_uk`` and ``w_uv`` are the two row ranges of ``kv_b_proj.weight.view(H, D + V, L)``. On CUDA, decode-sized
inputs (a token or two) go to Triton GEMVs (``highspeed/ops/triton/mla_proj.py``); the rest stays with cuBLAS.
"""
from __future__ import annotations

import torch

from highspeed.ops.dispatch import triton_kernel
from highspeed.ops.rope import rope_and_write_kv


def absorb_q(q_nope: torch.Tensor, w_uk: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``q_nope[T, H, D]``, ``w_uk[H, D, L]`` -> ``out[T, H, L]`` (written in place, also returned)."""
    kernel = triton_kernel("mla_proj", "absorb_q", q_nope)
    if kernel is not None:
        return kernel(q_nope, w_uk, out)
    # bmm's out= has no autograd: fine, the paged path that calls this is inference only.
    torch.bmm(q_nope.transpose(0, 1), w_uk, out=out.transpose(0, 1))
    return out


def absorb_q_rope_write(q_nope: torch.Tensor, w_uk: torch.Tensor, out: torch.Tensor, **rope_kw) -> None:
    """``absorb_q(q_nope, w_uk, out)`` and ``rope_and_write_kv(**rope_kw)`` (highspeed.ops.rope): the two steps
    between q_b_proj and MLA attention at decode, which read only q_b_proj's and kv_a's outputs. On CUDA one launch
    does both (one link less in the decode chain)."""
    kernel = triton_kernel("mla_proj", "absorb_q_rope_write", q_nope)
    if kernel is not None:
        kernel(q_nope, w_uk, out, **rope_kw)
        return
    absorb_q(q_nope, w_uk, out)
    rope_and_write_kv(**rope_kw)


def latent_to_v(latent: torch.Tensor, w_uv: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``latent[T, H, L]``, ``w_uv[H, V, L]`` -> ``out[T, H, V]`` (written in place, also returned)."""
    kernel = triton_kernel("mla_proj", "latent_to_v", latent)
    if kernel is not None:
        return kernel(latent, w_uv, out)
    torch.bmm(latent.transpose(0, 1), w_uv.transpose(1, 2), out=out.transpose(0, 1))
    return out
