"""Triton DSA indexer (scores over the paged indexer-key cache, then top-k) against highspeed.ops.dsa."""
from __future__ import annotations

import pytest
import torch

from highspeed.context import AttentionContext
from highspeed.engine.runner import HostLengthsUnavailable
from highspeed.ops.attention import gather_sequence
from highspeed.ops.dsa import dsa_topk_indices as ref_dsa_topk_indices
from tests.ops.conftest import DEVICE, HAS_CUDA, TOL, rel_err
from tests.ops.test_triton_attention import make_ctx


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(7)


def exact_scores(q: torch.Tensor, w: torch.Tensor, cache: torch.Tensor, ctx: AttentionContext, scale: float,
                 max_keys: int) -> torch.Tensor:
    """float64 ``[T, max_keys]`` indexer scores, -inf where a query cannot see the position."""
    out = torch.full((q.shape[0], max_keys), float("-inf"), dtype=torch.float64, device=q.device)
    start = 0
    for i, (ql, sl) in enumerate(zip(ctx.query_lens, ctx.seq_lens)):
        k = gather_sequence(cache, ctx.block_tables[i], sl).double()
        logits = torch.relu(torch.einsum("thd,sd->ths", q[start:start + ql].double(), k) * scale)
        s = torch.einsum("th,ths->ts", w[start:start + ql].double(), logits)
        pos = torch.arange(sl - ql, sl, device=q.device)
        s = s.masked_fill(torch.arange(sl, device=q.device)[None, :] > pos[:, None], float("-inf"))
        out[start:start + ql, :sl] = s
        start += ql
    return out


def assert_same_selection(got: torch.Tensor, ref: torch.Tensor, scores: torch.Tensor, tol: float) -> None:
    """Row by row the same set of positions (the kernel's picks are unordered), the same number of -1 slots; a
    swap is allowed only between positions whose exact scores tie within ``tol`` at the selection boundary."""
    assert got.shape == ref.shape and got.dtype == torch.int32
    for row in range(got.shape[0]):
        g = {int(p) for p in got[row] if p >= 0}
        r = {int(p) for p in ref[row] if p >= 0}
        assert len(g) == int((got[row] >= 0).sum()), f"row {row}: a position picked twice"
        assert len(g) == len(r), f"row {row}: {len(g)} picks, reference {len(r)}"
        if g != r:
            kth = float(scores[row, sorted(r)].min())
            for p in g ^ r:
                assert abs(float(scores[row, p]) - kth) <= tol, f"row {row}: position {p} is not a boundary tie"


