"""Triton MoE kernels (highspeed.ops.triton.moe) against the torch references in highspeed.ops.moe."""
from __future__ import annotations

import pytest
import torch

from highspeed.ops.moe import moe_experts as ref_moe_experts
from highspeed.ops.moe import select_experts as ref_select_experts
from tests.ops.conftest import DEVICE, HAS_CUDA, TOL, rel_err


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(1234)


ROUTING_CASES = [
    # T, E, k, scoring, renormalize, bias, n_group, topk_group, scale
    (5, 8, 2, "softmax", True, False, 1, 1, 1.0),
    (3, 20, 3, "softmax", False, False, 1, 1, 1.0),
    (4, 7, 1, "softmax", True, False, 1, 1, 1.0),
    (6, 20, 4, "sigmoid", True, True, 1, 1, 1.8),
    (3, 64, 6, "sigmoid", True, True, 8, 3, 2.5),
    (2, 24, 5, "sigmoid", False, True, 4, 2, 1.0),
    (1, 256, 8, "sigmoid", True, True, 1, 1, 2.5),
]


@pytest.mark.parametrize("T,E,k,scoring,renorm,bias,n_group,topk_group,scale", ROUTING_CASES)
def test_select_experts(triton_module, reference, T, E, k, scoring, renorm, bias, n_group, topk_group, scale):
    moe = triton_module("moe")
    logits = torch.randn(T, E, device=DEVICE) * 3
    b = torch.randn(E, device=DEVICE) * 0.5 if bias else None
    args = (logits, k, scoring, renorm, b, n_group, topk_group, scale)
    w, ids = moe.select_experts(*args)
    w_ref, ids_ref = reference(ref_select_experts, *args)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-6)


def test_select_experts_groups_really_restrict(triton_module):
    """With one dominant group, every chosen expert must come from the kept groups."""
    moe = triton_module("moe")
    logits = torch.randn(4, 32, device=DEVICE)
    logits[:, 8:16] += 6.0  # group 1 of 4 wins
    _, ids = moe.select_experts(logits, 4, "sigmoid", True, None, 4, 1, 1.0)
    assert ((ids >= 8) & (ids < 16)).all()


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_select_experts_ties_and_signs(triton_module, reference, scoring):
    """Equal scores (saturated sigmoids, repeated logits) go to the lowest index -- torch.topk leaves the order of
    ties unspecified, so against the reference only the chosen scores must agree -- and negative biased scores
    order correctly (the kernel compares packed integer keys, not floats)."""
    moe = triton_module("moe")
    logits = torch.tensor([[0.5, 30.0, -2.0, 30.0, 0.5, 40.0, -7.0, 0.5]], device=DEVICE)
    bias = torch.tensor([-3.0, -1.0, 0.0, -1.0, -3.0, -2.5, 0.0, -3.0], device=DEVICE) if scoring == "sigmoid" else None
    score = logits.sigmoid() if scoring == "sigmoid" else logits.softmax(-1)
    sel = score + bias if bias is not None else score
    for k in (1, 3, 5, 8):
        args = (logits, k, scoring, True, bias, 1, 1, 1.0)
        w, ids = moe.select_experts(*args)
        w_ref, ids_ref = reference(ref_select_experts, *args)
        assert torch.equal(sel[0, ids[0].long()], sel[0, ids_ref[0].long()])
        torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-6)
        # Lowest index first within each group of equal selection scores.
        picked = ids[0].tolist()
        for a, b in zip(picked, picked[1:]):
            assert sel[0, a] > sel[0, b] or (sel[0, a] == sel[0, b] and a < b)
        last = sel[0, picked[-1]]
        assert all(i in picked for i in range(8) if sel[0, i] == last and i < picked[-1])


def _expert_weights(E: int, H: int, I: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    w13 = (torch.randn(E, 2 * I, H, device=DEVICE) / H**0.5).to(dtype)
    w2 = (torch.randn(E, H, I, device=DEVICE) / I**0.5).to(dtype)
    return w13, w2


EXPERT_CASES = [
    # T, E, H, I, k
    (1, 8, 32, 16, 2),
    (3, 5, 40, 24, 2),
    (7, 6, 33, 17, 3),
    (20, 9, 48, 40, 4),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,E,H,I,k", EXPERT_CASES)
def test_moe_experts(triton_module, reference, monkeypatch, dtype, T, E, H, I, k):
    moe = triton_module("moe")
    if not HAS_CUDA:
        # Small tiles keep the interpreter fast and still exercise partial tiles.
        monkeypatch.setattr(moe, "GROUPED", dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=1))
    x = torch.randn(T, H, device=DEVICE).to(dtype)
    w13, w2 = _expert_weights(E, H, I, dtype)
    weights, ids = reference(ref_select_experts, torch.randn(T, E, device=DEVICE), k, "sigmoid", True, None, 1, 1, 2.5)
    out = moe.moe_experts(x, w13, w2, weights, ids)
    ref = reference(ref_moe_experts, x, w13, w2, weights, ids)
    assert out.shape == (T, H) and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype], rel_err(out, ref)


