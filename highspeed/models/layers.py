"""Building blocks shared by every family: linear/embedding without init, RMSNorm, RoPE, dense MLP, MoE, decoder
layer. Parameters are created with ``torch.empty`` (no init cost): the loader fills them from the checkpoint, or
``loader.build_model(random_init=True)`` initialises them. Module and parameter names follow the checkpoint names
except where projections are fused; those modules declare ``weight_sources()`` (see ``base.py``).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from highspeed.ops import build_cos_sin_cache, embedding, fused_moe, linear, rms_norm, rope, silu_and_mul
from highspeed.ops import norm as norm_ops
from highspeed.ops.norm import DeferredNorm, ResidualSum, residual_of

# A weight source: (checkpoint name relative to the declaring module, index into the parameter).
Source = tuple[str, tuple]
# Per parameter, alternative checkpoint layouts; each alternative is a list of sources that together fill it.
Sources = dict[str, list[list[Source]]]


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype)) if bias else None

    def forward(self, x: torch.Tensor | DeferredNorm, residual: torch.Tensor | None = None
                ) -> torch.Tensor | ResidualSum:
        """``x @ W^T (+ b)``; with ``residual``, a ``ResidualSum`` of it and the product (see ``ops.linear``)."""
        return linear(x, self.weight, self.bias, residual)


class MergedLinear(Linear):
    """Several projections of the same input stacked along the output dim (q|k|v, gate|up): one GEMM instead of
    several. ``parts`` names the checkpoint projections (siblings of this module) and their widths."""

    def __init__(self, in_features: int, parts: list[tuple[str, int]], bias: bool = False):
        super().__init__(in_features, sum(n for _, n in parts), bias)
        self.parts = parts

    def split(self, y: torch.Tensor) -> list[torch.Tensor]:
        return list(y.split([n for _, n in self.parts], dim=-1))

    def sources_from_parent(self, own_name: str) -> Sources:
        out: Sources = {}
        for pname in ["weight"] + (["bias"] if self.bias is not None else []):
            alt, start = [], 0
            for part, width in self.parts:
                alt.append((f"{part}.{pname}", (slice(start, start + width),)))
                start += width
            out[f"{own_name}.{pname}"] = [alt]
        return out


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return embedding(ids, self.weight)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor | ResidualSum) -> torch.Tensor:
        """``norm(x)``; for a ``ResidualSum`` (a decoder layer's output), ``norm`` of the sum it stands for."""
        if isinstance(x, ResidualSum):
            return self.deferred(x).run()
        return rms_norm(x, self.weight, self.eps)

    def deferred(self, x: torch.Tensor | ResidualSum) -> DeferredNorm:
        """This norm left to the module that reads its output, whose first kernel computes it where it can;
        ``.residual_out`` is the residual stream once it has run (see ``DeferredNorm``)."""
        return DeferredNorm(x, self.weight, self.eps)


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.bias = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


def rope_parameters(config: Any, default_partial: float = 1.0) -> dict[str, Any]:
    """RoPE settings from either config format: transformers 5.x ``rope_parameters`` or the older top-level
    ``rope_theta`` / ``rope_scaling`` / ``partial_rotary_factor``."""
    p = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    p.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    p.setdefault("partial_rotary_factor", config.get("partial_rotary_factor", default_partial))
    p["rope_type"] = p.get("rope_type") or p.get("type") or "default"
    return p


class RotaryEmbedding(nn.Module):
    """Holds the fp32 cos/sin table (one per model, shared by its layers)."""

    def __init__(self, rotary_dim: int, max_position: int, params: dict[str, Any], interleaved: bool):
        super().__init__()
        self.rotary_dim, self.interleaved = rotary_dim, interleaved
        scaling = params if params.get("rope_type", "default") != "default" else None
        table = build_cos_sin_cache(rotary_dim, max_position, float(params["rope_theta"]), scaling, max_position)
        self.register_buffer("cos_sin", table, persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, interleaved: bool | None = None) -> torch.Tensor:
        inter = self.interleaved if interleaved is None else interleaved
        return rope(x, positions, self.cos_sin, self.rotary_dim, inter)


class DenseMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))`` with gate and up fused into one projection."""

    def __init__(self, hidden: int, intermediate: int, bias: bool = False):
        super().__init__()
        self.gate_up_proj = MergedLinear(hidden, [("gate_proj", intermediate), ("up_proj", intermediate)], bias)
        self.down_proj = Linear(intermediate, hidden, bias)

    def weight_sources(self) -> Sources:
        return self.gate_up_proj.sources_from_parent("gate_up_proj")

    def forward(self, x: torch.Tensor | DeferredNorm, add_residual: bool = False) -> torch.Tensor | ResidualSum:
        """The MLP of ``x``; with ``add_residual`` (``x`` a ``DeferredNorm``) its sum with the residual stream."""
        act = silu_and_mul(self.gate_up_proj(x))
        return self.down_proj(act, residual_of(x) if add_residual else None)


class Router(nn.Module):
    """Expert router parameters; weight and correction bias stay fp32 whatever the model dtype (router math is
    fp32). The router product itself happens inside ``fused_moe``, where the decode kernels fuse it."""

    def __init__(self, hidden: int, num_experts: int, correction_bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden, dtype=torch.float32))
        self.e_score_correction_bias = (
            nn.Parameter(torch.empty(num_experts, dtype=torch.float32), requires_grad=False)
            if correction_bias else None
        )


class FusedExperts(nn.Module):
    """All routed experts as two 3-D tensors (transformers 5.x layout): ``gate_up_proj[E, 2I, H]`` (gate rows then
    up rows) and ``down_proj[E, H, I]``. Loads from per-expert checkpoint tensors or from the fused ones."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int):
        super().__init__()
        self.num_experts, self.intermediate = num_experts, intermediate
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))

    def weight_sources(self) -> Sources:
        inter, rng = self.intermediate, range(self.num_experts)
        gate_up = [(f"{j}.gate_proj.weight", (j, slice(0, inter))) for j in rng]
        gate_up += [(f"{j}.up_proj.weight", (j, slice(inter, 2 * inter))) for j in rng]
        return {
            "gate_up_proj": [gate_up, [("gate_up_proj", ())]],
            "down_proj": [[(f"{j}.down_proj.weight", (j,)) for j in rng], [("down_proj", ())]],
        }


