"""Numeric primitives. Each is a plain-torch reference that dispatches to ``highspeed.ops.triton.<file>`` on CUDA
(see ``dispatch.py``). Imports nothing of the project except ``highspeed.context`` types."""
from highspeed.ops.activation import silu_and_mul
from highspeed.ops.attention import mla_attention, paged_attention, rope_paged_attention, write_kv
from highspeed.ops.dsa import dsa_topk_indices
from highspeed.ops.embedding import embedding
from highspeed.ops.linear import linear
from highspeed.ops.moe import fused_moe, moe_experts, select_experts
from highspeed.ops.norm import add_rms_norm, rms_norm
from highspeed.ops.rope import build_cos_sin_cache, rope, rope_and_write_kv

__all__ = [
    "add_rms_norm", "build_cos_sin_cache", "dsa_topk_indices", "embedding", "fused_moe", "linear", "mla_attention", "moe_experts",
    "paged_attention", "rms_norm", "rope", "rope_and_write_kv", "rope_paged_attention", "select_experts", "silu_and_mul", "write_kv",
]
