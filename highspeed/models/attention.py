"""Attention modules: GQA (Llama/Qwen/Mixtral/GLM-4.x) and MLA (DeepSeek-V3, GLM-4.7-Flash, GLM-5) with the DSA
lightning indexer. Each owns its KV cache: ``cache_spec()`` names the per-token shapes and the runner fills
``self.kv_caches[name]`` with ``[num_blocks, block_size, *shape]`` tensors.

Two modes, chosen by ``get_context().uses_cache``: cache-less (each sequence attends causally over its own step
tokens; differentiable; used by oracle tests and training) and paged (write the new tokens at
``ctx.slot_mapping``, then attend over the sequence's cached blocks).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from highspeed.context import AttentionContext, get_context
from highspeed.models.layers import LayerNorm, Linear, MergedLinear, RMSNorm, RotaryEmbedding, Sources
from highspeed.ops import (dsa_topk_indices, mla_attention, rope, rope_paged_attention,
                            write_kv)
from highspeed.ops.attention import causal_mask, dense_attention, topk_mask
from highspeed.ops.dsa import indexer_topk
from highspeed.ops.mla_proj import absorb_q_rope_write, latent_to_v
from highspeed.ops.norm import DeferredNorm, ResidualSum, materialize, residual_of


def attention_without_cache(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext, scale: float,
    topk: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each sequence of the step attends causally over its own tokens only (optionally DSA-restricted)."""
    outs, start = [], 0
    for n in ctx.query_lens:
        sl = slice(start, start + n)
        allowed = causal_mask(n, n, q.device)
        if topk is not None:
            allowed = allowed & topk_mask(topk[sl], n)
        outs.append(dense_attention(q[sl], k[sl], v[sl], scale, allowed))
        start += n
    return torch.cat(outs) if outs else q.new_empty(0, q.shape[1], v.shape[-1])


class Attention(nn.Module):
    """Grouped-query attention with optional q/k/v bias, per-head QK RMSNorm (before RoPE) and partial RoPE."""

    def __init__(
        self,
        hidden: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        rotary: RotaryEmbedding,
        qkv_bias: bool = False,
        o_bias: bool = False,
        qk_norm: bool = False,
        eps: float = 1e-6,
    ):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5
        self.qkv_proj = MergedLinear(
            hidden,
            [("q_proj", num_heads * head_dim), ("k_proj", num_kv_heads * head_dim), ("v_proj", num_kv_heads * head_dim)],
            qkv_bias,
        )
        self.o_proj = Linear(num_heads * head_dim, hidden, o_bias)
        self.q_norm = RMSNorm(head_dim, eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, eps) if qk_norm else None
        self.rotary = rotary
        self.kv_caches: dict[str, torch.Tensor] = {}

    def weight_sources(self) -> Sources:
        return self.qkv_proj.sources_from_parent("qkv_proj")

    def cache_spec(self) -> dict[str, tuple[int, ...]]:
        return {"k": (self.num_kv_heads, self.head_dim), "v": (self.num_kv_heads, self.head_dim)}

    def forward(self, positions: torch.Tensor, x: torch.Tensor | DeferredNorm, aux: dict,
                add_residual: bool = False) -> torch.Tensor | ResidualSum:
        """Attention of ``x``; with ``add_residual`` (``x`` a ``DeferredNorm``) its sum with the residual
        stream, added by o_proj (``ops.linear``)."""
        ctx = get_context()
        t = positions.shape[0]
        q, k, v = self.qkv_proj.split(self.qkv_proj(x))
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if ctx.uses_cache:
            # The per-head QK-norm (if any), RoPE of q and k, the k/v cache write and the attention: at decode one
            # kernel does all of it, otherwise a fused RoPE + cache-write launch precedes the attention.
            rot, qn, kn = self.rotary, self.q_norm, self.k_norm
            out = rope_paged_attention(q, k, v, positions, rot.cos_sin, rot.rotary_dim, rot.interleaved,
                                       self.kv_caches["k"], self.kv_caches["v"], ctx, self.scale,
                                       q_norm_weight=None if qn is None else qn.weight,
                                       k_norm_weight=None if kn is None else kn.weight,
                                       eps=1e-6 if qn is None else qn.eps)
        else:
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = self.rotary(q, positions), self.rotary(k, positions)
            out = attention_without_cache(q, k, v, ctx, self.scale)
        return self.o_proj(out.reshape(t, -1), residual_of(x) if add_residual else None)