CASES = [
    # query_lens, seq_lens, heads, head_dim, topk, block_size
    ([1, 1, 1, 1], [5, 40, 97, 12], 4, 16, 16, 16),           # decode: shorter and longer than topk
    ([6, 1, 19], [30, 33, 19], 3, 24, 8, 4),                 # prefill chunks + decode, odd head count / dim
    ([70], [150], 8, 32, 32, 16),                            # long prefill chunk: several query tiles
    ([2, 3], [3, 3], 16, 16, 64, 8),                         # everything shorter than topk
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qlens,slens,H,D,topk,bs", CASES)
def test_dsa_topk_indices(triton_module, reference, qlens, slens, H, D, topk, bs, dtype):
    dsa = triton_module("dsa")
    ctx = make_ctx(qlens, slens, bs, 40)
    T = sum(qlens)
    q = torch.randn(T, H, D, device=DEVICE).to(dtype)
    w = torch.randn(T, H, device=DEVICE) * H**-0.5
    cache = torch.randn(40, bs, D, device=DEVICE).to(dtype)
    scale = D**-0.5
    exact = exact_scores(q, w, cache, ctx, scale, ctx.max_seq_len)
    scores = dsa.indexer_scores(q, w, cache, ctx, scale, ctx.max_seq_len)
    assert torch.equal(torch.isinf(scores), torch.isinf(exact))
    finite = torch.isfinite(exact)
    assert rel_err(scores[finite], exact[finite]) < TOL[dtype]
    got = dsa.dsa_topk_indices(q, w, cache, ctx, topk, scale)
    ref = reference(ref_dsa_topk_indices, q, w, cache, ctx, topk, scale)
    assert_same_selection(got, ref, exact, tol=1e-5 if dtype == torch.float32 else 1e-3)


def test_graph_context_reads_no_host_lengths(triton_module, reference):
    """As in a captured decode graph: no host lengths, the buffer sized by a larger bound than any sequence,
    padded rows (context of one token); the picks equal the reference's with the real lengths."""
    dsa = triton_module("dsa")
    qlens, slens, H, D, topk, bs = [1, 1, 1, 1], [9, 37, 1, 1], 4, 16, 12, 8
    ctx = make_ctx(qlens, slens, bs, 16)
    graph_ctx = AttentionContext(
        query_lens=HostLengthsUnavailable(), seq_lens=HostLengthsUnavailable(), query_start_loc=ctx.query_start_loc,
        seq_lens_t=ctx.seq_lens_t, slot_mapping=ctx.slot_mapping,
        block_tables=torch.nn.functional.pad(ctx.block_tables, (0, 4)), block_size=bs, max_query_len=1,
        max_seq_len=96, decode_only=True, extra={"cuda_graph": True})
    q = torch.randn(4, H, D, device=DEVICE)
    w = torch.randn(4, H, device=DEVICE)
    cache = torch.randn(16, bs, D, device=DEVICE)
    got = dsa.dsa_topk_indices(q, w, cache, graph_ctx, topk, D**-0.5)
    ref = reference(ref_dsa_topk_indices, q, w, cache, ctx, topk, D**-0.5)
    assert_same_selection(got, ref, exact_scores(q, w, cache, ctx, D**-0.5, 96), tol=1e-5)


def test_long_prefill_in_row_windows(triton_module, monkeypatch):
    """A score buffer over MAX_SCORE_BYTES is filled and selected window by window, with the same picks."""
    dsa = triton_module("dsa")
    ctx = make_ctx([9, 14], [20, 14], 4, 16)
    q, w = torch.randn(23, 4, 16, device=DEVICE), torch.randn(23, 4, device=DEVICE)
    cache = torch.randn(16, 4, 16, device=DEVICE)
    whole = dsa.dsa_topk_indices(q, w, cache, ctx, 6, 0.25)
    monkeypatch.setattr(dsa, "MAX_SCORE_BYTES", 5 * 4 * 20)   # windows of 5 rows, cutting through sequences
    windowed = dsa.dsa_topk_indices(q, w, cache, ctx, 6, 0.25)
    assert torch.equal(whole.sort(-1).values, windowed.sort(-1).values)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="real sizes need a CUDA device")
def test_dsa_topk_indices_glm5_sizes(triton_module, reference):
    """GLM-5's indexer: 32 heads x 128 dims, top-2048, bf16, contexts of 4K-16K (and one below 2048)."""
    dsa = triton_module("dsa")
    qlens, slens, bs = [1, 1, 1, 1, 48], [4096, 9001, 16384, 1500, 6000], 64
    num_blocks = sum(-(-s // bs) for s in slens) + 1
    ctx = make_ctx(qlens, slens, bs, num_blocks)
    T = sum(qlens)
    q = torch.randn(T, 32, 128, device=DEVICE, dtype=torch.bfloat16)
    w = torch.randn(T, 32, device=DEVICE) * 32**-0.5
    cache = torch.randn(num_blocks, bs, 128, device=DEVICE, dtype=torch.bfloat16)
    got = dsa.dsa_topk_indices(q, w, cache, ctx, 2048, 128**-0.5)
    ref = reference(ref_dsa_topk_indices, q, w, cache, ctx, 2048, 128**-0.5)
    exact = exact_scores(q, w, cache, ctx, 128**-0.5, ctx.max_seq_len)
    assert_same_selection(got.cpu(), ref.cpu(), exact.cpu(), tol=1e-3 * float(exact[torch.isfinite(exact)].abs().max()))
