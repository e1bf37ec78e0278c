"""Llama (dense GQA) and the GQA helpers the other GQA families (Qwen3, Qwen3-MoE, Mixtral, GLM-4.x) reuse."""
from __future__ import annotations

from torch import nn

from highspeed.config import HFConfig
from highspeed.models.attention import Attention
from highspeed.models.base import CausalLM
from highspeed.models.layers import DecoderLayer, DenseMLP, RotaryEmbedding, rope_parameters


def head_dim_of(config: HFConfig) -> int:
    return config.get("head_dim") or config.hidden_size // config.num_attention_heads


def gqa_rotary(config: HFConfig, default_partial: float = 1.0) -> RotaryEmbedding:
    params = rope_parameters(config, default_partial)
    rotary_dim = int(head_dim_of(config) * params.get("partial_rotary_factor", 1.0))
    return RotaryEmbedding(rotary_dim, config.max_position_embeddings, params, interleaved=False)


def gqa_attention(
    config: HFConfig, rotary: RotaryEmbedding, qkv_bias: bool, o_bias: bool, qk_norm: bool
) -> Attention:
    return Attention(
        config.hidden_size,
        config.num_attention_heads,
        config.get("num_key_value_heads") or config.num_attention_heads,
        head_dim_of(config),
        rotary,
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        qk_norm=qk_norm,
        eps=config.get("rms_norm_eps", 1e-6),
    )


def check_no_sliding_window(config: HFConfig) -> None:
    if config.get("use_sliding_window", False) or (
        config.get("sliding_window") and "use_sliding_window" not in config
        and config.sliding_window < config.max_position_embeddings
    ):
        raise ValueError(f"{config.architecture}: sliding-window attention is not supported")


class LlamaForCausalLM(CausalLM):
    def __init__(self, config: HFConfig):
        super().__init__(config)
        act = config.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"{config.architecture}: hidden_act {act!r} is not supported (only silu)")
        self.rotary_emb = gqa_rotary(config)
        bias = bool(config.get("attention_bias", False))
        eps = config.get("rms_norm_eps", 1e-6)
        self.model.layers = nn.ModuleList(
            DecoderLayer(
                gqa_attention(config, self.rotary_emb, bias, bias, self.qk_norm),
                DenseMLP(config.hidden_size, config.intermediate_size, bool(config.get("mlp_bias", False))),
                config.hidden_size,
                eps,
            )
            for _ in range(self.num_layers)
        )

    qk_norm = False