class Indexer(nn.Module):
    """DSA lightning indexer (DeepSeek-V3.2 / GLM-5): picks the ``index_topk`` most relevant earlier tokens per
    query; names match ``self_attn.indexer.{wq_b, wk, k_norm, weights_proj}``. RoPE goes on the FIRST
    ``rope_dim`` dims here (MLA puts it last); GLM-5 interleaves it, DeepSeek-V3.2 uses NeoX."""

    def __init__(self, hidden: int, q_lora_rank: int, n_heads: int, head_dim: int, rope_dim: int, topk: int,
                 interleaved: bool):
        super().__init__()
        self.n_heads, self.head_dim, self.rope_dim, self.topk = n_heads, head_dim, rope_dim, topk
        self.interleaved = interleaved
        self.wq_b = Linear(q_lora_rank, n_heads * head_dim)
        self.wk = Linear(hidden, head_dim)
        self.k_norm = LayerNorm(head_dim, eps=1e-6)
        self.weights_proj = Linear(hidden, n_heads, dtype=torch.float32)  # kept fp32 like transformers

    def forward(
        self, x: torch.Tensor, q_latent: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
        ctx: AttentionContext, k_cache: torch.Tensor | None,
    ) -> torch.Tensor | None:
        """Writes this step's indexer keys (paged mode) and returns int32 ``[T, topk]`` positions, or None when
        no sequence can be longer than ``topk`` (then every causal token is selected and dense MLA is exact).

        The choice reads only the host-known bound ``ctx.max_seq_len`` (max_model_len inside a captured decode
        graph, where per-sequence lengths are unknown); a sequence shorter than ``topk`` then gets all its
        positions, -1 padded, which is the same as dense."""
        with torch.no_grad():
            t = x.shape[0]
            k = rope(self.k_norm(self.wk(x)), positions, cos_sin, self.rope_dim, self.interleaved)
            if ctx.uses_cache:
                write_kv(k_cache, ctx.slot_mapping, k)
            longest = ctx.max_seq_len or max(ctx.seq_lens if ctx.uses_cache else ctx.query_lens, default=0)
            if longest <= self.topk:
                return None
            q = self.wq_b(q_latent).view(t, self.n_heads, self.head_dim)
            q = rope(q, positions, cos_sin, self.rope_dim, self.interleaved)
            w = F.linear(x.float(), self.weights_proj.weight.float()) * self.n_heads**-0.5
            scale = self.head_dim**-0.5
            if ctx.uses_cache:
                return dsa_topk_indices(q, w, k_cache, ctx, self.topk, scale)
            outs, start = [], 0
            for n in ctx.query_lens:
                sl = slice(start, start + n)
                outs.append(indexer_topk(q[sl], w[sl], k[sl], self.topk, scale))
                start += n
            return torch.cat(outs)


