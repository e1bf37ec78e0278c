"""Triton RoPE kernels (highspeed.ops.triton.rope) against highspeed.ops.rope / write_kv."""
from __future__ import annotations

import pytest
import torch

from highspeed.ops.rope import build_cos_sin_cache
from highspeed.ops.rope import rope as ref_rope
from tests.ops.conftest import DEVICE, HAS_CUDA, rel_err


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(7)


CASES = [
    # T, heads, D, rotary_dim, interleaved
    (5, 3, 16, 16, False),
    (4, 2, 24, 12, False),   # partial NeoX (GLM-4.x style)
    (6, 5, 32, 32, True),
    (3, 1, 40, 16, True),    # partial interleaved
    (7, 4, 128, 64, False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,H,D,rd,inter", CASES)
def test_rope(triton_module, reference, T, H, D, rd, inter, dtype):
    rope = triton_module("rope")
    cs = build_cos_sin_cache(rd, 64, 10000.0, device=DEVICE)
    x = torch.randn(T, H, D, device=DEVICE).to(dtype)
    pos = torch.randint(0, 64, (T,), device=DEVICE)
    out = rope.rope(x, pos, cs, rd, inter)
    ref = reference(ref_rope, x, pos, cs, rd, inter)
    assert out.shape == x.shape and out.dtype == dtype
    assert rel_err(out, ref) < (1e-6 if dtype == torch.float32 else 5e-3)


def test_rope_2d_and_strided(triton_module, reference):
    rope = triton_module("rope")
    cs = build_cos_sin_cache(16, 32, 10000.0, device=DEVICE)
    pos = torch.randint(0, 32, (6,), device=DEVICE)
    x2 = torch.randn(6, 16, device=DEVICE)
    assert rel_err(rope.rope(x2, pos, cs, 16, True), reference(ref_rope, x2, pos, cs, 16, True)) < 1e-6
    q = torch.randn(6, 3, 48, device=DEVICE)[..., 32:]   # MLA's q_pe: a slice of each head
    assert rel_err(rope.rope(q, pos, cs, 16, False), reference(ref_rope, q, pos, cs, 16, False)) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inter", [False, True])
def test_rope_and_write_kv_gqa(triton_module, reference, dtype, inter):
    rope = triton_module("rope")
    T, Hq, Hk, D, rd, nb, bs = 5, 6, 2, 32, 16, 4, 4
    cs = build_cos_sin_cache(rd, 64, 10000.0, device=DEVICE)
    q = torch.randn(T, Hq, D, device=DEVICE).to(dtype)
    k = torch.randn(T, Hk, D, device=DEVICE).to(dtype)
    v = torch.randn(T, Hk, D + 8, device=DEVICE).to(dtype)
    pos = torch.randint(0, 64, (T,), device=DEVICE)
    slots = torch.tensor([3, 0, -1, 15, 9], device=DEVICE)
    caches = [torch.randn(nb, bs, Hk, d, device=DEVICE).to(dtype) for d in (D, D + 8)]
    ref_caches = [c.clone() for c in caches]
    q_out, k_out = rope.rope_and_write_kv(q, k, v, pos, cs, rd, inter, caches[0], caches[1], slots)
    q_ref, k_ref = reference(rope.rope_and_write_kv_reference, q, k, v, pos, cs, rd, inter, *ref_caches, slots)
    tol = 1e-6 if dtype == torch.float32 else 5e-3
    assert rel_err(q_out, q_ref) < tol and rel_err(k_out, k_ref) < tol
    assert rel_err(caches[0], ref_caches[0]) < tol
    assert torch.equal(caches[1], ref_caches[1])  # v is copied, bit for bit


def test_rope_and_write_kv_mla_views(triton_module, reference):
    """MLA: k_pe and c go into one latent cache through last-dim views."""
    rope = triton_module("rope")
    T, H, L, R, P, nb, bs = 4, 3, 32, 16, 8, 3, 4
    cs = build_cos_sin_cache(R, 64, 10000.0, device=DEVICE)
    q_pe = torch.randn(T, H, P + R, device=DEVICE)[..., P:]
    k_pe = torch.randn(T, 1, R, device=DEVICE)
    c = torch.randn(T, 1, L, device=DEVICE)
    pos = torch.randint(0, 64, (T,), device=DEVICE)
    slots = torch.tensor([5, 0, 11, 2], device=DEVICE)
    latent = torch.randn(nb, bs, L + R, device=DEVICE)
    latent_ref = latent.clone()
    q_out, k_out = rope.rope_and_write_kv(q_pe, k_pe, c, pos, cs, R, True, latent[..., L:], latent[..., :L], slots)
    q_ref, k_ref = reference(rope.rope_and_write_kv_reference, q_pe, k_pe, c, pos, cs, R, True,
                             latent_ref[..., L:], latent_ref[..., :L], slots)
    assert rel_err(q_out, q_ref) < 1e-6 and rel_err(k_out, k_ref) < 1e-6
    assert rel_err(latent, latent_ref) < 1e-6


# Triton's CPU interpreter casts fp32 -> bf16 by truncation (the GPU rounds to nearest); the fused norm + rope
# rounds three times, so the interpreter's bias adds up to ~1e-2.
NORM_BF16_TOL = 5e-3 if HAS_CUDA else 1.5e-2

NORM_CASES = [
    # T, Hq, Hk, D, rotary_dim, interleaved
    (5, 6, 2, 32, 32, False),   # Qwen3: full NeoX rotary
    (4, 5, 3, 24, 12, False),   # odd head counts, partial NeoX (GLM-4.x with use_qk_norm): the pass-through is normed
    (3, 7, 1, 40, 16, True),    # odd, partial interleaved
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,Hq,Hk,D,rd,inter", NORM_CASES)
def test_rope_and_write_kv_qk_norm(triton_module, reference, T, Hq, Hk, D, rd, inter, dtype):
    """Per-head QK RMSNorm folded in: equal to rms_norm, then the unfused rope + cache write."""
    from highspeed.ops.norm import rms_norm
    from highspeed.ops.rope import rope_and_write_kv as ops_rope_and_write_kv

    rope = triton_module("rope")
    nb, bs, eps = 3, 4, 1e-6
    cs = build_cos_sin_cache(rd, 64, 10000.0, device=DEVICE)
    q = (3 * torch.randn(T, Hq, D, device=DEVICE)).to(dtype)
    k = (3 * torch.randn(T, Hk, D, device=DEVICE)).to(dtype)
    v = torch.randn(T, Hk, D, device=DEVICE).to(dtype)
    qw, kw = (1 + 0.5 * torch.randn(2, D, device=DEVICE)).to(dtype)
    pos = torch.randint(0, 64, (T,), device=DEVICE)
    slots = torch.tensor([7, -1, 2, 11, 0][:T], device=DEVICE)
    caches = [torch.zeros(nb, bs, Hk, D, device=DEVICE, dtype=dtype) for _ in range(2)]
    ref_caches = [c.clone() for c in caches]
    old_caches = [c.clone() for c in caches]
    q_out, k_out = rope.rope_and_write_kv(q, k, v, pos, cs, rd, inter, *caches, slots,
                                          q_norm_weight=qw, k_norm_weight=kw, eps=eps)
    q_ref, k_ref = reference(ops_rope_and_write_kv, q, k, v, pos, cs, rd, inter, *ref_caches, slots, qw, kw, None, eps)
    # The reference is exactly the model's old unfused code: norms, then rope + write.
    q_old, k_old = reference(ops_rope_and_write_kv, reference(rms_norm, q, qw, eps), reference(rms_norm, k, kw, eps),
                             v, pos, cs, rd, inter, *old_caches, slots)
    assert torch.equal(q_ref, q_old) and torch.equal(k_ref, k_old) and torch.equal(ref_caches[0], old_caches[0])
    assert q_out.dtype == dtype and k_out.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else NORM_BF16_TOL
    assert rel_err(q_out, q_ref) < tol and rel_err(k_out, k_ref) < tol
    assert rel_err(caches[0], ref_caches[0]) < tol
    assert torch.equal(caches[1], ref_caches[1])  # v is not normed here: copied bit for bit


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("L", [32, 40])
def test_rope_and_write_kv_mla_latent_norm(triton_module, reference, L, dtype):
    """MLA: kv_a_layernorm of the latent folded in (only the cache sees it), q_pe written into the absorbed query."""
    rope = triton_module("rope")
    T, H, R, P, nb, bs, eps = 4, 3, 16, 8, 3, 4, 1e-6
    cs = build_cos_sin_cache(R, 64, 10000.0, device=DEVICE)
    q_pe = torch.randn(T, H, P + R, device=DEVICE).to(dtype)[..., P:]
    kv = (3 * torch.randn(T, L + R, device=DEVICE)).to(dtype)
    c, k_pe = kv.split([L, R], dim=-1)            # strided views, as the model passes them
    w = (1 + 0.5 * torch.randn(L, device=DEVICE)).to(dtype)
    pos = torch.randint(0, 64, (T,), device=DEVICE)
    slots = torch.tensor([5, -1, 11, 2], device=DEVICE)
    latent = torch.zeros(nb, bs, L + R, device=DEVICE, dtype=dtype)
    latent_ref = latent.clone()
    q_abs = torch.full((T, H, L + R), 9.0, device=DEVICE, dtype=dtype)
    q_abs_ref = q_abs.clone()
    q_out, k_out = rope.rope_and_write_kv(q_pe, k_pe, c, pos, cs, R, True, latent[..., L:], latent[..., :L], slots,
                                          v_norm_weight=w, eps=eps, q_out=q_abs[..., L:])
    q_ref, k_ref = reference(rope.rope_and_write_kv_reference, q_pe, k_pe, c, pos, cs, R, True,
                             latent_ref[..., L:], latent_ref[..., :L], slots, None, None, w, eps, q_abs_ref[..., L:])
    assert q_out.data_ptr() == q_abs[..., L:].data_ptr() and torch.equal(q_abs[..., :L], q_abs_ref[..., :L])
    tol = 1e-6 if dtype == torch.float32 else NORM_BF16_TOL
    assert rel_err(q_abs, q_abs_ref) < tol and rel_err(k_out, k_ref) < tol
    assert rel_err(latent, latent_ref) < tol
    assert latent[2, 1].abs().sum() == 0  # an unused slot stays untouched
