"""Triton MLA decode products (highspeed.ops.triton.mla_proj) against the torch.bmm references, on the strided views
the model passes: q_nope a slice of q, w_uk / w_uv row ranges of kv_b_proj.weight.view(H, D + V, L), and the
absorbed query written into the first L dims of a wider [T, H, L + R] buffer."""
from __future__ import annotations

import pytest
import torch

from highspeed.ops import mla_proj as ref_ops
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


@pytest.mark.parametrize("T", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H,D,L,V", SHAPES)
def test_mla_proj_kernels(mla, T, dtype, H, D, L, V):
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
