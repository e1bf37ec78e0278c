"""GLM-4.5 / 4.6 / 4.7 (Glm4MoeForCausalLM): GQA with q/k/v bias, optional QK-norm and partial NeoX RoPE (half of
head_dim by default); dense MLP below ``first_k_dense_replace``, then sigmoid ``noaux_tc`` experts (correction
bias for selection only, grouped top-k, routed scaling) plus a shared expert. Optional MTP layer."""
from __future__ import annotations

from torch import nn

from highspeed.config import HFConfig
from highspeed.models.base import CausalLM, MtpLayer
from highspeed.models.layers import DecoderLayer, DenseMLP, SparseMoE
from highspeed.models.llama import gqa_attention, gqa_rotary


def noaux_tc_moe(config: HFConfig) -> SparseMoE:
    """The sigmoid-routed MoE of DeepSeek-V3 and the GLM families."""
    scoring = config.get("scoring_func", "sigmoid")
    if scoring != "sigmoid":
        raise ValueError(f"{config.architecture}: scoring_func {scoring!r} is not supported (only sigmoid)")
    return SparseMoE(
        config.hidden_size,
        config.n_routed_experts,
        config.moe_intermediate_size,
        config.num_experts_per_tok,
        scoring="sigmoid",
        renormalize=bool(config.get("norm_topk_prob", True)),
        correction_bias=True,
        n_group=config.get("n_group", 1) or 1,
        topk_group=config.get("topk_group", 1) or 1,
        routed_scaling_factor=float(config.get("routed_scaling_factor", 1.0)),
        shared_intermediate=config.moe_intermediate_size * (config.get("n_shared_experts", 0) or 0),
    )


def num_mtp_layers(config: HFConfig) -> int:
    return int(config.get("num_nextn_predict_layers", 0) or 0)


class Glm4MoeForCausalLM(CausalLM):
    def __init__(self, config: HFConfig):
        super().__init__(config)
        self.rotary_emb = gqa_rotary(config, default_partial=0.5)
        first_dense = config.get("first_k_dense_replace", 1)
        eps = config.get("rms_norm_eps", 1e-5)

        def attention():
            return gqa_attention(config, self.rotary_emb, bool(config.get("attention_bias", False)), False,
                                 bool(config.get("use_qk_norm", False)))

        self.model.layers = nn.ModuleList(
            DecoderLayer(attention(),
                         noaux_tc_moe(config) if i >= first_dense else DenseMLP(config.hidden_size,
                                                                                config.intermediate_size),
                         config.hidden_size, eps)
            for i in range(self.num_layers)
        )
        if num_mtp_layers(config):
            self.mtp = MtpLayer(attention(), noaux_tc_moe(config), config.hidden_size, eps)
