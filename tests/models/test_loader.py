"""Loader: sharded and fused-expert checkpoints, bf16, random weights, MTP handling and clear errors."""
from __future__ import annotations

import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from highspeed.config import HFConfig
from highspeed.models.loader import build_model, load_model
from tests.checkpoints import make_tiny_checkpoint
from tests.models.paged_runner import forward_without_cache
from tests.models.test_model_oracle import assert_logits_close, prompt

SEQS = [prompt(12, 21), prompt(7, 22)]


def _logits(path: str, **kw) -> torch.Tensor:
    model, _ = load_model(path, progress=False, **kw)
    return forward_without_cache(model, SEQS)


def _rewrite(path: str, edit) -> None:
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_sharded_checkpoint(tmp_path):
    import transformers

    single = make_tiny_checkpoint("qwen3_moe", tmp_path / "single")
    hf = transformers.Qwen3MoeForCausalLM.from_pretrained(single)
    sharded = str(tmp_path / "sharded")
    hf.save_pretrained(sharded, max_shard_size="60KB")
    index = json.load(open(os.path.join(sharded, "model.safetensors.index.json")))
    assert len(set(index["weight_map"].values())) > 2
    torch.testing.assert_close(_logits(sharded), _logits(single))


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "glm_moe_dsa"])
def test_fused_expert_layout(arch, tmp_path):
    """Re-save with transformers 5.x fused 3-D expert tensors (mlp.experts.gate_up_proj / down_proj)."""
    path = make_tiny_checkpoint(arch, tmp_path)
    reference = _logits(path)

    def fuse(t: dict) -> None:
        per_expert = re.compile(r"(.*)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight$")
        groups: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
        for name in list(t):
            m = per_expert.match(name)
            if m:
                groups.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = t.pop(name)
        assert groups
        alias = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
        for layer, experts in groups.items():
            ex = [{alias.get(k, k): v for k, v in experts[j].items()} for j in range(len(experts))]
            t[f"{layer}.mlp.experts.gate_up_proj"] = torch.stack([torch.cat([e["gate_proj"], e["up_proj"]]) for e in ex])
            t[f"{layer}.mlp.experts.down_proj"] = torch.stack([e["down_proj"] for e in ex])
            if f"{layer}.block_sparse_moe.gate.weight" in t:
                t[f"{layer}.mlp.gate.weight"] = t.pop(f"{layer}.block_sparse_moe.gate.weight")

    _rewrite(path, fuse)
    torch.testing.assert_close(_logits(path), reference)


def test_bf16_checkpoint(tmp_path):
    import transformers

    path = make_tiny_checkpoint("glm4_moe", tmp_path / "fp32")
    bf16 = str(tmp_path / "bf16")
    transformers.Glm4MoeForCausalLM.from_pretrained(path).to(torch.bfloat16).save_pretrained(bf16)
    model, _ = load_model(bf16, progress=False)  # auto = the checkpoint's dtype
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    router = model.model.layers[1].mlp.gate
    assert router.weight.dtype == torch.float32 and router.e_score_correction_bias.dtype == torch.float32
    got = forward_without_cache(model, SEQS)
    ref = _logits(path)
    assert (got - ref).abs().max() / ref.abs().max() < 0.1
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8
    assert load_model(bf16, dtype="float32", progress=False)[0].lm_head.weight.dtype == torch.float32


def test_missing_tensor_is_named(tmp_path):
    path = make_tiny_checkpoint("deepseek_v3", tmp_path)
    _rewrite(path, lambda t: t.pop("model.layers.1.self_attn.kv_b_proj.weight"))
    with pytest.raises(ValueError, match=r"missing.*model\.layers\.1\.self_attn\.kv_b_proj\.weight"):
        load_model(path, progress=False)