@pytest.mark.parametrize("use_kernel", [True, False])
@pytest.mark.parametrize("T,k,E,bm", [(9, 3, 7, 4), (40, 4, 20, 16), (1, 2, 300, 16)])
def test_align_pairs_by_expert(triton_module, use_kernel, T, k, E, bm):
    moe = triton_module("moe")
    ids = torch.stack([torch.randperm(E, device=DEVICE)[:k] for _ in range(T)]).int()
    ids[0, 0] = E - 1   # the last expert is always used (edge of the padded expert axis)
    sorted_pairs, block_expert = moe.align_pairs_by_expert(ids, E, bm, use_kernel=use_kernel)
    P = T * k
    flat = ids.reshape(-1).long()
    # Every pair appears exactly once; each block holds pairs of its own expert only, in pair order (stable);
    # padding is P; blocks past the end are -1.
    real = sorted_pairs[sorted_pairs < P].long()
    assert torch.equal(real.sort().values, torch.arange(P, device=DEVICE))
    assert torch.equal(flat[real], flat[real].sort(stable=True).values)
    blocks = sorted_pairs.view(-1, bm)
    for b in range(blocks.shape[0]):
        members = blocks[b][blocks[b] < P].long()
        if block_expert[b] < 0:
            assert members.numel() == 0
        else:
            assert members.numel() > 0 and (flat[members] == int(block_expert[b])).all()
            assert torch.equal(members, members.sort().values)
    assert (block_expert >= 0).sum() == sum(-(-int((flat == e).sum()) // bm) for e in range(E))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("T", [1, 4, 64, 333, 1100])
def test_moe_experts_model_sizes(triton_module, reference, T):
    """Qwen3-30B-A3B expert sizes from one token to both sides of the grouped tile switch."""
    moe = triton_module("moe")
    E, H, I, k = 128, 2048, 768, 8
    x = torch.randn(T, H, device=DEVICE, dtype=torch.bfloat16)
    w13, w2 = _expert_weights(E, H, I, torch.bfloat16)
    weights, ids = reference(ref_select_experts, torch.randn(T, E, device=DEVICE), k, "softmax", True)
    out = moe.moe_experts(x, w13, w2, weights, ids)
    ref = reference(ref_moe_experts, x, w13, w2, weights, ids)
    assert rel_err(out, ref) < TOL[torch.bfloat16]


FUSED_CASES = [
    # T, E, H, I, k, scoring, renorm, bias, n_group, topk_group, scale, shared intermediate (0 = none)
    (1, 8, 32, 16, 2, "softmax", True, False, 1, 1, 1.0, 0),
    (1, 20, 40, 24, 4, "sigmoid", True, True, 4, 2, 2.5, 24),      # GLM/DeepSeek: groups, bias, one shared expert
    (3, 12, 33, 17, 3, "softmax", False, False, 1, 1, 1.0, 34),   # odd sizes; shared twice as wide (DeepSeek-V2)
    (2, 16, 48, 20, 6, "sigmoid", True, True, 1, 1, 1.8, 0),      # k not a power of two
]


@pytest.mark.parametrize("prefetch", [False, True, "all"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,E,H,I,k,scoring,renorm,bias,n_group,topk_group,scale,shared", FUSED_CASES)
def test_fused_moe_decode(triton_module, reference, monkeypatch, prefetch, dtype, T, E, H, I, k, scoring, renorm,
                          bias, n_group, topk_group, scale, shared):
    """The decode path (router + routing + experts + shared expert in three launches) against the reference;
    ``prefetch``: plain loops, double-buffered weight tiles, or everything one iteration ahead (PREFETCH_ALL)."""
    prefetch_all, prefetch = prefetch == "all", bool(prefetch)
    from highspeed.ops.moe import fused_moe as ref_fused_moe

    moe = triton_module("moe")
    monkeypatch.setattr(moe, "FUSED_MAX_TOKENS", T)
    monkeypatch.setattr(moe, "PARTIAL_PICKS", prefetch)     # gate/up: picks up to its own slot, or all k
    monkeypatch.setattr(moe.lin, "WHOLE_ROWS", prefetch)    # the router: whole-row preload, or the tile loop
    # Both launch-shape families: the wide-expert ones with prefetch, the narrow ones without.
    monkeypatch.setattr(moe, "NARROW_I", -1 if prefetch else 10**9)
    # Row-sum accumulators with plain loops, 2-D accumulators with double buffering (both kinds each way).
    rs = not prefetch
    if not HAS_CUDA:  # small tiles: partial tiles and several K steps under the interpreter
        monkeypatch.setattr(moe, "ROUTER", dict(BLOCK_E=4, BLOCK_K=16, num_warps=4))
        for name, bn, bk in [("FUSED_GATE_UP", 8, 16), ("FUSED_GATE_UP_NARROW", 4, 16), ("FUSED_DOWN", 4, 8),
                             ("FUSED_DOWN_WIDE", 2, 8), ("FUSED_DOWN_WIDE_SHARED_IN_LOOP", 1, 8)]:
            monkeypatch.setattr(moe, name, dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=4, PREFETCH=prefetch,
                                                PREFETCH_ALL=prefetch_all, ROW_SUMS=rs))
    else:
        for name in ("FUSED_GATE_UP", "FUSED_GATE_UP_NARROW", "FUSED_DOWN", "FUSED_DOWN_WIDE",
                     "FUSED_DOWN_WIDE_SHARED_IN_LOOP"):
            monkeypatch.setattr(moe, name, {**getattr(moe, name), "PREFETCH": prefetch, "PREFETCH_ALL": prefetch_all,
                                            "ROW_SUMS": rs})
    x = torch.randn(T, H, device=DEVICE).to(dtype)
    gate = torch.randn(E, H, device=DEVICE) / H**0.5 * 4    # fp32 router, spread-out logits (no near-ties)
    w13, w2 = _expert_weights(E, H, I, dtype)
    b = torch.randn(E, device=DEVICE) * 0.5 if bias else None
    ws13 = (torch.randn(2 * shared, H, device=DEVICE) / H**0.5).to(dtype) if shared else None
    ws2 = (torch.randn(H, shared, device=DEVICE) / shared**0.5).to(dtype) if shared else None
    args = (x, gate, w13, w2, k, scoring, renorm, b, n_group, topk_group, scale, ws13, ws2)
    out = moe.fused_moe(*args)
    ref = reference(ref_fused_moe, *args)
    assert out.shape == (T, H) and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype], rel_err(out, ref)
    # Routing really matters: a different router gives a different answer.
    other = reference(ref_fused_moe, x, torch.randn_like(gate), *args[2:])
    assert rel_err(other, ref) > 10 * TOL[dtype]


@pytest.mark.parametrize("early_ids", [False, True])
@pytest.mark.parametrize("T,E,H,I,k,scoring,renorm,bias,n_group,topk_group,scale,shared", FUSED_CASES)
def test_fused_moe_decode_early_ids(triton_module, reference, monkeypatch, early_ids, T, E, H, I, k, scoring, renorm,
                                    bias, n_group, topk_group, scale, shared):
    """HIGHSPEED_EARLY_IDS on and off: the ids published by gate/up's program 0 before it lets the down kernel
    launch, and read by the down kernel before its PDL wait (on a Hopper GPU; elsewhere only where the ids are
    stored moves)."""
    moe = triton_module("moe")
    monkeypatch.setattr(moe, "EARLY_IDS", early_ids)
    test_fused_moe_decode(triton_module, reference, monkeypatch, "all", torch.bfloat16, T, E, H, I, k, scoring,
                          renorm, bias, n_group, topk_group, scale, shared)


def test_down_config_choice(triton_module):
    """Narrow experts take FUSED_DOWN; wide ones one column per program when the shared expert's rows load in the
    routed loop (GLM), else FUSED_DOWN_WIDE (no shared expert, or DeepSeek-V2-Lite's twice-as-wide one)."""
    moe = triton_module("moe")
    assert moe.down_config(768, 0) is moe.FUSED_DOWN and moe.FUSED_DOWN["BLOCK_N"] == 2
    assert moe.down_config(1536, 1536) is moe.FUSED_DOWN_WIDE_SHARED_IN_LOOP
    assert moe.FUSED_DOWN_WIDE_SHARED_IN_LOOP["BLOCK_N"] == 1
    assert moe.down_config(1408, 2816) is moe.FUSED_DOWN_WIDE and moe.down_config(2048, 0) is moe.FUSED_DOWN_WIDE


def test_fused_moe_large_batch_path(triton_module, reference):
    """Above FUSED_MAX_TOKENS the op is ``moe_block``: router GEMM + select_experts + grouped experts + shared MLP,
    each dispatching to its own kernel (on the CPU all of them are references: this checks the composition; the
    kernels have their own tests above)."""
    from highspeed.ops.moe import fused_moe as ref_fused_moe

    moe = triton_module("moe")
    T, E, H, I, k, S = moe.FUSED_MAX_TOKENS + 4, 6, 24, 16, 2, 16
    x = torch.randn(T, H, device=DEVICE)
    gate = torch.randn(E, H, device=DEVICE)
    w13, w2 = _expert_weights(E, H, I, torch.float32)
    ws13, ws2 = torch.randn(2 * S, H, device=DEVICE) / H**0.5, torch.randn(H, S, device=DEVICE) / S**0.5
    args = (x, gate, w13, w2, k, "softmax", True, None, 1, 1, 1.0, ws13, ws2)
    assert rel_err(moe.fused_moe(*args), reference(ref_fused_moe, *args)) < TOL[torch.float32]
