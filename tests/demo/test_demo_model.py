"""The shipped demo checkpoint (highspeed/demo/model): loads in transformers, matches highspeed, fits the budget."""
from __future__ import annotations

import json
import os

import pytest
import torch

from highspeed.demo.prompts import CHAT_PROMPTS, TEXT_PROMPTS

MODEL_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "highspeed", "demo", "model")
MODEL_DIR = os.path.normpath(MODEL_DIR)

pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(MODEL_DIR, "model.safetensors")),
                                reason="the demo checkpoint is not committed yet")


@pytest.fixture(scope="module")
def config() -> dict:
    with open(os.path.join(MODEL_DIR, "config.json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32, output_loading_info=True)
    return model.eval(), info


def test_size_budget():
    total = sum(os.path.getsize(os.path.join(MODEL_DIR, f)) for f in os.listdir(MODEL_DIR))
    assert os.path.getsize(os.path.join(MODEL_DIR, "model.safetensors")) <= 16 * 2**20
    assert total <= 25 * 10**6, f"demo model folder is {total / 1e6:.1f} MB"


def test_config_is_glm5_with_dsa_engaging_on_demo_prompts(config, tokenizer):
    assert config["architectures"] == ["GlmMoeDsaForCausalLM"]
    assert config["model_type"] == "glm_moe_dsa"
    assert config["rope_interleave"] is True and config["indexer_rope_interleave"] is True
    assert config["n_group"] == config["topk_group"] == 1
    assert config["n_shared_experts"] == 1 and config["n_routed_experts"] > config["num_experts_per_tok"] > 1
    assert config["num_nextn_predict_layers"] == 1
    lengths = [len(tokenizer(p)["input_ids"]) for p in TEXT_PROMPTS]
    # The long demo prompt alone is past index_topk, so the indexer's selection is really used.
    assert config["index_topk"] < max(lengths), (config["index_topk"], lengths)


def test_checkpoint_layout_is_glm5(config):
    from safetensors import safe_open

    L = config["num_hidden_layers"]
    with safe_open(os.path.join(MODEL_DIR, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor(f"model.layers.{L - 1}.mlp.gate.e_score_correction_bias").dtype == torch.float32
        assert f.get_tensor("lm_head.weight").dtype == torch.bfloat16
    for j in range(config["n_routed_experts"]):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert f"model.layers.{L - 1}.mlp.experts.{j}.{proj}.weight" in keys
            assert f"model.layers.{L}.mlp.experts.{j}.{proj}.weight" in keys
    for name in ("enorm", "hnorm", "eh_proj", "shared_head.norm"):
        assert f"model.layers.{L}.{name}.weight" in keys
    assert f"model.layers.{L}.self_attn.indexer.wq_b.weight" in keys
    assert not any(k.endswith("gate_up_proj") for k in keys), "experts must be stored per expert"


def test_transformers_loads_everything_but_the_mtp_layer(hf_model, config):
    _, info = hf_model
    L = config["num_hidden_layers"]
    assert not info["missing_keys"]
    assert info["unexpected_keys"] and all(k.startswith(f"model.layers.{L}.") for k in info["unexpected_keys"])


def test_tokenizer_round_trips(tokenizer):
    texts = [
        "Sherlock Holmes took his bottle from the corner of the mantelpiece.",
        "  Leading spaces, tabs\tand\nnewlines\n\nsurvive. Ünïcödé — “quotes” ‘too’ 1812 ½ 日本語 🙂",
        "",
    ]
    for t in texts:
        ids = tokenizer(t)["input_ids"]
        assert tokenizer.decode(ids) == t
    # Special tokens are single ids, and plain text never produces them.
    for s in ("<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>"):
        assert len(tokenizer(s)["input_ids"]) == 1
    assert tokenizer.eos_token == "<|endoftext|>"


def test_chat_template(tokenizer, config):
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
         {"role": "assistant", "content": "Good day."}, {"role": "user", "content": "And then?"}],
        tokenize=False, add_generation_prompt=True)
    assert text == ("[gMASK]<sop><|system|>\nBe brief.<|user|>\nHello<|assistant|>\nGood day.<|endoftext|>"
                    "<|user|>\nAnd then?<|assistant|>\n")
    from highspeed.demo.tokenizer import render_chat

    assert tokenizer.apply_chat_template(CHAT_PROMPTS[0], tokenize=False, add_generation_prompt=True) == \
        render_chat(CHAT_PROMPTS[0], add_generation_prompt=True)
    # Generation stops at eos or at the next user turn, as GLM's does.
    assert set(config["eos_token_id"]) == {tokenizer.convert_tokens_to_ids("<|endoftext|>"),
                                           tokenizer.convert_tokens_to_ids("<|user|>")}
    with pytest.raises(Exception):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def _long_prompt_ids(tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer(max(TEXT_PROMPTS, key=len))["input_ids"]])


def test_training_model_matches_transformers(hf_model, tokenizer, config):
    """The training-side implementation (used for the card's numbers) equals the oracle on the shipped weights."""
    from highspeed.demo.evaluate import load_checkpoint

    model, _ = load_checkpoint(MODEL_DIR)
    ids = _long_prompt_ids(tokenizer)
    assert ids.shape[1] > config["index_topk"]
    with torch.no_grad():
        ref = hf_model[0](ids).logits[0]
        ours = model.logits(model(ids, sparse=True).hidden)[0]
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_dsa_changes_the_result_past_index_topk(tokenizer, config):
    """Sparse attention really engages: dense attention gives different logits on the long prompt."""
    from highspeed.demo.evaluate import load_checkpoint

    model, _ = load_checkpoint(MODEL_DIR)
    ids = _long_prompt_ids(tokenizer)
    with torch.no_grad():
        sparse = model.logits(model(ids, sparse=True).hidden)[0]
        dense = model.logits(model(ids, sparse=False).hidden)[0]
    k = config["index_topk"]
    torch.testing.assert_close(sparse[:k], dense[:k], atol=1e-4, rtol=1e-4)
    assert (sparse[k:] - dense[k:]).abs().max() > 1e-3


def test_highspeed_matches_transformers(hf_model, tokenizer):
    loader = pytest.importorskip("highspeed.models.loader")
    from highspeed.context import prefill_context, use_context

    model, _ = loader.load_model(MODEL_DIR, torch.float32, "cpu", progress=False)
    ids = _long_prompt_ids(tokenizer)
    with torch.no_grad():
        ref = hf_model[0](ids).logits[0]
        flat = ids[0]
        with use_context(prefill_context([flat.numel()])):
            hidden = model(flat, torch.arange(flat.numel()))
        ours = model.compute_logits(hidden)
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_highspeed_mtp_matches_training_model(tokenizer):
    """highspeed's MTP layer computes what the MTP was trained to compute: entry i sees Emb(t_{i+1}) and the main
    model's post-final-norm hidden h_i at position i (embedding zeroed at position 0)."""
    loader = pytest.importorskip("highspeed.models.loader")
    from highspeed.context import prefill_context, use_context
    from highspeed.demo.evaluate import load_checkpoint

    model, _ = loader.load_model(MODEL_DIR, torch.float32, "cpu", progress=False)
    if not hasattr(model, "forward_mtp"):
        pytest.skip("highspeed's model has no forward_mtp yet")
    ref_model, _ = load_checkpoint(MODEL_DIR)
    ids = _long_prompt_ids(tokenizer)
    with torch.no_grad():
        ref_hidden = ref_model(ids, sparse=True).hidden
        ref_mtp, _ = ref_model.forward_mtp(ids[:, 1:], ref_hidden[:, :-1], sparse=True)
        ref_logits = ref_model.logits(ref_mtp)[0]
        n = ids.shape[1] - 1
        with use_context(prefill_context([n])):
            h = model.forward_mtp(ids[0, 1:], torch.arange(n), ref_hidden[0, :-1])
        ours = model.compute_logits(h)
    torch.testing.assert_close(ours, ref_logits, atol=2e-4, rtol=1e-4)


def test_model_card_reports_measured_numbers():
    with open(os.path.join(MODEL_DIR, "train_log.json"), encoding="utf-8") as f:
        metrics = json.load(f)["metrics"]
    with open(os.path.join(MODEL_DIR, "README.md"), encoding="utf-8") as f:
        card = f.read()
    assert f"{metrics['heldout_ppl']:.2f}" in card
    assert f"{metrics['mtp_acceptance']['acceptance']:.1%}" in card
    assert metrics["samples"][0]["greedy"].strip() in card
    assert os.path.isfile(os.path.join(MODEL_DIR, "loss_curve.png"))


def test_transformers_generate_reproduces_the_card_samples(hf_model, tokenizer, config):
    """End to end: transformers' own generate (KV cache, DSA past index_topk) gives the greedy continuations that
    the training code produced for the model card, token for token."""
    with open(os.path.join(MODEL_DIR, "train_log.json"), encoding="utf-8") as f:
        log = json.load(f)
    samples = [s for s in log["metrics"]["samples"] if "prompt" in s]
    model = hf_model[0]
    for s in samples:
        ids = tokenizer(s["prompt"], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=log["args"]["sample_tokens"], do_sample=False,
                                 eos_token_id=config["eos_token_id"], pad_token_id=config["pad_token_id"])
        assert tokenizer.decode(out[0, ids.shape[1]:]) == s["greedy"]
