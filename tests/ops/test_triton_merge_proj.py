"""The split merge folded into o_proj (highspeed.ops.merge_proj) and the norm that adds its partial sums: the
Triton kernels against the torch references, and the decode attention handing over its unmerged splits."""
from __future__ import annotations

import pytest
import torch

from highspeed.ops import merge_proj as ref_ops
from highspeed.ops.norm import DeferredNorm, PartialSums, ResidualSum
from highspeed.ops.norm import add_rms_norm as ref_add_rms_norm
from tests.ops.conftest import DEVICE, TOL, rel_err
from tests.ops.test_triton_attention import make_ctx


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(5)


def make_splits(T: int, H: int, S: int, Dv: int, dtype: torch.dtype, dead: int = 0) -> ref_ops.AttentionSplits:
    """Random partials; the last ``dead`` splits of every head saw no key (lse -inf, partials garbage)."""
    part = torch.randn(T, H, S, Dv, device=DEVICE)
    lse = 4 * torch.randn(T, H, S, device=DEVICE)
    if dead:
        lse[..., S - dead:] = float("-inf")
        part[..., S - dead:, :] = float("nan")   # never read: a dead split's memory is unwritten
    return ref_ops.AttentionSplits(part, lse, dtype)


def test_head_groups():
    assert ref_ops.head_groups(32, 128) == 4      # Qwen3-30B-A3B: 8 groups of 512 columns
    assert ref_ops.head_groups(96, 128) == 0      # GLM-4.5-Air: o_proj rows of 12288, past the GEMV's preload
    assert ref_ops.head_groups(96, 128, max_k=1 << 20) == 16   # else 6 groups of 2048 columns
    assert ref_ops.head_groups(40, 128) == 8
    assert ref_ops.head_groups(7, 64) == 1
    assert ref_ops.head_groups(32, 256) == 4      # 8 groups of 1024 columns
    assert ref_ops.head_groups(256, 128, max_k=1 << 20) == 0   # would need more than 2048 columns per group


def test_merge_splits_reference():
    """The merge is the softmax over all the splits' keys: a head's output from two halves of one key set."""
    T, H, Dv, n = 1, 3, 8, 10
    scores = torch.randn(T, H, n, dtype=torch.float64)
    v = torch.randn(n, Dv, dtype=torch.float64)
    want = torch.softmax(scores, -1) @ v
    halves = [slice(0, 4), slice(4, n)]
    log2e = 1.4426950408889634
    part = torch.stack([torch.softmax(scores[..., h], -1) @ v[h] for h in halves], 2)
    lse = torch.stack([torch.logsumexp(scores[..., h], -1) * log2e for h in halves], 2)
    dead_part = torch.cat([part, torch.full_like(part[:, :, :1], float("nan"))], 2)
    dead_lse = torch.cat([lse, torch.full_like(lse[:, :, :1], float("-inf"))], 2)
    got = ref_ops.merge_splits(ref_ops.AttentionSplits(dead_part.float(), dead_lse.float(), torch.float32))
    assert torch.allclose(got.double(), want, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,H,S,Dv,N,hg,dead", [(1, 8, 5, 16, 40, 4, 1), (2, 6, 3, 16, 17, 2, 0),
                                                 (1, 4, 12, 32, 64, 1, 4), (1, 16, 7, 8, 33, 8, 2)])
