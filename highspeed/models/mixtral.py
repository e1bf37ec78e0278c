"""Mixtral: GQA + softmax top-k experts (always renormalised). Checkpoints name the block ``block_sparse_moe`` and
the expert projections w1 (gate), w3 (up), w2 (down); transformers 5.x fused saves use ``mlp.experts.*``."""
from __future__ import annotations

import re

from torch import nn

from highspeed.config import HFConfig
from highspeed.models.base import CausalLM
from highspeed.models.layers import DecoderLayer, SparseMoE
from highspeed.models.llama import check_no_sliding_window, gqa_attention, gqa_rotary

_EXPERT_RENAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


class MixtralForCausalLM(CausalLM):
    def __init__(self, config: HFConfig):
        super().__init__(config)
        check_no_sliding_window(config)
        self.rotary_emb = gqa_rotary(config)
        self.model.layers = nn.ModuleList(
            DecoderLayer(
                gqa_attention(config, self.rotary_emb, False, False, qk_norm=False),
                SparseMoE(config.hidden_size, config.num_local_experts, config.intermediate_size,
                          config.num_experts_per_tok, scoring="softmax", renormalize=True),
                config.hidden_size,
                config.get("rms_norm_eps", 1e-5),
            )
            for _ in range(self.num_layers)
        )

    def checkpoint_name(self, name: str) -> str | None:
        name = name.replace(".block_sparse_moe.", ".mlp.")
        name = re.sub(r"(\.experts\.\d+\.)(w[123])\.", lambda m: m.group(1) + _EXPERT_RENAMES[m.group(2)] + ".", name)
        return super().checkpoint_name(name)
