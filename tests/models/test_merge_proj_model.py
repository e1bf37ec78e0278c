"""The decoder layer with the split merge folded into o_proj (HIGHSPEED_MERGE_O_PROJ, ``ops.merge_proj``): the
same decode logits as with the merge launch. On the CPU the attention op always merges, so it is wrapped here to
hand over its output as two identical splits (whose merge is exactly that output); on a GPU the real splits are
checked by tests/ops/test_triton_merge_proj.py and the end-to-end tests."""
from __future__ import annotations

import pytest
import torch

import highspeed.models.attention as model_attention
import highspeed.ops.merge_proj as merge_ops
from highspeed.models.loader import load_model
from tests.checkpoints import make_tiny_checkpoint
from tests.models.paged_runner import PagedRunner


def _decode_logits(model, prompt: list[int], steps: int) -> torch.Tensor:
    runner = PagedRunner(model)
    runner.add("s", prompt)
    out = [runner.step([("s", len(prompt))])[-1:]]
    for _ in range(steps):
        runner.tokens["s"].append(int(out[-1].argmax()))
        out.append(runner.step([("s", 1)]))
    return torch.cat(out)


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen3", "glm4_moe"])
def test_merge_in_o_proj_keeps_decode_logits(arch, tmp_path, monkeypatch):
    path = make_tiny_checkpoint(arch, tmp_path / arch)
    model, _ = load_model(path, dtype=torch.float32, progress=False)
    prompt = torch.randint(3, 300, (11,), generator=torch.Generator().manual_seed(3)).tolist()
    want = _decode_logits(model, prompt, 6)

    real = model_attention.rope_paged_attention
    handed = []

    def as_splits(*args, merge: bool = True, **kw):
        out = real(*args, **kw)
        if merge:
            return out
        handed.append(out.shape[0])
        lse = torch.zeros(*out.shape[:2], 2)
        return merge_ops.AttentionSplits(torch.stack([out.float()] * 2, 2), lse, out.dtype)

    monkeypatch.setattr(model_attention, "rope_paged_attention", as_splits)
    monkeypatch.setattr(merge_ops, "MERGE_O_PROJ", True)
    got = _decode_logits(model, prompt, 6)
    assert handed and set(handed) == {1}           # every decode step (one token) took the path, nothing else
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()
    assert got[1:].argmax(-1).tolist() == want[1:].argmax(-1).tolist()
