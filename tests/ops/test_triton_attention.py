"""Triton paged attention (GQA, absorbed MLA with DSA top-k) and write_kv against highspeed.ops.attention."""
from __future__ import annotations

import pytest
import torch

from highspeed.context import AttentionContext
from highspeed.ops.attention import mla_attention as ref_mla_attention
from highspeed.ops.attention import paged_attention as ref_paged_attention
from highspeed.ops.attention import write_kv as ref_write_kv
from tests.ops.conftest import DEVICE, HAS_CUDA, TOL, rel_err


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(2024)


def make_ctx(query_lens: list[int], seq_lens: list[int], block_size: int, num_blocks: int,
             num_kv_splits: int | None = None) -> AttentionContext:
    """A cached context whose sequences own randomly scattered blocks (catches block-table indexing bugs)."""
    need = [(s + block_size - 1) // block_size for s in seq_lens]
    assert sum(need) <= num_blocks
    perm = torch.randperm(num_blocks)
    tables = torch.zeros(len(seq_lens), max(need) + 1, dtype=torch.int32)  # +1: padding column, as the runner pads
    used = 0
    for i, n in enumerate(need):
        tables[i, :n] = perm[used:used + n].int()
        used += n
    qsl = [0]
    for q in query_lens:
        qsl.append(qsl[-1] + q)
    ctx = AttentionContext(
        query_lens=list(query_lens), seq_lens=list(seq_lens),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=DEVICE),
        seq_lens_t=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        slot_mapping=torch.zeros(sum(query_lens), dtype=torch.int64, device=DEVICE),
        block_tables=tables.to(DEVICE), block_size=block_size,
        max_query_len=max(query_lens), max_seq_len=max(seq_lens), decode_only=all(q == 1 for q in query_lens),
    )
    if num_kv_splits is not None:
        ctx.extra["num_kv_splits"] = num_kv_splits
    return ctx


GQA_CASES = [
    # query_lens, seq_lens, Hq, Hkv, D, Dv, block_size, splits
    ([1, 1, 1], [5, 17, 40], 4, 2, 16, 16, 4, None),
    ([3, 1, 7], [3, 20, 30], 6, 2, 24, 24, 16, None),        # group of 3, odd head size, mixed prefill/decode
    ([1], [130], 12, 1, 32, 40, 16, 3),                      # forced split-KV, Dv != D
    ([1, 1], [70, 9], 8, 8, 16, 16, 8, 5),                   # MHA, more splits than the short sequence needs
    ([9], [9], 4, 1, 16, 16, 4, None),                       # whole prompt, no cached prefix
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qlens,slens,Hq,Hkv,D,Dv,bs,splits", GQA_CASES)
def test_paged_attention(triton_module, reference, qlens, slens, Hq, Hkv, D, Dv, bs, splits, dtype):
    attn = triton_module("attention")
    ctx = make_ctx(qlens, slens, bs, 40, splits)
    q = torch.randn(sum(qlens), Hq, D, device=DEVICE).to(dtype)
    k_cache = torch.randn(40, bs, Hkv, D, device=DEVICE).to(dtype)
    v_cache = torch.randn(40, bs, Hkv, Dv, device=DEVICE).to(dtype)
    out = attn.paged_attention(q, k_cache, v_cache, ctx, D**-0.5)
    ref = reference(ref_paged_attention, q, k_cache, v_cache, ctx, D**-0.5)
    assert out.shape == ref.shape and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype], rel_err(out, ref)


def _topk_indices(qlens: list[int], slens: list[int], k: int) -> torch.Tensor:
    """Random causal selections per query, -1 padded (some queries see fewer than k positions)."""
    rows = []
    for ql, sl in zip(qlens, slens):
        for j in range(ql):
            p = sl - ql + j
            n = min(k - 2, p + 1)
            row = torch.full((k,), -1, dtype=torch.int32)
            row[:n] = torch.randperm(p + 1)[:n].int()
            rows.append(row[torch.randperm(k)])  # -1 slots anywhere, not only at the end
    return torch.stack(rows).to(DEVICE)


