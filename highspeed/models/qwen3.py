"""Qwen3 dense: Llama plus per-head QK RMSNorm (and an explicit head_dim)."""
from __future__ import annotations

from highspeed.config import HFConfig
from highspeed.models.llama import LlamaForCausalLM, check_no_sliding_window


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True

    def __init__(self, config: HFConfig):
        check_no_sliding_window(config)
        super().__init__(config)
