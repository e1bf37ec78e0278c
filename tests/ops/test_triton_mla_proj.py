"""Triton MLA decode products (highspeed.ops.triton.mla_proj) against the torch.bmm references, on the strided views
the model passes: q_nope a slice of q, w_uk / w_uv row ranges of kv_b_proj.weight.view(H, D + V, L), and the
absorbed query written into the first L dims of a wider [T, H, L + R] buffer."""
from __future__ import annotations

import pytest
import torch

from highspeed.ops import mla_proj as ref_ops
from highspeed.ops.rope import build_cos_sin_cache
from tests.ops.conftest import DEVICE, HAS_CUDA, TOL, rel_err

ROPE = 8   # q's and q_abs's extra rope dims: the kernels see them only as strides


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(11)


@pytest.fixture
def mla(triton_module, monkeypatch):
    mod = triton_module("mla_proj")
    if not HAS_CUDA:  # tiny tiles under the interpreter: several column/row blocks and reduction steps, masked tails
        monkeypatch.setattr(mod, "TILE", 128)
        monkeypatch.setattr(mod, "MIN_PROGRAMS", 10**6)
    return mod


def make(T: int, H: int, D: int, L: int, V: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    q = torch.randn(T, H * (D + ROPE), device=DEVICE).to(dtype)
    w_kv = (torch.randn(H, D + V, L, device=DEVICE) * L**-0.5).to(dtype)
    return dict(q_nope=q.view(T, H, -1)[..., :D], w_uk=w_kv[:, :D], w_uv=w_kv[:, D:],
                latent=torch.randn(T, H, L, device=DEVICE).to(dtype),
                q_abs=torch.full((T, H, L + ROPE), float("nan"), device=DEVICE, dtype=dtype),
                out=torch.full((T, H, V), float("nan"), device=DEVICE, dtype=dtype))


SHAPES = [(2, 12, 40, 20), (3, 7, 33, 5), (5, 48, 64, 16), (1, 20, 100, 9), (2, 16, 16, 16)]


@pytest.mark.parametrize("one_step", [frozenset(), frozenset({"absorb_q", "latent_to_v"})])
@pytest.mark.parametrize("T", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H,D,L,V", SHAPES)
def test_mla_proj_kernels(mla, monkeypatch, one_step, T, dtype, H, D, L, V):
    """With and without the loop-free variant for reductions that fit one tile (taken here where D or L is 16)."""
    monkeypatch.setattr(mla, "ONE_STEP_OPS", one_step)
    a = make(T, H, D, L, V, dtype)
    assert mla._use_kernel(a["q_nope"], a["w_uk"], a["q_abs"][..., :L], D, L)
    assert mla._use_kernel(a["latent"], a["w_uv"], a["out"], V, L)
    got = mla.absorb_q(a["q_nope"], a["w_uk"], a["q_abs"][..., :L])
    ref = torch.einsum("thd,hdl->thl", a["q_nope"].double(), a["w_uk"].double())
    assert got.data_ptr() == a["q_abs"].data_ptr() and rel_err(got, ref) < TOL[dtype], rel_err(got, ref)
    assert a["q_abs"][..., L:].isnan().all()   # the rope dims are the rope kernel's, untouched
    got = mla.latent_to_v(a["latent"], a["w_uv"], a["out"])
    ref = torch.einsum("thl,hvl->thv", a["latent"].double(), a["w_uv"].double())
    assert got is a["out"] and rel_err(got, ref) < TOL[dtype], rel_err(got, ref)


def test_mla_proj_fallbacks(mla, reference):
    """More tokens than MAX_T, a non-unit last stride or mixed dtypes take torch.bmm, with the reference's result."""
    H, D, L, V = 3, 12, 40, 20
    big = make(mla.MAX_T + 1, H, D, L, V, torch.float32)
    strided_out = torch.empty(1, H, 2 * V, device=DEVICE)[..., ::2]
    one = make(1, H, D, L, V, torch.float32)
    assert not mla._use_kernel(big["q_nope"], big["w_uk"], big["q_abs"][..., :L], D, L)
    assert not mla._use_kernel(one["latent"], one["w_uv"], strided_out, V, L)
    assert not mla._use_kernel(one["latent"].bfloat16(), one["w_uv"], one["out"], V, L)
    got = mla.absorb_q(big["q_nope"], big["w_uk"], big["q_abs"][..., :L])
    want = reference(ref_ops.absorb_q, big["q_nope"], big["w_uk"], torch.empty(mla.MAX_T + 1, H, L, device=DEVICE))
    assert torch.equal(got, want)
    got = mla.latent_to_v(big["latent"], big["w_uv"], big["out"])
    assert torch.equal(got, reference(ref_ops.latent_to_v, big["latent"], big["w_uv"], torch.empty_like(big["out"])))
    got = mla.latent_to_v(one["latent"], one["w_uv"], strided_out)
    assert torch.allclose(got, torch.einsum("thl,hvl->thv", one["latent"], one["w_uv"]), atol=1e-5)


def test_mla_proj_reference_matches_einsum():
    """The dispatching ops (the torch path on CPU) write into the given views."""
    a = make(2, 3, 12, 40, 20, torch.float32)
    got = ref_ops.absorb_q(a["q_nope"], a["w_uk"], a["q_abs"][..., :40])
    assert torch.allclose(got, torch.einsum("thd,hdl->thl", a["q_nope"], a["w_uk"]), atol=1e-5)
    assert torch.allclose(a["q_abs"][..., :40], got) and a["q_abs"][..., 40:].isnan().all()
    got = ref_ops.latent_to_v(a["latent"], a["w_uv"], a["out"])
    assert torch.allclose(a["out"], torch.einsum("thl,hvl->thv", a["latent"], a["w_uv"]), atol=1e-5)


@pytest.mark.parametrize("H,D,L,V", [(20, 192, 512, 256), (128, 128, 512, 128), (64, 192, 512, 256)])
def test_mla_proj_configs_fill_the_gpu(triton_module, H, D, L, V):
    """At the model shapes (GLM-4.7-Flash, DeepSeek-V3, GLM-5) the grids have hundreds of programs for 132 SMs and
    the tiles stay within TILE."""
    mod = triton_module("mla_proj")
    block_d, block_l = mod.absorb_config(H, D, L)
    assert H * -(-L // block_l) >= 264 and block_d * block_l <= mod.knobs("absorb_q", H * D * L)[0]
    block_v, block_l = mod.latent_to_v_config(H, V, L)
    assert H * -(-V // block_v) >= 264 and block_v * block_l <= mod.knobs("latent_to_v", H * V * L)[0]


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("T,H,D,L,R", [(1, 20, 24, 32, 16), (2, 7, 33, 40, 8), (1, 3, 16, 16, 16)])
def test_absorb_q_rope_write(mla, triton_module, monkeypatch, fused, T, H, D, L, R):
    """The one-launch absorb + RoPE/latent-cache write equals the two ops run apart (bit for bit: the same
    arithmetic in each program), incl. a padded token (slot -1) when T = 2."""
    rope = triton_module("rope")
    monkeypatch.setattr(mla, "FUSE_ABSORB_ROPE", fused)
    dtype = torch.bfloat16
    q = torch.randn(T, H, D + R, device=DEVICE).to(dtype)
    q_nope, q_pe = q[..., :D], q[..., D:]
    w_uk = (torch.randn(H, D, L, device=DEVICE) * D**-0.5).to(dtype)
    kv = (3 * torch.randn(T, L + R, device=DEVICE)).to(dtype)
    c, k_pe = kv.split([L, R], dim=-1)
    w = (1 + 0.5 * torch.randn(L, device=DEVICE)).to(dtype)
    cs = build_cos_sin_cache(R, 64, 10000.0, device=DEVICE)
    pos = torch.randint(0, 64, (T,), device=DEVICE)
    slots = torch.tensor([6, -1][:T], device=DEVICE)
    outs = []
    for one_launch in (True, False):
        latent = torch.zeros(3, 4, L + R, device=DEVICE, dtype=dtype)
        q_abs = torch.full((T, H, L + R), float("nan"), device=DEVICE, dtype=dtype)
        kw = dict(q=q_pe, k=k_pe, v=c, positions=pos, cos_sin=cs, rotary_dim=R, interleaved=True,
                  k_cache=latent[..., L:], v_cache=latent[..., :L], slot_mapping=slots, v_norm_weight=w, eps=1e-6,
                  q_out=q_abs[..., L:])
        if one_launch:
            mla.absorb_q_rope_write(q_nope, w_uk, q_abs[..., :L], **kw)
        else:
            mla.absorb_q(q_nope, w_uk, q_abs[..., :L])
            rope.rope_and_write_kv(**kw)
        outs.append((q_abs, latent))
    assert not outs[0][0].isnan().any() and outs[0][1].abs().sum() > 0
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_absorb_q_rope_write_reference(reference):
    """The reference op is absorb_q then rope_and_write_kv."""
    from highspeed.ops.rope import rope_and_write_kv

    T, H, D, L, R = 2, 3, 8, 16, 8
    q_nope, w_uk = torch.randn(T, H, D, device=DEVICE), torch.randn(H, D, L, device=DEVICE)
    q_pe, k_pe, c = torch.randn(T, H, R, device=DEVICE), torch.randn(T, R, device=DEVICE), torch.randn(T, L, device=DEVICE)
    cs = build_cos_sin_cache(R, 16, 10000.0, device=DEVICE)
    pos, slots = torch.tensor([1, 3], device=DEVICE), torch.tensor([0, 5], device=DEVICE)
    got, want = [], []
    for out_list, fused in ((got, True), (want, False)):
        latent = torch.zeros(2, 4, L + R, device=DEVICE)
        q_abs = torch.zeros(T, H, L + R, device=DEVICE)
        kw = dict(q=q_pe, k=k_pe, v=c, positions=pos, cos_sin=cs, rotary_dim=R, interleaved=False,
                  k_cache=latent[..., L:], v_cache=latent[..., :L], slot_mapping=slots, q_out=q_abs[..., L:])
        if fused:
            reference(ref_ops.absorb_q_rope_write, q_nope, w_uk, q_abs[..., :L], **kw)
        else:
            reference(ref_ops.absorb_q, q_nope, w_uk, q_abs[..., :L])
            reference(rope_and_write_kv, **kw)
        out_list += [q_abs, latent]
    assert all(torch.equal(a, b) for a, b in zip(got, want)) and got[1].abs().sum() > 0