MLA_CASES = [
    # query_lens, seq_lens, H, L, R, block_size, topk, splits
    ([1, 1], [9, 33], 3, 32, 16, 8, None, None),
    ([4, 1], [10, 40], 20, 32, 16, 16, None, 2),             # more heads than one program holds
    ([2, 1], [30, 50], 5, 64, 16, 16, 12, None),             # DSA top-k
    ([1, 1], [30, 70], 5, 64, 16, 16, 12, 2),                # DSA top-k with split-KV
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qlens,slens,H,L,R,bs,topk,splits", MLA_CASES)
def test_mla_attention(triton_module, reference, qlens, slens, H, L, R, bs, topk, splits, dtype):
    attn = triton_module("attention")
    ctx = make_ctx(qlens, slens, bs, 40, splits)
    q = torch.randn(sum(qlens), H, L + R, device=DEVICE).to(dtype)
    cache = torch.randn(40, bs, L + R, device=DEVICE).to(dtype)
    ti = _topk_indices(qlens, slens, topk) if topk else None
    scale = (L + R) ** -0.5
    out = attn.mla_attention(q, cache, ctx, scale, L, ti)
    ref = reference(ref_mla_attention, q, cache, ctx, scale, L, ti)
    assert out.shape == (sum(qlens), H, L) and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype], rel_err(out, ref)


@pytest.mark.parametrize("shape", [(2, 3), (4, 5, 7), (1, 576)])
def test_write_kv(triton_module, reference, shape):
    attn = triton_module("attention")
    nb, bs = 6, 4
    cache = torch.randn(nb, bs, *shape, device=DEVICE)
    ref_cache = cache.clone()
    slots = torch.tensor([3, -1, 17, 0, 23], device=DEVICE)
    values = torch.randn(5, *shape, device=DEVICE)
    attn.write_kv(cache, slots, values)
    reference(ref_write_kv, ref_cache, slots, values)
    assert torch.equal(cache, ref_cache)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_model_sized_decode(triton_module, reference):
    """GLM-4.5 GQA (96/8 heads, 128 dims) and GLM-5 MLA (64 heads, 512+64) decode at long context."""
    attn = triton_module("attention")
    ctx = make_ctx([1] * 4, [3000, 17, 1025, 4096], 64, 200)
    q = torch.randn(4, 96, 128, device=DEVICE, dtype=torch.bfloat16)
    kc = torch.randn(200, 64, 8, 128, device=DEVICE, dtype=torch.bfloat16)
    vc = torch.randn(200, 64, 8, 128, device=DEVICE, dtype=torch.bfloat16)
    ref = reference(ref_paged_attention, q, kc, vc, ctx, 128**-0.5)
    assert rel_err(attn.paged_attention(q, kc, vc, ctx, 128**-0.5), ref) < TOL[torch.bfloat16]
    qm = torch.randn(4, 64, 576, device=DEVICE, dtype=torch.bfloat16)
    lc = torch.randn(200, 64, 576, device=DEVICE, dtype=torch.bfloat16)
    ref_m = reference(ref_mla_attention, qm, lc, ctx, 192**-0.5, 512)
    assert rel_err(attn.mla_attention(qm, lc, ctx, 192**-0.5, 512), ref_m) < TOL[torch.bfloat16]
    ctx = make_ctx([37, 1], [100, 50], 64, 200)  # MLA prefill path (several tokens per program)
    qm = torch.randn(38, 64, 576, device=DEVICE, dtype=torch.bfloat16)
    ref_m = reference(ref_mla_attention, qm, lc, ctx, 192**-0.5, 512)
    assert rel_err(attn.mla_attention(qm, lc, ctx, 192**-0.5, 512), ref_m) < TOL[torch.bfloat16]
