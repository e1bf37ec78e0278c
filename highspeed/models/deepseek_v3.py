"""MLA families: DeepSeek-V3 (DeepseekV3ForCausalLM), GLM-4.7-Flash (Glm4MoeLiteForCausalLM) and GLM-5 / 5.1 / 5.2
(GlmMoeDsaForCausalLM = MLA + DSA lightning indexer). All use sigmoid ``noaux_tc`` experts with a shared expert,
dense MLPs on the first layers, interleaved RoPE on the rope slice (YaRN where configured) and an optional MTP
layer (``self.mtp``, ``forward_mtp``)."""
from __future__ import annotations

from torch import nn

from highspeed.config import HFConfig
from highspeed.models.attention import Indexer, MLAttention
from highspeed.models.base import CausalLM, MtpLayer
from highspeed.models.glm4_moe import noaux_tc_moe, num_mtp_layers
from highspeed.models.layers import DecoderLayer, DenseMLP, RotaryEmbedding, rope_parameters
from highspeed.ops.rope import yarn_get_mscale


class DeepseekV3ForCausalLM(CausalLM):
    default_first_k_dense = 3
    uses_dsa = False

    def __init__(self, config: HFConfig):
        super().__init__(config)
        params = rope_parameters(config)
        self.rope_dim: int = config.qk_rope_head_dim
        self.rotary_emb = RotaryEmbedding(
            self.rope_dim, config.max_position_embeddings, params, interleaved=self.rope_interleaved(config)
        )
        scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
        if params["rope_type"] != "default" and params.get("mscale_all_dim"):
            scale *= yarn_get_mscale(params["factor"], params["mscale_all_dim"]) ** 2
        self.softmax_scale = scale

        kinds = config.get("mlp_layer_types")
        if not kinds:
            first = config.get("first_k_dense_replace", self.default_first_k_dense)
            kinds = ["dense" if i < first else "sparse" for i in range(self.num_layers)]
        self.indexer_types = self.dsa_layer_types(config) if self.uses_dsa else ["none"] * self.num_layers
        eps = config.get("rms_norm_eps", 1e-6)
        self.model.layers = nn.ModuleList(
            DecoderLayer(
                self.mla(config, self.indexer_types[i]),
                noaux_tc_moe(config) if kinds[i] == "sparse" else DenseMLP(config.hidden_size, config.intermediate_size),
                config.hidden_size,
                eps,
            )
            for i in range(self.num_layers)
        )
        if num_mtp_layers(config):
            self.mtp = MtpLayer(self.mla(config, "full" if self.uses_dsa else "none"), noaux_tc_moe(config),
                                config.hidden_size, eps)

    def rope_interleaved(self, config: HFConfig) -> bool:
        return bool(config.get("rope_interleave", True))

    @staticmethod
    def dsa_layer_types(config: HFConfig) -> list[str]:
        """"full" layers run the indexer, "shared" ones reuse the previous full layer's top-k (GLM-5.2)."""
        n = config.num_hidden_layers
        types = config.get("indexer_types")
        if types:
            return list(types)
        pattern = config.get("index_topk_pattern")
        if pattern:
            return [{"F": "full", "S": "shared"}[c] for c in pattern] if isinstance(pattern, str) else list(pattern)
        freq = max(config.get("index_topk_freq", 1) or 1, 1)
        offset = config.get("index_skip_topk_offset", 2)
        return ["full" if max(i - offset + 1, 0) % freq == 0 else "shared" for i in range(n)]

    def mla(self, config: HFConfig, indexer_type: str) -> MLAttention:
        indexer = None
        if indexer_type == "full":
            indexer = Indexer(
                config.hidden_size, config.q_lora_rank, config.get("index_n_heads", 32),
                config.get("index_head_dim", 128), config.qk_rope_head_dim, config.get("index_topk", 2048),
                interleaved=bool(config.get("indexer_rope_interleave", True)),
            )
        return MLAttention(
            config.hidden_size,
            config.num_attention_heads,
            config.get("q_lora_rank"),
            config.kv_lora_rank,
            config.qk_nope_head_dim,
            config.qk_rope_head_dim,
            config.v_head_dim,
            self.rotary_emb,
            self.softmax_scale,
            bias=bool(config.get("attention_bias", False)),
            indexer=indexer,
            shares_topk=indexer_type == "shared",
        )


class Glm4MoeLiteForCausalLM(DeepseekV3ForCausalLM):
    default_first_k_dense = 1


class GlmMoeDsaForCausalLM(DeepseekV3ForCausalLM):
    default_first_k_dense = 3
    uses_dsa = True

    def rope_interleaved(self, config: HFConfig) -> bool:
        return True  # GLM-5 always rotates interleaved pairs (transformers ignores rope_interleave here)
