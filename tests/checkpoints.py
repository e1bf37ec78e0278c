"""Tiny random transformers checkpoints of every supported architecture (fp32, seeded, with a tokenizer).

``make_tiny_checkpoint(arch, path, **overrides)`` writes a complete HF folder (config.json, model.safetensors,
tokenizer, chat template) and returns its path. Sizes are tiny but chosen so each family's distinctive features
engage: expert routing with shared experts and dense-vs-sparse layers, grouped top-k, QK-norm, q/k/v bias, partial
RoPE, llama3 / YaRN scaling, MLA with and without q-LoRA, and DSA with ``index_topk=8`` (prompts longer than 8
make the indexer choose). ``glm_moe_dsa`` and ``deepseek_v3`` also get an MTP layer (``model.layers.{L}.*``) that
transformers ignores; its decoder block is what transformers builds for layer L of an (L+1)-layer model, so
``hf_mtp_block(path)`` can serve as the oracle for ``forward_mtp``.
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch

ALL_ARCHS = [
    "llama", "qwen3", "qwen3_moe", "mixtral", "glm4_moe",
    "deepseek_v3", "deepseek_v3_no_q_lora", "glm4_moe_lite", "glm_moe_dsa",
]
VOCAB_SIZE = 320
SEED = 1234

_COMMON = dict(vocab_size=VOCAB_SIZE, hidden_size=64, max_position_embeddings=512, initializer_range=0.1,
               rms_norm_eps=1e-6, tie_word_embeddings=False)
_MLA = dict(num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=16, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
            num_experts_per_tok=2, n_shared_experts=1, norm_topk_prob=True)

CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaForCausalLM", dict(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=96,
        attention_bias=True, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "qwen3": ("Qwen3ForCausalLM", dict(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32, intermediate_size=96,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "qwen3_moe": ("Qwen3MoeForCausalLM", dict(
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=96,
        moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1],
        decoder_sparse_step=1, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "mixtral": ("MixtralForCausalLM", dict(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
        num_local_experts=4, num_experts_per_tok=2, sliding_window=None,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "glm4_moe": ("Glm4MoeForCausalLM", dict(
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=32, intermediate_size=96,
        moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1,
        first_k_dense_replace=1, n_group=2, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True,
        attention_bias=True, use_qk_norm=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "partial_rotary_factor": 0.5})),
    "deepseek_v3": ("DeepseekV3ForCausalLM", dict(
        _MLA, num_hidden_layers=3, first_k_dense_replace=1, n_group=4, topk_group=2, routed_scaling_factor=2.5,
        rope_interleave=True, max_position_embeddings=1280,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                         "original_max_position_embeddings": 32, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "beta_fast": 32, "beta_slow": 1})),
    "deepseek_v3_no_q_lora": ("DeepseekV3ForCausalLM", dict(
        _MLA, q_lora_rank=None, num_hidden_layers=2, first_k_dense_replace=1, n_group=1, topk_group=1,
        routed_scaling_factor=1.5, rope_interleave=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "glm4_moe_lite": ("Glm4MoeLiteForCausalLM", dict(
        _MLA, num_hidden_layers=3, routed_scaling_factor=1.8, mlp_layer_types=["dense", "sparse", "sparse"],
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "glm_moe_dsa": ("GlmMoeDsaForCausalLM", dict(
        _MLA, num_hidden_layers=3, routed_scaling_factor=2.5, mlp_layer_types=["dense", "sparse", "sparse"],
        index_topk=8, index_head_dim=16, index_n_heads=8,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
}
MTP_ARCHS = {"deepseek_v3", "glm_moe_dsa"}

_TOKENIZER = None
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "Hello, world! How are you today?",
    "Mixture of experts routes each token to a few experts.", "def add(a, b):\n    return a + b\n",
    "Paged attention stores keys and values in fixed-size blocks.", "1 2 3 4 5 6 7 8 9 10 100 1000",
    "GLM, DeepSeek, Qwen, Mixtral and Llama are language models.",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer():
    """Byte-level BPE (~300 tokens) with <|endoftext|> (eos, id 0), <|im_start|>, <|im_end|> and a chat template."""
    global _TOKENIZER
    if _TOKENIZER is None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(_CORPUS * 4, trainer)
        _TOKENIZER = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                             pad_token="<|endoftext|>", additional_special_tokens=specials[1:])
        _TOKENIZER.chat_template = CHAT_TEMPLATE
        assert len(_TOKENIZER) <= VOCAB_SIZE
    return _TOKENIZER


def hf_config(arch: str, **overrides: Any):
    """The transformers config object for a tiny ``arch`` (``overrides`` replace fields)."""
    from transformers import AutoConfig, CONFIG_MAPPING  # noqa: F401

    import transformers

    class_name, fields = CONFIGS[arch]
    cfg_cls = getattr(transformers, class_name.replace("ForCausalLM", "Config"))
    kwargs = dict(_COMMON)
    kwargs.update(fields)
    kwargs.update(overrides)
    tok = tiny_tokenizer()
    kwargs.setdefault("eos_token_id", tok.eos_token_id)
    kwargs.setdefault("pad_token_id", tok.pad_token_id)
    kwargs.setdefault("bos_token_id", None)
    config = cfg_cls(**kwargs)
    config.architectures = [class_name]
    return config


def _perturb_(model: torch.nn.Module, gen: torch.Generator) -> None:
    """transformers initialises norms to 1 and biases / correction biases to 0; make them random so a swapped or
    ignored one shows up in the logits."""
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point() or "inv_freq" in name:
                continue
            if "norm" in name and name.endswith("weight"):
                t.copy_(1.0 + 0.2 * torch.randn(t.shape, generator=gen))
            elif name.endswith("bias"):
                t.copy_(0.1 * torch.randn(t.shape, generator=gen))


def _build_hf_model(arch: str, seed: int, **overrides: Any):
    import transformers

    config = hf_config(arch, **overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, CONFIGS[arch][0])(config).float().eval()
    _perturb_(model, torch.Generator().manual_seed(seed + 1))
    return model


def make_tiny_checkpoint(arch: str, path: str | os.PathLike, **overrides: Any) -> str:
    """Write a tiny random checkpoint of ``arch`` (a key of ``ALL_ARCHS``) to ``path``; returns ``str(path)``.
    ``overrides`` change config fields (e.g. ``num_hidden_layers=1``, ``index_topk=4``). Deterministic."""
    if arch not in CONFIGS:
        raise ValueError(f"unknown tiny arch {arch!r}; choose from {ALL_ARCHS}")
    path = str(path)
    os.makedirs(path, exist_ok=True)
    with_mtp = arch in MTP_ARCHS and overrides.get("num_nextn_predict_layers", 1) > 0
    if not with_mtp:
        model = _build_hf_model(arch, SEED, **overrides)
        model.save_pretrained(path)
    else:
        _save_with_mtp(arch, path, overrides)
    tiny_tokenizer().save_pretrained(path)
    return path


def _save_with_mtp(arch: str, path: str, overrides: dict[str, Any]) -> None:
    """Build an (L+1)-layer model, save it, then declare L layers in config.json and add the MTP-only tensors
    (enorm, hnorm, eh_proj, shared_head.norm) for layer L; layers 0..L-1 are what transformers loads."""
    from safetensors.torch import load_file, save_file

    n = overrides.pop("num_hidden_layers", CONFIGS[arch][1]["num_hidden_layers"])
    big = dict(overrides, num_hidden_layers=n + 1, num_nextn_predict_layers=1)
    if "mlp_layer_types" in CONFIGS[arch][1] or "mlp_layer_types" in overrides:
        kinds = list(overrides.get("mlp_layer_types", CONFIGS[arch][1]["mlp_layer_types"]))[:n]
        big["mlp_layer_types"] = kinds + ["sparse"]
    model = _build_hf_model(arch, SEED, **big)
    model.save_pretrained(path)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg["num_hidden_layers"] = n
    for key in ("mlp_layer_types", "indexer_types", "layer_types"):
        if isinstance(cfg.get(key), list):
            cfg[key] = cfg[key][:n]
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    weights_file = os.path.join(path, "model.safetensors")
    tensors = load_file(weights_file)
    h = cfg["hidden_size"]
    gen = torch.Generator().manual_seed(SEED + 2)
    tensors[f"model.layers.{n}.enorm.weight"] = 1.0 + 0.2 * torch.randn(h, generator=gen)
    tensors[f"model.layers.{n}.hnorm.weight"] = 1.0 + 0.2 * torch.randn(h, generator=gen)
    tensors[f"model.layers.{n}.eh_proj.weight"] = 0.1 * torch.randn(h, 2 * h, generator=gen)
    tensors[f"model.layers.{n}.shared_head.norm.weight"] = 1.0 + 0.2 * torch.randn(h, generator=gen)
    save_file(tensors, weights_file, metadata={"format": "pt"})


def hf_mtp_block(path: str):
    """transformers' decoder layer L (the MTP block) of a checkpoint written by ``make_tiny_checkpoint``."""
    import transformers

    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    n = cfg["num_hidden_layers"]
    arch = cfg["architectures"][0]
    overrides = {"num_hidden_layers": n + 1}
    if isinstance(cfg.get("mlp_layer_types"), list):
        overrides["mlp_layer_types"] = cfg["mlp_layer_types"] + ["sparse"]
    if isinstance(cfg.get("indexer_types"), list):
        overrides["indexer_types"] = cfg["indexer_types"] + ["full"]
    model = getattr(transformers, arch).from_pretrained(path, dtype=torch.float32, **overrides).eval()
    return model
