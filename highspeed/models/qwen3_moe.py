"""Qwen3-MoE: Qwen3 attention (QK-norm), softmax top-k experts; dense MLP on ``mlp_only_layers`` and on layers
skipped by ``decoder_sparse_step``."""
from __future__ import annotations

from torch import nn

from highspeed.config import HFConfig
from highspeed.models.base import CausalLM
from highspeed.models.layers import DecoderLayer, DenseMLP, SparseMoE
from highspeed.models.llama import check_no_sliding_window, gqa_attention, gqa_rotary


class Qwen3MoeForCausalLM(CausalLM):
    def __init__(self, config: HFConfig):
        super().__init__(config)
        check_no_sliding_window(config)
        self.rotary_emb = gqa_rotary(config)
        bias = bool(config.get("attention_bias", False))
        num_experts = config.get("num_experts") or config.get("num_local_experts", 0)  # 5.x saves the latter
        step = config.get("decoder_sparse_step", 1) or 1
        only_dense = set(config.get("mlp_only_layers") or [])
        layers = []
        for i in range(self.num_layers):
            if i not in only_dense and num_experts > 0 and (i + 1) % step == 0:
                mlp: nn.Module = SparseMoE(
                    config.hidden_size, num_experts, config.moe_intermediate_size, config.num_experts_per_tok,
                    scoring="softmax", renormalize=bool(config.get("norm_topk_prob", False)),
                )
            else:
                mlp = DenseMLP(config.hidden_size, config.intermediate_size)
            attn = gqa_attention(config, self.rotary_emb, bias, bias, qk_norm=True)
            layers.append(DecoderLayer(attn, mlp, config.hidden_size, config.get("rms_norm_eps", 1e-6)))
        self.model.layers = nn.ModuleList(layers)
