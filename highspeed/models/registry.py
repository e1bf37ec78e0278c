"""HF architecture name -> model class. The engine reaches models only through here."""
from __future__ import annotations

from torch import nn

from highspeed.models.deepseek_v3 import DeepseekV3ForCausalLM, Glm4MoeLiteForCausalLM, GlmMoeDsaForCausalLM
from highspeed.models.glm4_moe import Glm4MoeForCausalLM
from highspeed.models.llama import LlamaForCausalLM
from highspeed.models.mixtral import MixtralForCausalLM
from highspeed.models.qwen3 import Qwen3ForCausalLM
from highspeed.models.qwen3_moe import Qwen3MoeForCausalLM

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Glm4MoeForCausalLM": Glm4MoeForCausalLM,
    "DeepseekV3ForCausalLM": DeepseekV3ForCausalLM,
    "Glm4MoeLiteForCausalLM": Glm4MoeLiteForCausalLM,
    "GlmMoeDsaForCausalLM": GlmMoeDsaForCausalLM,
}


def get_model_class(arch: str) -> type[nn.Module]:
    try:
        return ARCHITECTURES[arch]
    except KeyError:
        raise ValueError(
            f"unsupported architecture {arch!r}; supported: {', '.join(sorted(ARCHITECTURES))}"
        ) from None