class MLAttention(nn.Module):
    """Multi-head latent attention. Caches only ``[kv_a_layernorm(c) (L) | rope(k_pe) (R)]`` per token; the paged
    path runs the absorbed form (q_nope folded through W_UK, output through W_UV, both views of kv_b_proj), the
    cache-less path expands keys/values. With an indexer (DSA) attention is restricted to its top-k; a layer
    built with ``shares_topk=True`` (GLM-5.2 "shared" layers) reuses the previous full layer's choice."""

    def __init__(
        self,
        hidden: int,
        num_heads: int,
        q_lora_rank: int | None,
        kv_lora_rank: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int,
        rotary: RotaryEmbedding,
        scale: float,
        bias: bool = False,
        indexer: Indexer | None = None,
        shares_topk: bool = False,
    ):
        super().__init__()
        self.num_heads, self.kv_lora_rank = num_heads, kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.scale = scale
        qk_dim = qk_nope_head_dim + qk_rope_head_dim
        kv_a = ("kv_a_proj_with_mqa", kv_lora_rank + qk_rope_head_dim)
        if q_lora_rank is None:
            self.q_proj = Linear(hidden, num_heads * qk_dim)
            self.kv_a_proj_with_mqa = Linear(hidden, kv_a[1], bias)
        else:
            # Both down-projections read the same x: one GEMM (one decode launch) instead of two.
            self.fused_qkv_a_proj = MergedLinear(hidden, [("q_a_proj", q_lora_rank), kv_a], bias)
            self.q_a_layernorm = RMSNorm(q_lora_rank, 1e-6)
            self.q_b_proj = Linear(q_lora_rank, num_heads * qk_dim)
        self.q_lora_rank = q_lora_rank
        self.kv_a_layernorm = RMSNorm(kv_lora_rank, 1e-6)
        self.kv_b_proj = Linear(kv_lora_rank, num_heads * (qk_nope_head_dim + v_head_dim))
        self.o_proj = Linear(num_heads * v_head_dim, hidden, bias)
        self.rotary = rotary
        self.indexer = indexer
        self.shares_topk = shares_topk
        self.kv_caches: dict[str, torch.Tensor] = {}

    def weight_sources(self) -> Sources:
        return self.fused_qkv_a_proj.sources_from_parent("fused_qkv_a_proj") if self.q_lora_rank is not None else {}

    def cache_spec(self) -> dict[str, tuple[int, ...]]:
        spec = {"latent": (self.kv_lora_rank + self.rope_dim,)}
        if self.indexer is not None:
            spec["index_k"] = (self.indexer.head_dim,)
        return spec

    def forward(self, positions: torch.Tensor, x: torch.Tensor | DeferredNorm, aux: dict,
                add_residual: bool = False) -> torch.Tensor | ResidualSum:
        """Attention of ``x``; with ``add_residual`` (``x`` a ``DeferredNorm``) its sum with the residual
        stream, added by o_proj (``ops.linear``)."""
        ctx = get_context()
        t, h = positions.shape[0], self.num_heads
        stream = x               # the residual stream's source, for add_residual
        if self.q_lora_rank is None or self.indexer is not None:
            x = materialize(x)   # two projections (or the indexer too) read x: no one kernel to run its norm in
        q_latent = None
        if self.q_lora_rank is None:
            q = self.q_proj(x)
            kv_a = self.kv_a_proj_with_mqa(x)
        else:
            q_a, kv_a = self.fused_qkv_a_proj.split(self.fused_qkv_a_proj(x))
            # q_b_proj runs q_a_layernorm in its kernel (batch-1 decode), unless the indexer reads q_latent too.
            q_latent = self.q_a_layernorm(q_a) if self.indexer is not None else self.q_a_layernorm.deferred(q_a)
            q = self.q_b_proj(q_latent)
        q_nope, q_pe = q.view(t, h, -1).split([self.nope_dim, self.rope_dim], dim=-1)
        c, k_pe = kv_a.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        rot, lat = self.rotary, self.kv_lora_rank
        if ctx.uses_cache:
            # The absorbed query [T, H, L+R] is filled in place, no cat: q_nope @ W_UK lands in its first L dims;
            # one fused op writes rope(q_pe) into its last R dims and [kv_a_layernorm(c) | rope(k_pe)] into the
            # latent cache. (No autograd through these out= writes: fine, the paged path is inference only.)
            cache = self.kv_caches["latent"]
            w_kv = self.kv_b_proj.weight.view(h, self.nope_dim + self.v_dim, lat)
            w_uk, w_uv = w_kv[:, : self.nope_dim], w_kv[:, self.nope_dim :]
            q_abs = q.new_empty(t, h, lat + self.rope_dim)
            norm = self.kv_a_layernorm
            absorb_q_rope_write(q_nope, w_uk, q_abs[..., :lat], q=q_pe, k=k_pe, v=c, positions=positions,
                                cos_sin=rot.cos_sin, rotary_dim=rot.rotary_dim, interleaved=rot.interleaved,
                                k_cache=cache[..., lat:], v_cache=cache[..., :lat], slot_mapping=ctx.slot_mapping,
                                v_norm_weight=norm.weight, eps=norm.eps, q_out=q_abs[..., lat:])
        else:
            c = self.kv_a_layernorm(c)
            q_pe, k_pe = rot(q_pe, positions), rot(k_pe, positions)

        topk = None
        if self.indexer is not None:
            topk = self.indexer(x, q_latent, positions, self.rotary.cos_sin, ctx, self.kv_caches.get("index_k"))
            aux["dsa_topk"] = topk
        elif self.shares_topk:
            topk = aux.get("dsa_topk")

        if ctx.uses_cache:
            out_latent = mla_attention(q_abs, cache, ctx, self.scale, lat, topk)
            # Written head-major into a token-major [T, H, V], so o_proj's reshape needs no copy.
            out = q.new_empty(t, h, self.v_dim)
            latent_to_v(out_latent, w_uv, out)
        else:
            k_nope, v = self.kv_b_proj(c).view(t, h, -1).split([self.nope_dim, self.v_dim], dim=-1)
            k = torch.cat([k_nope, k_pe[:, None, :].expand(t, h, self.rope_dim)], dim=-1)
            out = attention_without_cache(torch.cat([q_nope, q_pe], dim=-1), k, v, ctx, self.scale, topk)
        return self.o_proj(out.reshape(t, -1), residual_of(stream) if add_residual else None)