def test_missing_expert_is_named(tmp_path):
    path = make_tiny_checkpoint("qwen3_moe", tmp_path)
    _rewrite(path, lambda t: t.pop("model.layers.2.mlp.experts.5.up_proj.weight"))
    with pytest.raises(ValueError, match=r"model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight"):
        load_model(path, progress=False)


def test_misshaped_tensor_is_named(tmp_path):
    path = make_tiny_checkpoint("llama", tmp_path)
    _rewrite(path, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(8, 64)}))
    with pytest.raises(ValueError, match=r"k_proj\.weight.*\(8, 64\).*\(32, 64\)"):
        load_model(path, progress=False)


def test_unexpected_tensor_is_named(tmp_path):
    path = make_tiny_checkpoint("qwen3", tmp_path)
    _rewrite(path, lambda t: t.update({"model.layers.0.mystery.weight": torch.zeros(3)}))
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.0\.mystery\.weight'"):
        load_model(path, progress=False)


def test_unsupported_architecture(tmp_path):
    path = make_tiny_checkpoint("qwen3", tmp_path)
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["architectures"] = ["FancyNewForCausalLM"]
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(ValueError, match="unsupported architecture 'FancyNewForCausalLM'"):
        load_model(path, progress=False)


def test_unreadable_weights_file(tmp_path):
    path = make_tiny_checkpoint("qwen3", tmp_path)
    with open(os.path.join(path, "model.safetensors"), "wb") as f:
        f.write(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match=r"cannot read weights file .*model\.safetensors"):
        load_model(path, progress=False)
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        load_model(path, progress=False)


def test_mtp_dropped_when_checkpoint_has_none(tmp_path):
    path = make_tiny_checkpoint("deepseek_v3", tmp_path, num_nextn_predict_layers=0)
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["num_nextn_predict_layers"] = 1  # config promises MTP, weights carry none (like transformers tiny models)
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    model, _ = load_model(path, progress=False)
    assert model.mtp is None
    with pytest.raises(RuntimeError, match="no MTP layer"):
        model.forward_mtp(torch.tensor([1]), torch.tensor([0]), torch.zeros(1, 64))


def test_mtp_kept_and_its_copies_of_embedding_and_head_ignored(tmp_path):
    path = make_tiny_checkpoint("deepseek_v3", tmp_path)
    n = json.load(open(os.path.join(path, "config.json")))["num_hidden_layers"]
    _rewrite(path, lambda t: t.update({f"model.layers.{n}.embed_tokens.weight": t["model.embed_tokens.weight"].clone(),
                                       f"model.layers.{n}.shared_head.head.weight": t["lm_head.weight"].clone(),
                                       f"model.layers.{n + 1}.eh_proj.weight": torch.zeros(1)}))
    model, _ = load_model(path, progress=False)
    assert model.mtp is not None
    assert "mtp.eh_proj.weight" in dict(model.named_parameters())


@pytest.mark.parametrize("arch", ["glm_moe_dsa", "qwen3_moe"])
def test_random_weights_and_training_gradients(arch, tmp_path):
    path = make_tiny_checkpoint(arch, tmp_path)
    model = build_model(HFConfig.from_pretrained(path), torch.float32, "cpu", random_init=True)
    assert model.model.layers[0].input_layernorm.weight.eq(1).all()
    model.train()
    from highspeed.context import prefill_context, use_context

    seqs = [prompt(14, 31), prompt(9, 32)]
    ids = torch.tensor([t for s in seqs for t in s])
    pos = torch.tensor([p for s in seqs for p in range(len(s))])
    with use_context(prefill_context([len(s) for s in seqs])):
        loss = torch.nn.functional.cross_entropy(model.compute_logits(model(ids, pos))[:-1], ids[1:])
    loss.backward()
    assert torch.isfinite(loss)
    no_grad = [n for n, p in model.named_parameters()
               if p.requires_grad and p.grad is None and "indexer" not in n and not n.startswith("mtp.")]
    assert not no_grad, no_grad
