"""Triton sampling (highspeed.ops.triton.sampling) against highspeed.ops.sampling.sample, token for token."""
from __future__ import annotations

import pytest
import torch

from highspeed.ops.sampling import SamplingTensors
from highspeed.ops.sampling import sample as ref_sample
from tests.ops.conftest import DEVICE, HAS_CUDA


def _params(B: int, *, top_k: bool, top_p: bool, min_p: bool, seed: int) -> SamplingTensors:
    g = torch.Generator().manual_seed(seed)
    temperature = [0.0 if i % 4 == 0 else float(torch.rand(1, generator=g)) * 1.5 + 0.2 for i in range(B)]
    return SamplingTensors.build(
        temperature=temperature,
        top_k=[int(torch.randint(0, 20, (1,), generator=g)) if top_k and i % 2 else 0 for i in range(B)],
        top_p=[float(torch.rand(1, generator=g)) * 0.5 + 0.5 if top_p and i % 3 else 1.0 for i in range(B)],
        min_p=[float(torch.rand(1, generator=g)) * 0.2 if min_p and i % 2 == 0 else 0.0 for i in range(B)],
        seeds=[int(torch.randint(0, 2**62, (1,), generator=g)) for _ in range(B)],
        steps=[int(torch.randint(0, 10**6, (1,), generator=g)) for _ in range(B)],
        device=DEVICE,
    )


CASES = [
    # B, V, top_k, top_p, min_p
    (6, 50, False, False, False),
    (9, 333, False, False, True),
    (8, 1000, True, True, False),
    (5, 257, True, False, True),
    (3, 5000, False, True, False),
]


@pytest.mark.parametrize("B,V,top_k,top_p,min_p", CASES)
def test_sample_matches_reference(triton_module, reference, B, V, top_k, top_p, min_p):
    sampling = triton_module("sampling")
    for trial in range(3):  # fresh logits and seeds each time
        logits = torch.randn(B, V, device=DEVICE) * 3
        st = _params(B, top_k=top_k, top_p=top_p, min_p=min_p, seed=trial * 100 + V)
        out = sampling.sample(logits, st)
        ref = reference(ref_sample, logits, st)
        assert out.dtype == torch.int64 and out.shape == (B,)
        assert torch.equal(out, ref), (out, ref)


def test_sample_is_random_but_seeded(triton_module):
    """Same seed and step -> same token; the tokens of many seeds spread over the vocabulary."""
    sampling = triton_module("sampling")
    B, V = 64, 20
    logits = torch.zeros(B, V, device=DEVICE) + torch.randn(1, V, device=DEVICE) * 0.1
    st = SamplingTensors.build([1.0] * B, [0] * B, [1.0] * B, [0.0] * B, list(range(B)), [7] * B, DEVICE)
    a, b = sampling.sample(logits, st), sampling.sample(logits, st)
    assert torch.equal(a, b)
    assert a.unique().numel() >= 8


def test_all_greedy(triton_module):
    sampling = triton_module("sampling")
    logits = torch.randn(4, 77, device=DEVICE)
    st = SamplingTensors.build([0.0] * 4, [0] * 4, [1.0] * 4, [0.0] * 4, [1] * 4, [0] * 4, DEVICE)
    assert torch.equal(sampling.sample(logits, st), logits.argmax(-1))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_sample_model_vocab(triton_module, reference):
    sampling = triton_module("sampling")
    logits = torch.randn(32, 154880, device=DEVICE) * 4
    for kw in (dict(top_k=False, top_p=False, min_p=True), dict(top_k=True, top_p=True, min_p=False)):
        st = _params(32, seed=5, **kw)
        assert torch.equal(sampling.sample(logits, st), reference(ref_sample, logits, st))
