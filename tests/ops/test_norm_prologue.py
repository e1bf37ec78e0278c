"""A deferred RMSNorm (``highspeed.ops.norm.DeferredNorm``) run in the prologue of the kernel that consumes it --
the batch-1 GEMV (``linear``) and the decode MoE router (``fused_moe``) -- against the reference: the norm ops,
then the op. Also against the unfused kernels (norm kernel, then the op's kernel), which round the same way."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from highspeed.ops.norm import DeferredNorm
from highspeed.ops.norm import add_rms_norm as ref_add_rms_norm
from highspeed.ops.norm import rms_norm as ref_rms_norm
from tests.ops.conftest import DEVICE, HAS_CUDA, TOL, rel_err
from tests.ops.test_triton_linear import small_gemv_tiles
from tests.ops.test_triton_moe import FUSED_CASES, _expert_weights

EPS = 1e-6
# The interpreter (Triton 3.9) casts fp32 -> bf16 by truncation where torch and GPUs round to nearest, so on the
# CPU a bf16 result is compared loosely with the torch reference; against the unfused kernels it is tight anyway.
REF_TOL = {**TOL, torch.bfloat16: TOL[torch.bfloat16] if HAS_CUDA else 3e-2}
# Fused vs the unfused kernels (norm launch, then the op). bf16: the GEMV's one-pass norm skips rms_norm's two
# roundings of the normed input to bf16 (norm_onepass_tile), a few 1e-3 of difference.
CHAIN_TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def _seed_and_fuse(triton_module, monkeypatch) -> None:
    """The prologue is off by default (it measured slower on the H200): these tests switch it on."""
    torch.manual_seed(11)
    monkeypatch.setattr(triton_module("norm"), "FUSE_NORM", True)


def _norm_inputs(shape: tuple[int, ...], dtype: torch.dtype, residual: bool
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    x = (torch.randn(shape, device=DEVICE) * 2 + 0.3).to(dtype)
    r = torch.randn(shape, device=DEVICE).to(dtype) if residual else None
    nw = (1 + 0.5 * torch.randn(shape[-1], device=DEVICE)).to(dtype)
    return x, r, nw


def _reference_norm(reference, x, r, nw) -> tuple[torch.Tensor, torch.Tensor]:
    if r is None:
        return reference(ref_rms_norm, x, nw, EPS), x
    return reference(ref_add_rms_norm, x, r, nw, EPS)


def _kernel_norm(norm_mod, x, r, nw) -> torch.Tensor:
    return norm_mod.rms_norm(x, nw, EPS) if r is None else norm_mod.add_rms_norm(x, r, nw, EPS)[0]


def _check_residual_out(norm: DeferredNorm, x: torch.Tensor, r: torch.Tensor | None) -> None:
    out = norm.residual_out
    if r is None:
        assert out is x
        return
    assert out.shape == x.shape and out.dtype == x.dtype
    if HAS_CUDA or x.dtype == torch.float32:
        assert torch.equal(out, x + r)   # one rounding of x + r, like the torch add: exact
    else:
        assert rel_err(out, x + r) < 8e-3   # interpreter truncation; exactness: test_residual_out_is_exact_bf16


def _small_moe_tiles(moe, monkeypatch, T: int) -> None:
    monkeypatch.setattr(moe, "FUSED_MAX_TOKENS", max(T, moe.FUSED_MAX_TOKENS))
    if not HAS_CUDA:
        # NORM_BLOCK 16: the router's sum-of-squares pass takes several chunks.
        monkeypatch.setattr(moe, "ROUTER", dict(BLOCK_E=4, BLOCK_K=16, num_warps=4, NORM_BLOCK=16))
        monkeypatch.setattr(moe, "FUSED_GATE_UP", dict(BLOCK_N=8, BLOCK_K=16, num_warps=4))
        monkeypatch.setattr(moe, "FUSED_GATE_UP_NARROW", dict(BLOCK_N=4, BLOCK_K=16, num_warps=4, PREFETCH=True))
        monkeypatch.setattr(moe, "FUSED_DOWN", dict(BLOCK_N=4, BLOCK_K=8, num_warps=4))


# ----------------------------------------------------------------------------------------------------------------
# Batch-1 GEMV
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prefetch", [True, False])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,K,bias", [(20, 40, False), (7, 37, True), (33, 48, False), (5, 300, True), (64, 16, True)])
def test_gemv_norm_prologue(triton_module, reference, monkeypatch, prefetch, residual, dtype, N, K, bias):
    lin, norm_mod = triton_module("linear"), triton_module("norm")
    small_gemv_tiles(lin, monkeypatch, prefetch)
    x, r, nw = _norm_inputs((1, K), dtype, residual)
    w = (torch.randn(N, K, device=DEVICE) / K**0.5).to(dtype)
    b = torch.randn(N, device=DEVICE).to(dtype) if bias else None
    norm = DeferredNorm(x, nw, EPS, r)
    y = lin.linear(norm, w, b)
    assert y.shape == (1, N) and y.dtype == dtype

    normed, _ = _reference_norm(reference, x, r, nw)
    ref = F.linear(normed.double(), w.double(), b.double() if bias else None)
    assert rel_err(y, ref) < REF_TOL[dtype], rel_err(y, ref)
    unfused = lin.linear(_kernel_norm(norm_mod, x, r, nw), w, b)
    assert rel_err(y, unfused) < CHAIN_TOL[dtype], rel_err(y, unfused)
    _check_residual_out(norm, x, r)


def test_gemv_norm_prologue_wide_row(triton_module, reference, monkeypatch):
    """A row longer than the sum-of-squares chunk (several chunks), leading dims kept."""
    lin = triton_module("linear")
    small_gemv_tiles(lin, monkeypatch, True)
    monkeypatch.setattr(lin, "GEMV_ROW_NARROW", {**lin.GEMV_ROW_NARROW, "BLOCK_K": 64})
    x, r, nw = _norm_inputs((1, 1, 333), torch.float32, True)
    w = torch.randn(9, 333, device=DEVICE) / 333**0.5
    norm = DeferredNorm(x, nw, EPS, r)
    y = lin.linear(norm, w)
    normed, _ = _reference_norm(reference, x, r, nw)
    assert y.shape == (1, 1, 9)
    assert rel_err(y, F.linear(normed, w)) < TOL[torch.float32]
    _check_residual_out(norm, x, r)


def test_gemv_norm_falls_back_to_the_norm_first(triton_module, reference):
    """More than one row (or autograd on the norm) is not fused: the norm runs first, exactly the unfused ops."""
    lin = triton_module("linear")
    x, r, nw = _norm_inputs((3, 24), torch.float32, True)
    w = torch.randn(8, 24, device=DEVICE)
    norm = DeferredNorm(x, nw, EPS, r)
    normed, s = _reference_norm(reference, x, r, nw)
    assert rel_err(lin.linear(norm, w), F.linear(normed, w)) < TOL[torch.float32]
    assert torch.equal(norm.residual_out, s)

    x1, r1, nw1 = _norm_inputs((1, 24), torch.float32, True)
    nw1.requires_grad_(True)
    with torch.enable_grad():
        # The fused kernel is never used with autograd on: the norm runs first. (On CUDA that norm is itself a
        # Triton kernel, which autograd cannot see through either, so only the CPU reference can backpropagate.)
        deferred = DeferredNorm(x1, nw1, EPS, r1)
        assert deferred.needs_grad()
        y = lin.linear(deferred, w)
        normed1, _ = _reference_norm(reference, x1.detach(), r1, nw1.detach())
        assert rel_err(y.detach(), F.linear(normed1, w)) < TOL[torch.float32]
        if not HAS_CUDA:
            y.sum().backward()
            assert nw1.grad is not None and nw1.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------------------
# Decode MoE
# ----------------------------------------------------------------------------------------------------------------

# Every case with a residual (the decoder layer's post-attention norm), two without (the interpreter is slow).
MOE_NORM_CASES = [(c, dtype, True) for c in FUSED_CASES for dtype in (torch.float32, torch.bfloat16)]
MOE_NORM_CASES += [(c, torch.bfloat16, False) for c in FUSED_CASES[:2]]


@pytest.mark.parametrize("case,dtype,residual", MOE_NORM_CASES)
def test_fused_moe_norm_prologue(triton_module, reference, monkeypatch, case, dtype, residual):
    T, E, H, I, k, scoring, renorm, bias, n_group, topk_group, scale, shared = case
    from highspeed.ops.moe import fused_moe as ref_fused_moe

    moe, norm_mod = triton_module("moe"), triton_module("norm")
    _small_moe_tiles(moe, monkeypatch, T)
    x, r, nw = _norm_inputs((T, H), dtype, residual)
    gate = torch.randn(E, H, device=DEVICE) / H**0.5 * 4    # fp32 router, spread-out logits (no near-ties)
    w13, w2 = _expert_weights(E, H, I, dtype)
    b = torch.randn(E, device=DEVICE) * 0.5 if bias else None
    ws13 = (torch.randn(2 * shared, H, device=DEVICE) / H**0.5).to(dtype) if shared else None
    ws2 = (torch.randn(H, shared, device=DEVICE) / shared**0.5).to(dtype) if shared else None
    rest = (gate, w13, w2, k, scoring, renorm, b, n_group, topk_group, scale, ws13, ws2)
    norm = DeferredNorm(x, nw, EPS, r)
    out = moe.fused_moe(norm, *rest)
    assert out.shape == (T, H) and out.dtype == dtype

    normed, _ = _reference_norm(reference, x, r, nw)
    ref = reference(ref_fused_moe, normed, *rest)
    assert rel_err(out, ref) < REF_TOL[dtype], rel_err(out, ref)
    unfused = moe.fused_moe(_kernel_norm(norm_mod, x, r, nw), *rest)
    assert rel_err(out, unfused) < CHAIN_TOL[dtype], rel_err(out, unfused)
    _check_residual_out(norm, x, r)
    # The torch reference takes the deferred norm too, and sets its residual_out the same way.
    ref_norm = DeferredNorm(x, nw, EPS, r)
    assert torch.equal(reference(ref_fused_moe, ref_norm, *rest), ref)
    assert torch.equal(ref_norm.residual_out, x + r if residual else x)


def test_fused_moe_norm_large_batch_path(triton_module, reference):
    """Above FUSED_MAX_TOKENS the norm runs first (its own kernel), then ``moe_block``."""
    from highspeed.ops.moe import fused_moe as ref_fused_moe

    moe = triton_module("moe")
    T, E, H, I, k, S = moe.FUSED_MAX_TOKENS + 3, 6, 24, 16, 2, 16
    x, r, nw = _norm_inputs((T, H), torch.float32, True)
    gate = torch.randn(E, H, device=DEVICE)
    w13, w2 = _expert_weights(E, H, I, torch.float32)
    ws13, ws2 = torch.randn(2 * S, H, device=DEVICE) / H**0.5, torch.randn(H, S, device=DEVICE) / S**0.5
    rest = (gate, w13, w2, k, "softmax", True, None, 1, 1, 1.0, ws13, ws2)
    norm = DeferredNorm(x, nw, EPS, r)
    out = moe.fused_moe(norm, *rest)
    normed, _ = _reference_norm(reference, x, r, nw)
    assert rel_err(out, reference(ref_fused_moe, normed, *rest)) < TOL[torch.float32]
    _check_residual_out(norm, x, r)


# ----------------------------------------------------------------------------------------------------------------
# The new residual, exactly, in bf16 on every platform; the DeferredNorm object itself
# ----------------------------------------------------------------------------------------------------------------

def test_residual_out_is_exact_bf16(triton_module, monkeypatch):
    """x and residual on a 1/16 grid: x + residual is exact in bf16 however the platform rounds, so the stored
    residual must equal it bit for bit (it is the residual stream of every later layer)."""
    lin, moe = triton_module("linear"), triton_module("moe")
    small_gemv_tiles(lin, monkeypatch, True)
    _small_moe_tiles(moe, monkeypatch, 2)
    grid = lambda *s: (torch.randint(-64, 64, s, device=DEVICE) / 16).to(torch.bfloat16)  # noqa: E731
    x, r, nw = grid(1, 45), grid(1, 45), (1 + 0.5 * torch.randn(45, device=DEVICE)).to(torch.bfloat16)
    norm = DeferredNorm(x, nw, EPS, r)
    lin.linear(norm, torch.randn(6, 45, device=DEVICE).to(torch.bfloat16))
    assert torch.equal(norm.residual_out, x + r)

    E, H, I = 8, 40, 16
    x, r = grid(2, H), grid(2, H)
    norm = DeferredNorm(x, nw[:H], EPS, r)
    w13, w2 = _expert_weights(E, H, I, torch.bfloat16)
    moe.fused_moe(norm, torch.randn(E, H, device=DEVICE), w13, w2, 2)
    assert torch.equal(norm.residual_out, x + r)


def test_deferred_norm_object(reference):
    x, r, nw = _norm_inputs((2, 16), torch.float32, True)
    norm = DeferredNorm(x, nw, EPS, r)
    with pytest.raises(RuntimeError, match="not been computed"):
        norm.residual_out
    y = reference(norm.run)
    assert reference(norm.run) is y   # computed once
    normed, s = _reference_norm(reference, x, r, nw)
    assert torch.equal(y, normed) and torch.equal(norm.residual_out, s)
    assert DeferredNorm(x, nw, EPS).residual_out is x
