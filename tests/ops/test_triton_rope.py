"""Triton RoPE kernels (highspeed.ops.triton.rope) against highspeed.ops.rope / write_kv."""
from __future__ import annotations

import pytest
import torch

from highspeed.ops.rope import build_cos_sin_cache
from highspeed.ops.rope import rope as ref_rope
from tests.ops.conftest import DEVICE, rel_err


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