class SparseMoE(nn.Module):
    """Routed experts plus optional shared experts (DeepSeek/GLM); names match ``mlp.{gate,experts,shared_experts}``."""

    def __init__(
        self,
        hidden: int,
        num_experts: int,
        intermediate: int,
        top_k: int,
        scoring: str = "softmax",
        renormalize: bool = True,
        correction_bias: bool = False,
        n_group: int = 1,
        topk_group: int = 1,
        routed_scaling_factor: float = 1.0,
        shared_intermediate: int = 0,
    ):
        super().__init__()
        self.top_k, self.scoring, self.renormalize = top_k, scoring, renormalize
        self.n_group, self.topk_group, self.routed_scaling_factor = n_group or 1, topk_group or 1, routed_scaling_factor
        self.gate = Router(hidden, num_experts, correction_bias)
        self.experts = FusedExperts(num_experts, hidden, intermediate)
        self.shared_experts = DenseMLP(hidden, shared_intermediate) if shared_intermediate else None

    def forward(self, x: torch.Tensor | DeferredNorm, add_residual: bool = False) -> torch.Tensor | ResidualSum:
        """The block's output; with ``add_residual`` (``x`` a ``DeferredNorm``) its sum with the residual stream
        (a norm whose residual add is still pending runs first, to know that stream)."""
        shared = self.shared_experts
        # The down kernel adds the residual only with the norm fold; otherwise the sum stays pending, and the
        # residual stream is asked for after the op, which may have computed it (the router's add-norm).
        fold = add_residual and norm_ops.FOLD_NORM
        y = fused_moe(
            x, self.gate.weight, self.experts.gate_up_proj, self.experts.down_proj, self.top_k, self.scoring,
            self.renormalize, self.gate.e_score_correction_bias, self.n_group, self.topk_group,
            self.routed_scaling_factor,
            shared.gate_up_proj.weight if shared is not None else None,
            shared.down_proj.weight if shared is not None else None,
            residual_of(x) if fold else None,
        )
        return ResidualSum(y, residual_of(x)) if add_residual and not fold else y


class DecoderLayer(nn.Module):
    """Pre-norm block ``h = x + attn(norm(x)); y = h + mlp(norm(h))``. Each layer takes the residual stream (the
    embeddings, or the previous layer's ``ResidualSum``) and returns its own ``ResidualSum``: ``attn`` and
    ``mlp`` are asked to add the residual stream to their output (``add_residual``). By default the add stays pending and the next norm launch does it
    (``add_rms_norm``); with HIGHSPEED_FOLD_NORM=1 the last kernel of the op adds it in its epilogue and stores
    the sums of squares the next norm needs, so that norm folds into its consumers (measured slower on the H200:
    ``ops/norm.py``). The model's final norm normalises the last sum.

    Both norms are deferred to the module that reads them (``DeferredNorm``): attention's first projection and
    the MLP / MoE run the norm op first, or fold it into their first kernels. ``self_attn`` and ``mlp`` therefore
    take ``Tensor | DeferredNorm``; one that has several readers of its input calls ``materialize`` first."""

    def __init__(self, self_attn: nn.Module, mlp: nn.Module, hidden: int, eps: float):
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = RMSNorm(hidden, eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor | ResidualSum, aux: dict) -> ResidualSum:
        normed = self.input_layernorm.deferred(hidden)
        h = self.self_attn(positions, normed, aux, add_residual=True)
        normed = self.post_attention_layernorm.deferred(h)
        return self.mlp(normed, add_residual=True)
