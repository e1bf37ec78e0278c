"""Each torch reference op against a naive (loop-level) implementation on odd shapes."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from highspeed.context import AttentionContext
from highspeed.ops import (
    add_rms_norm, build_cos_sin_cache, dsa_topk_indices, mla_attention, moe_experts, paged_attention, rms_norm,
    rope, select_experts, silu_and_mul, write_kv,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_rms_norm_and_add():
    x, r, w = torch.randn(7, 33), torch.randn(7, 33), torch.randn(33)
    naive = torch.stack([w * row / math.sqrt(float((row * row).mean()) + 1e-5) for row in x])
    torch.testing.assert_close(rms_norm(x, w, 1e-5), naive, rtol=1e-5, atol=1e-5)
    y, s = add_rms_norm(x, r, w, 1e-5)
    torch.testing.assert_close(s, x + r)
    torch.testing.assert_close(y, rms_norm(x + r, w, 1e-5))


def test_silu_and_mul():
    x = torch.randn(5, 3, 2 * 13)
    torch.testing.assert_close(silu_and_mul(x), F.silu(x[..., :13]) * x[..., 13:])


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_dim,head_dim", [(6, 6), (4, 10)])
def test_rope_pairs(interleaved, rotary_dim, head_dim):
    base = 100.0
    cos_sin = build_cos_sin_cache(rotary_dim, 50, base)
    x, pos = torch.randn(5, 3, head_dim), torch.tensor([0, 7, 3, 49, 1])
    out = rope(x, pos, cos_sin, rotary_dim, interleaved)
    expect = x.clone()
    half = rotary_dim // 2
    for t in range(5):
        for i in range(half):
            theta = float(pos[t]) * base ** (-2 * i / rotary_dim)
            a, b = (2 * i, 2 * i + 1) if interleaved else (i, i + half)
            xa, xb = x[t, :, a], x[t, :, b]
            expect[t, :, a] = xa * math.cos(theta) - xb * math.sin(theta)
            expect[t, :, b] = xb * math.cos(theta) + xa * math.sin(theta)
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "params",
    [
        {"rope_type": "default", "rope_theta": 10000.0},
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
        {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 32,
         "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1},
        {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32},
    ],
)
def test_cos_sin_matches_transformers(params):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=64, num_attention_heads=2, head_dim=32, max_position_embeddings=1280,
                      rope_parameters=dict(params))
    hf = LlamaRotaryEmbedding(cfg)
    pos = torch.arange(0, 1280, 37)[None]
    cos, sin = hf(torch.zeros(1, dtype=torch.float32), pos)
    ours = build_cos_sin_cache(32, 1280, params["rope_theta"], params, 1280)[pos[0]]
    torch.testing.assert_close(ours[:, :16], cos[0, :, :16], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[:, 16:], sin[0, :, :16], rtol=1e-5, atol=1e-5)


def _naive_select(logits, top_k, scoring, renormalize, bias, n_group, topk_group, scale):
    weights, ids = [], []
    for row in logits.tolist():
        e = len(row)
        if scoring == "softmax":
            m = max(row)
            ex = [math.exp(v - m) for v in row]
            s = [v / sum(ex) for v in ex]
            choice = s
        else:
            s = [1 / (1 + math.exp(-v)) for v in row]
            choice = [a + (float(bias[j]) if bias is not None else 0.0) for j, a in enumerate(s)]
            if n_group > 1:
                size = e // n_group
                gscore = [sum(sorted(choice[g * size:(g + 1) * size])[-2:]) for g in range(n_group)]
                keep = sorted(range(n_group), key=lambda g: -gscore[g])[:topk_group]
                choice = [c if j // size in keep else -math.inf for j, c in enumerate(choice)]
        chosen = sorted(range(e), key=lambda j: -choice[j])[:top_k]
        w = [s[j] for j in chosen]
        if renormalize:
            w = [v / sum(w) for v in w]
        weights.append([v * scale for v in w])
        ids.append(chosen)
    return torch.tensor(weights), torch.tensor(ids)


@pytest.mark.parametrize(
    "scoring,renorm,use_bias,n_group,topk_group,scale",
    [("softmax", True, False, 1, 1, 1.0), ("softmax", False, False, 1, 1, 1.0),
     ("sigmoid", True, True, 1, 1, 2.5), ("sigmoid", True, True, 4, 2, 1.8), ("sigmoid", False, False, 2, 1, 1.0)],
)
def test_select_experts(scoring, renorm, use_bias, n_group, topk_group, scale):
    logits, bias = torch.randn(9, 12) * 2, torch.randn(12) * 0.5
    w, ids = select_experts(logits, 3, scoring, renorm, bias if use_bias else None, n_group, topk_group, scale)
    nw, nids = _naive_select(logits, 3, scoring, renorm, bias if use_bias else None, n_group, topk_group, scale)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    order, norder = ids.long().sort(-1), nids.sort(-1)
    assert torch.equal(order.values, norder.values)
    torch.testing.assert_close(w.gather(1, order.indices), nw.float().gather(1, norder.indices), rtol=1e-5, atol=1e-6)


def test_moe_experts_and_grad():
    e, h, i, t, k = 5, 11, 7, 13, 2
    x = torch.randn(t, h, requires_grad=True)
    w13, w2 = torch.randn(e, 2 * i, h), torch.randn(e, h, i)
    weights, ids = torch.rand(t, k), torch.randint(0, e, (t, k), dtype=torch.int32)
    out = moe_experts(x, w13, w2, weights, ids)
    expect = torch.zeros(t, h)
    for a in range(t):
        for b in range(k):
            j = int(ids[a, b])
            g, u = w13[j, :i] @ x[a], w13[j, i:] @ x[a]
            expect[a] += weights[a, b] * (w2[j] @ (F.silu(g) * u))
    torch.testing.assert_close(out, expect, rtol=1e-4, atol=1e-4)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def _paged_setup(seq_lens, query_lens, block_size, per_token, num_blocks=40):
    """Random caches plus a context whose block tables scatter sequences over shuffled blocks."""
    perm = torch.randperm(num_blocks).tolist()
    tables, slots = [], []
    for s, q in zip(seq_lens, query_lens):
        n = (s + block_size - 1) // block_size
        blocks = [perm.pop() for _ in range(n)]
        tables.append(blocks)
        slots += [blocks[p // block_size] * block_size + p % block_size for p in range(s - q, s)]
    width = max(len(b) for b in tables)
    bt = torch.tensor([b + [0] * (width - len(b)) for b in tables], dtype=torch.int32)
    qsl = torch.tensor([0] + list(torch.tensor(query_lens).cumsum(0).tolist()), dtype=torch.int32)
    ctx = AttentionContext(query_lens=list(query_lens), seq_lens=list(seq_lens), query_start_loc=qsl,
                           seq_lens_t=torch.tensor(seq_lens, dtype=torch.int32),
                           slot_mapping=torch.tensor(slots, dtype=torch.long), block_tables=bt,
                           block_size=block_size, max_query_len=max(query_lens), max_seq_len=max(seq_lens))
    return ctx, tables


def _seq_rows(cache, blocks, block_size, s):
    return torch.stack([cache[blocks[p // block_size], p % block_size] for p in range(s)])


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_write_kv_and_paged_attention(block_size):
    seq_lens, query_lens = [5, 23, 1, 9], [5, 3, 1, 1]
    hq, hk, d, dv = 6, 2, 9, 5
    ctx, tables = _paged_setup(seq_lens, query_lens, block_size, (hk, d))
    k_cache, v_cache = torch.randn(40, block_size, hk, d), torch.randn(40, block_size, hk, dv)
    t = sum(query_lens)
    new_k, new_v = torch.randn(t, hk, d), torch.randn(t, hk, dv)
    write_kv(k_cache, ctx.slot_mapping, new_k)
    write_kv(v_cache, ctx.slot_mapping, new_v)
    q = torch.randn(t, hq, d)
    out = paged_attention(q, k_cache, v_cache, ctx, 0.3)
    row = 0
    for s, ql, blocks in zip(seq_lens, query_lens, tables):
        keys, vals = _seq_rows(k_cache, blocks, block_size, s), _seq_rows(v_cache, blocks, block_size, s)
        torch.testing.assert_close(keys[s - ql:], new_k[row:row + ql])
        for j in range(ql):
            pos = s - ql + j
            for h in range(hq):
                sc = torch.tensor([float(q[row + j, h] @ keys[p, h // 3]) * 0.3 for p in range(pos + 1)])
                expect = torch.softmax(sc, 0) @ vals[: pos + 1, h // 3]
                torch.testing.assert_close(out[row + j, h], expect, rtol=1e-4, atol=1e-5)
        row += ql


def test_write_kv_skips_negative_slots():
    cache = torch.zeros(2, 4, 3)
    write_kv(cache, torch.tensor([5, -1, 0]), torch.ones(3, 3) * torch.tensor([[1.0], [2.0], [3.0]]))
    assert cache.view(-1, 3)[5].eq(1).all() and cache.view(-1, 3)[0].eq(3).all() and cache.sum() == 12


@pytest.mark.parametrize("use_topk", [False, True])
def test_mla_attention_matches_expanded_mha(use_topk):
    """Absorbed MLA over the latent cache equals ordinary MHA with keys/values expanded by kv_b_proj."""
    seq_lens, query_lens, bs = [11, 6], [4, 6], 4
    h, lat, r, p, v = 3, 8, 4, 5, 6
    ctx, tables = _paged_setup(seq_lens, query_lens, bs, (lat + r,))
    cache = torch.randn(40, bs, lat + r)
    w_uk, w_uv = torch.randn(h, p, lat), torch.randn(h, v, lat)
    t = sum(query_lens)
    q_nope, q_pe = torch.randn(t, h, p), torch.randn(t, h, r)
    q_abs = torch.cat([torch.einsum("thp,hpl->thl", q_nope, w_uk), q_pe], -1)
    topk = None
    if use_topk:
        topk = torch.full((t, 5), -1, dtype=torch.int32)
        row = 0
        for s, ql in zip(seq_lens, query_lens):
            for j in range(ql):
                pos = s - ql + j
                sel = torch.randperm(pos + 1)[:4]
                topk[row + j, : len(sel)] = sel.to(torch.int32)
            row += ql
    out_lat = mla_attention(q_abs, cache, ctx, 0.25, lat, topk)
    out = torch.einsum("thl,hvl->thv", out_lat, w_uv)
    row = 0
    for s, ql, blocks in zip(seq_lens, query_lens, tables):
        kv = _seq_rows(cache, blocks, bs, s)
        c, k_pe = kv[:, :lat], kv[:, lat:]
        k_nope, vals = torch.einsum("sl,hpl->shp", c, w_uk), torch.einsum("sl,hvl->shv", c, w_uv)
        for j in range(ql):
            pos = s - ql + j
            allowed = list(range(pos + 1))
            if use_topk:
                allowed = sorted(int(a) for a in topk[row + j] if a >= 0)
            for hh in range(h):
                sc = torch.tensor([float(q_nope[row + j, hh] @ k_nope[a, hh] + q_pe[row + j, hh] @ k_pe[a]) * 0.25
                                   for a in allowed])
                expect = torch.softmax(sc, 0) @ vals[allowed, hh]
                torch.testing.assert_close(out[row + j, hh], expect, rtol=1e-4, atol=1e-4)
        row += ql


def test_dsa_topk_indices():
    seq_lens, query_lens, bs, hi, d, k = [13, 3], [5, 3], 4, 3, 6, 4
    ctx, tables = _paged_setup(seq_lens, query_lens, bs, (d,))
    cache = torch.randn(40, bs, d)
    t = sum(query_lens)
    q, w = torch.randn(t, hi, d), torch.randn(t, hi)
    got = dsa_topk_indices(q, w, cache, ctx, k, 0.5)
    assert got.shape == (t, k) and got.dtype == torch.int32
    row = 0
    for s, ql, blocks in zip(seq_lens, query_lens, tables):
        keys = _seq_rows(cache, blocks, bs, s)
        for j in range(ql):
            pos = s - ql + j
            score = [sum(float(w[row + j, a]) * max(0.0, 0.5 * float(q[row + j, a] @ keys[p])) for a in range(hi))
                     for p in range(pos + 1)]
            expect = sorted(sorted(range(pos + 1), key=lambda p: -score[p])[:k])
            chosen = sorted(int(a) for a in got[row + j] if a >= 0)
            assert chosen == expect
            assert int((got[row + j] < 0).sum()) == k - len(expect)
        row += ql