def test_merge_proj_kernel(triton_module, dtype, T, H, S, Dv, N, hg, dead):
    mod = triton_module("merge_proj")
    s = make_splits(T, H, S, Dv, dtype, dead)
    w = (torch.randn(N, H * Dv, device=DEVICE) * (H * Dv) ** -0.5).to(dtype)
    got = mod.merge_proj(s, w, hg)
    want = ref_ops.merge_proj_torch(s, w, hg)
    assert got.parts.shape == (H // hg, T, N) and got.dtype == dtype and got.parts.dtype == torch.float32
    # bf16: the merged output is rounded to bf16 before the product, where a last-bit difference of the fp32
    # merge can land on either side.
    assert rel_err(got.parts, want.parts) < TOL[dtype], rel_err(got.parts, want.parts)
    # Their sum is o_proj of the merged output.
    o = ref_ops.merge_splits(s).reshape(T, H * Dv).float()
    assert rel_err(got.value().float(), o @ w.float().T) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("G,T,N", [(8, 1, 64), (3, 2, 100), (1, 1, 16)])
def test_add_rms_norm_of_partial_sums(triton_module, dtype, G, T, N):
    """The norm adds the partials in order, rounds once, then adds the residual: as the torch reference."""
    norm = triton_module("norm")
    x = PartialSums(torch.randn(G, T, N, device=DEVICE), dtype)
    r = torch.randn(T, N, device=DEVICE).to(dtype)
    w = (torch.rand(N, device=DEVICE) + 0.5).to(dtype)
    y, s = norm.add_rms_norm(x, r, w, 1e-6)
    y_ref, s_ref = ref_add_rms_norm(x, r, w, 1e-6)
    assert y.dtype == dtype and s.dtype == dtype and y.shape == (T, N)
    # The same fp32 adds in the same order: exact in fp32. (bf16: Triton's interpreter truncates fp32 -> bf16
    # where the GPU rounds to nearest, so only close here.)
    assert torch.equal(s, s_ref) if dtype == torch.float32 else rel_err(s, s_ref) < TOL[dtype]
    assert rel_err(y, y_ref) < TOL[dtype]
    # A deferred norm of the block output runs the same computation.
    d = DeferredNorm(ResidualSum(x, r), w, 1e-6)
    assert rel_err(d.residual_out, s_ref) < TOL[dtype] and rel_err(d.run(), y_ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_hands_over_splits(triton_module, dtype):
    """rope_paged_attention(merge=False) returns the split partials when it would launch a merge; merged by the
    reference they give its output, and merge_proj's partial sums add up to o_proj of that output."""
    from highspeed.ops.rope import build_cos_sin_cache

    attn = triton_module("attention")
    mod = triton_module("merge_proj")
    slens, Hq, Hkv, D, bs = [70], 8, 2, 16, 8
    ctx = make_ctx([1], slens, bs, 40, 5)
    tables = ctx.block_tables.cpu()
    ctx.slot_mapping = torch.tensor([int(tables[0, (slens[0] - 1) // bs]) * bs + (slens[0] - 1) % bs],
                                    dtype=torch.int64, device=DEVICE)
    positions = torch.tensor([slens[0] - 1], dtype=torch.int64, device=DEVICE)
    cos_sin = build_cos_sin_cache(D, 128, 10000.0, device=DEVICE)
    q = torch.randn(1, Hq, D, device=DEVICE).to(dtype)
    k = torch.randn(1, Hkv, D, device=DEVICE).to(dtype)
    v = torch.randn(1, Hkv, D, device=DEVICE).to(dtype)
    k_cache = torch.randn(40, bs, Hkv, D, device=DEVICE).to(dtype)
    v_cache = torch.randn(40, bs, Hkv, D, device=DEVICE).to(dtype)
    args = (q, k, v, positions, cos_sin, D, False, k_cache, v_cache, ctx, D**-0.5, None, None, 1e-6)
    merged = attn.rope_paged_attention(*args)
    splits = attn.rope_paged_attention(*args, merge=False)
    assert isinstance(splits, ref_ops.AttentionSplits) and splits.part.shape[:2] == (1, Hq) and splits.part.shape[2] > 1
    assert rel_err(ref_ops.merge_splits(splits), merged) < TOL[dtype]
    w = (torch.randn(24, Hq * D, device=DEVICE) * (Hq * D) ** -0.5).to(dtype)
    got = mod.merge_proj(splits, w, 2).value()
    assert rel_err(got, (merged.reshape(1, -1).float() @ w.float().T).to(dtype)) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_proj_of_a_merged_output(triton_module, dtype):
    """lse None (HIGHSPEED_MERGE_O_PROJ=2): part is the output itself, only the split o_proj runs."""
    mod = triton_module("merge_proj")
    o = torch.randn(1, 8, 16, device=DEVICE).to(dtype)
    w = (torch.randn(40, 8 * 16, device=DEVICE) * 0.1).to(dtype)
    s = ref_ops.AttentionSplits(o[:, :, None], None, dtype)
    got, want = mod.merge_proj(s, w, 4), ref_ops.merge_proj_torch(s, w, 4)
    assert torch.equal(ref_ops.merge_splits(s), o)
    assert rel_err(got.parts, want.parts) < TOL[torch.float32]
    assert rel_err(got.value(), o.reshape(1, -1).float() @ w.float().T) < TOL[dtype]
