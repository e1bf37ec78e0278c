"""Every architecture against transformers: cache-less logits, paged (chunked prefill + decode, two sequences of
different lengths in one step) logits, and 32 greedy tokens."""
from __future__ import annotations

import pytest
import torch

from highspeed.models.loader import load_model
from tests.checkpoints import ALL_ARCHS, make_tiny_checkpoint
from tests.models.paged_runner import PagedRunner, forward_without_cache

_CACHE: dict[str, tuple] = {}


def checkpoint(arch: str, tmp_path_factory) -> tuple:
    """(path, our model, transformers model) for ``arch``, built once per test session."""
    if arch not in _CACHE:
        import transformers

        path = make_tiny_checkpoint(arch, tmp_path_factory.mktemp(arch))
        ours, config = load_model(path, dtype=torch.float32, progress=False)
        hf = getattr(transformers, config.architecture).from_pretrained(path, dtype=torch.float32).eval()
        _CACHE[arch] = (path, ours, hf)
    return _CACHE[arch]


def prompt(length: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (length,), generator=g).tolist()


def hf_logits(hf, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0].float()


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    scale = ref.abs().max().clamp_min(1.0)
    err = (ours - ref).abs().max() / scale
    assert err < 1e-4, f"max relative logit error {err:.2e}"


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_logits_without_cache(arch, tmp_path_factory):
    _, ours, hf = checkpoint(arch, tmp_path_factory)
    seqs = [prompt(13, 1), prompt(21, 2)]
    got = forward_without_cache(ours, seqs)
    assert_logits_close(got[:13], hf_logits(hf, seqs[0]))
    assert_logits_close(got[13:], hf_logits(hf, seqs[1]))


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_logits_paged_chunked_prefill_and_decode(arch, tmp_path_factory):
    _, ours, hf = checkpoint(arch, tmp_path_factory)
    a, b = prompt(22, 3), prompt(15, 4)
    runner = PagedRunner(ours)
    runner.add("a", a)
    runner.add("b", b)
    got = {"a": [], "b": []}

    def run(plan):
        logits, row = runner.step(plan), 0
        for seq_id, n in plan:
            got[seq_id].append(logits[row : row + n])
            row += n

    run([("a", 9), ("b", 5)])      # two prefills of different lengths
    run([("b", 1), ("a", 6)])      # a decode next to a prefill chunk
    while runner.computed["a"] < len(a) or runner.computed["b"] < len(b):
        run([(s, 1) for s in ("a", "b") if runner.computed[s] < len(runner.tokens[s])])
    assert_logits_close(torch.cat(got["a"]), hf_logits(hf, a))
    assert_logits_close(torch.cat(got["b"]), hf_logits(hf, b))


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_greedy_matches_generate(arch, tmp_path_factory):
    _, ours, hf = checkpoint(arch, tmp_path_factory)
    prompts = [prompt(11, 5), prompt(6, 6)]
    hf.generation_config.eos_token_id = None
    expected = []
    for p in prompts:
        with torch.no_grad():
            out = hf.generate(torch.tensor([p]), max_new_tokens=32, do_sample=False, pad_token_id=0)
        expected.append(out[0, len(p):].tolist())
    got = PagedRunner(ours).greedy(prompts, 32)
    assert got == expected
