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


@pytest.mark.parametrize("B,V,top_k,top_p,min_p", CASES)
def test_sample_many_chunks(triton_module, reference, monkeypatch, B, V, top_k, top_p, min_p):
    """16-column chunks: up to hundreds per row, so the pick across chunks and min-p's row maximum (gathered from
    the chunks) are exercised; ties across chunks go to the first column, as in torch.argmax."""
    sampling = triton_module("sampling")
    monkeypatch.setattr(sampling, "CHUNK", 16)
    logits = (torch.randn(B, V, device=DEVICE) * 3).round()   # integers: many exact ties, across chunks too
    st = _params(B, top_k=top_k, top_p=top_p, min_p=min_p, seed=V)
    assert torch.equal(sampling.sample(logits, st), reference(ref_sample, logits, st))


@pytest.mark.parametrize("ring", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,V", [(1, 151), (5, 40), (3, 16)])
def test_greedy_advance(triton_module, reference, monkeypatch, dtype, B, V, ring):
    """The CUDA-graph decode tail: ids = argmax (first among ties; an all -inf row gives 0), and the rows with a
    slot one token further; padding rows (slot -1) untouched. With a host ring: the count one up and the tokens in
    ring row count % K, the other rows and columns untouched. Equal to the torch reference."""
    from highspeed.ops.sampling import greedy_advance as ref_greedy_advance

    sampling = triton_module("sampling")
    monkeypatch.setattr(sampling, "CHUNK", 16)
    logits = (torch.randn(B, V, device=DEVICE) * 2).round().to(dtype)
    logits[-1, :] = float("-inf") if B > 1 else logits[-1, :]
    pos_slots = torch.stack([torch.arange(B) * 7 + 3, torch.arange(B) * 16 + 5]).to(DEVICE)
    pos_slots[1, 1::2] = -1   # padding rows
    seq_lens = (pos_slots[0] + 1).int()
    got = [torch.full((B,), -5, dtype=torch.int64, device=DEVICE), pos_slots.clone(), seq_lens.clone()]
    want = [torch.full((B,), -5, dtype=torch.int64, device=DEVICE), pos_slots.clone(), seq_lens.clone()]
    if ring:   # K = 3 rows, wider than the batch; the count moves 7 -> 8, so row 2 takes the tokens
        for args in (got, want):
            args += [torch.full((3, B + 2), -9, dtype=torch.int64, device=DEVICE),
                     torch.tensor([7], dtype=torch.int64, device=DEVICE)]
    sampling.greedy_advance(logits, *got)
    reference(ref_greedy_advance, logits, *want)
    for g, w in zip(got, want):
        assert torch.equal(g, w), (g, w)
    assert torch.equal(got[0], logits.float().argmax(-1))
    if ring:
        host_ring, count = got[3], got[4]
        assert int(count) == 8 and torch.equal(host_ring[2, :B], got[0])
        assert (host_ring[:2] == -9).all() and (host_ring[2, B:] == -9).all()
    live = pos_slots[1] >= 0
    assert torch.equal(got[1], pos_slots + live) and torch.equal(got[2], seq_lens + live)
    assert (got[1][:, ~live] == pos_slots[:, ~live]).all()


def test_uniforms_stay_inside_the_unit_interval():
    """The extreme hashes give uniforms strictly inside (0, 1), so the Gumbel noise -log(-log(u)) is finite: a
    hash of 2**32 - 1 once rounded to u = 1.0, +inf noise, and the sampler then took that column whatever its
    probability (or NaN beside a filtered logit)."""
    from highspeed.ops.sampling import uniform_of_hash

    h = torch.tensor([0, 1, 511, 512, 2**31, 2**32 - 2**7, 2**32 - 1], dtype=torch.int64)
    u = uniform_of_hash(h)
    assert u.dtype == torch.float32 and bool(((u > 0) & (u < 1)).all()), u
    assert torch.isfinite(-torch.log(-torch.log(u))).all()
    assert u[0] == 2.0**-24 and u[-1] == 1 - 2.0**-24


def test_sampling_tensors_fields():
    """Each packed field holds its own list (the kernels and the reference read the same fields, so a swap would
    pass every comparison between them)."""
    st = SamplingTensors.build([0.0, 0.7], [0, 40], [1.0, 0.9], [0.0, 0.05], [3, 2**64 - 1], [11, 12], DEVICE)
    assert st.temperature.tolist() == pytest.approx([0.0, 0.7]) and st.top_p.tolist() == pytest.approx([1.0, 0.9])
    assert st.min_p.tolist() == pytest.approx([0.0, 0.05]) and st.top_k.tolist() == [0, 40]
    assert st.seeds.tolist() == [3, 2**63 - 1] and st.steps.tolist() == [11, 12]
    assert st.temperature.dtype == torch.float32 and st.steps.dtype == torch.int64
    assert not st.all_greedy and st.any_top_k and st.any_top_p and st.any_min_p
