"""GLM-5 specifics: the DSA indexer's selection matters past index_topk and matches transformers; shared-indexer
layers (GLM-5.2); the MTP layer loads and ``forward_mtp`` matches transformers' decoder block."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open

from highspeed.context import prefill_context, use_context
from highspeed.models.attention import Indexer
from highspeed.models.loader import load_model
from tests.checkpoints import hf_mtp_block, make_tiny_checkpoint
from tests.models.paged_runner import PagedRunner, forward_without_cache
from tests.models.test_model_oracle import assert_logits_close, hf_logits, prompt


@pytest.fixture(scope="module")
def dsa(tmp_path_factory):
    import transformers

    path = make_tiny_checkpoint("glm_moe_dsa", tmp_path_factory.mktemp("dsa"))
    ours, _ = load_model(path, dtype=torch.float32, progress=False)
    hf = transformers.GlmMoeDsaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, ours, hf


def set_topk(model, k: int) -> None:
    for m in model.modules():
        if isinstance(m, Indexer):
            m.topk = k


def test_sparse_selection_changes_logits_and_matches_transformers(dsa):
    path, ours, hf = dsa
    tokens = prompt(30, 11)
    sparse = forward_without_cache(ours, [tokens])
    set_topk(ours, 10**6)
    try:
        dense = forward_without_cache(ours, [tokens])
    finally:
        set_topk(ours, 8)
    # Up to index_topk tokens every causal position is selected, so sparse == dense there; beyond, it differs.
    torch.testing.assert_close(sparse[:8], dense[:8], rtol=1e-5, atol=1e-5)
    assert (sparse[8:] - dense[8:]).abs().max() > 1e-2
    assert_logits_close(sparse, hf_logits(hf, tokens))
    # transformers with a large index_topk is the dense model: our dense path matches it too.
    import transformers

    hf_dense = transformers.GlmMoeDsaForCausalLM.from_pretrained(path, dtype=torch.float32, index_topk=4096).eval()
    assert_logits_close(dense, hf_logits(hf_dense, tokens))


def test_paged_decode_long_context(dsa):
    """Decode deep past index_topk with tiny blocks: the indexer key cache and top-k path are exercised."""
    _, ours, hf = dsa
    tokens = prompt(40, 12)
    runner = PagedRunner(ours, block_size=2)
    runner.add("s", tokens)
    logits = [runner.step([("s", 3)])] + [runner.step([("s", 1)]) for _ in range(len(tokens) - 3)]
    assert_logits_close(torch.cat(logits), hf_logits(hf, tokens))


def test_shared_indexer_layers(tmp_path):
    """GLM-5.2's IndexShare: "shared" layers reuse the previous full layer's top-k and ship no indexer weights."""
    import transformers

    path = make_tiny_checkpoint("glm_moe_dsa", tmp_path, indexer_types=["full", "shared", "full"],
                                num_nextn_predict_layers=0)
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        assert not any(k.startswith("model.layers.1.self_attn.indexer") for k in f.keys())
    ours, _ = load_model(path, dtype=torch.float32, progress=False)
    assert ours.model.layers[1].self_attn.indexer is None and ours.model.layers[1].self_attn.shares_topk
    hf = transformers.GlmMoeDsaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokens = prompt(26, 13)
    assert_logits_close(forward_without_cache(ours, [tokens]), hf_logits(hf, tokens))
    runner = PagedRunner(ours)
    runner.add("s", tokens)
    got = torch.cat([runner.step([("s", 10)])] + [runner.step([("s", 1)]) for _ in range(16)])
    assert_logits_close(got, hf_logits(hf, tokens))


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def test_mtp_layer_matches_transformers_block(dsa):
    path, ours, hf = dsa
    assert ours.mtp is not None
    cfg = json.load(open(os.path.join(path, "config.json")))
    n, eps = cfg["num_hidden_layers"], cfg["rms_norm_eps"]
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        w = {k.split(f"model.layers.{n}.")[1]: f.get_tensor(k) for k in f.keys() if k.startswith(f"model.layers.{n}.")}
    tokens = prompt(20, 14)
    ids, pos = torch.tensor(tokens), torch.arange(len(tokens))
    with use_context(prefill_context([len(tokens)])), torch.no_grad():
        h_main = ours(ids, pos)
    with use_context(prefill_context([len(tokens) - 1])), torch.no_grad():
        # Draft for position i uses h_i and token t_{i+1}.
        got = ours.forward_mtp(ids[1:], pos[:-1], h_main[:-1])
        logits = ours.compute_logits(got)

    big = hf_mtp_block(path)
    with torch.no_grad():
        h_ref = hf.model(ids[None]).last_hidden_state[0]
        torch.testing.assert_close(h_main, h_ref, rtol=1e-4, atol=1e-4)
        emb = big.model.embed_tokens(ids[1:])
        emb[0] = 0.0  # position 0
        x = torch.cat([_rms(emb, w["enorm.weight"], eps), _rms(h_ref[:-1], w["hnorm.weight"], eps)], -1)
        x = (x @ w["eh_proj.weight"].T)[None]
        t = x.shape[1]
        mask = torch.full((t, t), torch.finfo(torch.float32).min).triu(1)[None, None]
        cos_sin = big.model.rotary_emb(x, pos[None, :-1])
        y = big.model.layers[n](x, attention_mask=mask, position_embeddings=cos_sin, position_ids=pos[None, :-1])
        y = y[0] if isinstance(y, tuple) else y
        ref = _rms(y[0], w["shared_head.norm.weight"], eps)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert logits.shape == (t, cfg["vocab_size"])

    # The paged path gives the same drafts (own KV cache on the MTP layer, decode after a prefill chunk).
    runner = PagedRunner(ours)
    assert "latent" in ours.mtp.self_attn.kv_caches and "index_k" in ours.mtp.self_attn.kv_caches
    from tests.models.paged_runner import step_context
    outs = []
    for start, end in [(0, 12)] + [(i, i + 1) for i in range(12, t)]:
        ctx = step_context(runner, "m", end, t)
        with use_context(ctx), torch.no_grad():
            outs.append(ours.forward_mtp(ids[1 + start:1 + end], pos[start:end], h_main[start:end]))
    torch.testing.assert_close(torch.cat(outs), got, rtol=1e-4, atol=1e-4)
