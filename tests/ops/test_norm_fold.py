"""The residual RMSNorm folded into the kernels around it (``ops/triton/norm.py``): a producer (the batch-1 GEMV,
the decode MoE's down kernel) adds the residual in its epilogue and stores its programs' sums of squares
(``ResidualSum``); a consumer (the GEMV, the MoE router and gate/up kernel) takes the ``DeferredNorm`` of that sum
and normalises the row as it loads it. Checked against the torch reference (the norm ops, then the op), and the
sums of squares are shown to be what the consumer really reads."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from highspeed.ops.norm import DeferredNorm, ResidualSum
from highspeed.ops.norm import add_rms_norm as ref_add_rms_norm
from highspeed.ops.norm import rms_norm as ref_rms_norm
from tests.ops.conftest import DEVICE, HAS_CUDA, TOL, rel_err
from tests.ops.test_triton_linear import small_gemv_tiles
from tests.ops.test_triton_moe import FUSED_CASES, _expert_weights

EPS = 1e-6
# The interpreter (Triton 3.9) casts fp32 -> bf16 by truncation where torch and GPUs round to nearest, so on the
# CPU a bf16 result is compared loosely with the torch reference.
REF_TOL = {**TOL, torch.bfloat16: TOL[torch.bfloat16] if HAS_CUDA else 3e-2}


@pytest.fixture(autouse=True)
def _seed_and_fold(monkeypatch) -> None:
    torch.manual_seed(11)
    import highspeed.ops.norm as norm_ops

    monkeypatch.setattr(norm_ops, "FOLD_NORM", True)
    monkeypatch.setattr(norm_ops, "FOLD_SELF", False)   # the partial-sum fold, also under HIGHSPEED_FOLD_NORM=self


def _inputs(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = (torch.randn(shape, device=DEVICE) * 2 + 0.3).to(dtype)
    r = torch.randn(shape, device=DEVICE).to(dtype)
    nw = (1 + 0.5 * torch.randn(shape[-1], device=DEVICE)).to(dtype)
    return x, r, nw


def _check_sums(rs: ResidualSum, expected_s: torch.Tensor, dtype: torch.dtype) -> None:
    """The producer's output: the residual added (no pending residual) and the partial sums of squares of the
    rows it stored."""
    assert rs.residual is None and rs.sumsq is not None and rs.sumsq.dtype == torch.float32
    assert rs.x.shape == expected_s.shape and rs.x.dtype == dtype
    assert rel_err(rs.x, expected_s) < REF_TOL[dtype], rel_err(rs.x, expected_s)
    rows = rs.x.reshape(-1, rs.x.shape[-1]).double()
    torch.testing.assert_close(rs.sumsq.double().sum(-1), (rows * rows).sum(-1), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Batch-1 GEMV: producer, consumer, and the chain
# ----------------------------------------------------------------------------------------------------------------

def _gemv_producer(lin, reference, dtype: torch.dtype, K: int, bias: bool
                   ) -> tuple[ResidualSum, torch.Tensor, torch.Tensor]:
    """The GEMV as a producer: s = a @ w_in^T (+ b) + r. Returns (its ResidualSum, the reference s, a norm
    weight for the consumer)."""
    a, r, nw = _inputs((1, K), dtype)
    w_in = (torch.randn(K, K, device=DEVICE) / K**0.5).to(dtype)
    b = torch.randn(K, device=DEVICE).to(dtype) if bias else None
    return lin.linear(a, w_in, b, r), reference(F.linear, a, w_in, b) + r, nw


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,K,bias", [(20, 40, False), (7, 37, True), (33, 48, False), (5, 300, True)])
def test_gemv_producer_and_consumer(triton_module, reference, monkeypatch, dtype, N, K, bias):
    lin = triton_module("linear")
    small_gemv_tiles(lin, monkeypatch, False, whole=True)
    # Producer: s = a @ w_in^T (+ b) + r, with its sums of squares.
    rs, ref_s, nw = _gemv_producer(lin, reference, dtype, K, bias)
    _check_sums(rs, ref_s, dtype)
    # Consumer: the norm of s, folded into the next GEMV.
    w = (torch.randn(N, K, device=DEVICE) / K**0.5).to(dtype)
    norm = DeferredNorm(rs, nw, EPS)
    y = lin.linear(norm, w)
    assert norm.residual_out is rs.x
    ref = F.linear(reference(ref_rms_norm, rs.x, nw, EPS).double(), w.double())
    assert y.shape == (1, N) and y.dtype == dtype
    assert rel_err(y, ref) < REF_TOL[dtype], rel_err(y, ref)
    # The consumer reads the sums of squares (it does not recompute them): scaled sums scale the result.
    scaled = lin.linear(DeferredNorm(ResidualSum(rs.x, None, rs.sumsq * 4), nw, EPS), w)
    assert rel_err(scaled, ref / 2) < REF_TOL[dtype] + 1e-3, rel_err(scaled, ref / 2)


def test_gemv_without_fold(triton_module, reference, monkeypatch):
    """HIGHSPEED_FOLD_NORM=0, or more than one row (cuBLAS): the residual add is left pending, to the next norm
    launch (``add_rms_norm``), exactly the unfolded ops."""
    import highspeed.ops.norm as norm_ops

    lin = triton_module("linear")
    small_gemv_tiles(lin, monkeypatch, False, whole=True)
    monkeypatch.setattr(norm_ops, "FOLD_NORM", False)
    a, r, nw = _inputs((1, 24), torch.float32)
    w = torch.randn(24, 24, device=DEVICE) / 24**0.5
    rs = lin.linear(a, w, None, r)
    assert rs.residual is r and rs.sumsq is None
    assert rel_err(rs.x, F.linear(a, w)) < TOL[torch.float32]
    normed, _ = reference(ref_add_rms_norm, rs.x, r, nw, EPS)
    y = lin.linear(DeferredNorm(rs, nw, EPS), w)
    assert rel_err(y, F.linear(normed, w)) < TOL[torch.float32]

    a3, r3, _ = _inputs((3, 24), torch.float32)
    rs3 = lin.linear(a3, w, None, r3)
    assert rs3.residual is r3 and rs3.sumsq is None
    normed, s = reference(ref_add_rms_norm, rs3.x, r3, nw, EPS)
    norm = DeferredNorm(rs3, nw, EPS)
    assert rel_err(lin.linear(norm, w), F.linear(normed, w)) < TOL[torch.float32]
    assert torch.equal(norm.residual_out, s)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,K,strided", [(20, 40, False), (7, 37, True), (5, 300, False)])
def test_gemv_self_norm(triton_module, reference, monkeypatch, dtype, N, K, strided):
    """A norm without a residual (MLA's q_a_layernorm) folded into the whole-row GEMV that reads its output
    (HIGHSPEED_SELF_NORM): the GEMV takes the sums of squares from x itself and no norm runs; x may be a column
    slice of a wider output (q_a beside kv_a). Off, the norm runs first: the same values."""
    lin = triton_module("linear")
    small_gemv_tiles(lin, monkeypatch, False, whole=True)
    monkeypatch.setattr(lin, "ADD_NORM", False)   # (a pending residual is checked below to stay unfolded)
    wide, _, nw = _inputs((1, K + 9 if strided else K), dtype)
    x = wide[:, :K]
    nw = nw[:K].contiguous()
    w = (torch.randn(N, K, device=DEVICE) / K**0.5).to(dtype)
    ref = F.linear(reference(ref_rms_norm, x, nw, EPS).double(), w.double())
    import highspeed.ops.norm as norm_ops

    calls = []
    monkeypatch.setattr(DeferredNorm, "run", lambda self: calls.append(1) or ref_rms_norm(self.x, self.weight,
                                                                                           self.eps))
    for on in (True, False):
        monkeypatch.setattr(lin, "SELF_NORM", on)
        calls.clear()
        y = lin.linear(DeferredNorm(x, nw, EPS), w)
        assert y.shape == (1, N) and y.dtype == dtype
        assert rel_err(y, ref) < REF_TOL[dtype], (on, rel_err(y, ref))
        assert len(calls) == (0 if on else 1)
    # The kernel really normalises by x's own rms: x scaled by 4 gives the same result (eps aside).
    monkeypatch.setattr(lin, "SELF_NORM", True)
    y4 = lin.linear(DeferredNorm((x.float() * 4).to(dtype), nw, EPS), w)
    assert rel_err(y4, ref) < REF_TOL[dtype] + 1e-3, rel_err(y4, ref)
    # A pending residual cannot be folded this way: the norm runs.
    calls.clear()
    lin.linear(DeferredNorm(x, nw, EPS, residual=torch.zeros_like(x)), w)
    assert len(calls) == 1
    assert norm_ops.FOLD_NORM   # (this module's fixture; the residual fold is a different path)


# ----------------------------------------------------------------------------------------------------------------
# Decode MoE: the router and gate/up fold the norm in, the down kernel adds the residual
# ----------------------------------------------------------------------------------------------------------------

def _moe_tiles(moe, monkeypatch, T: int, prefetch_all: bool = False) -> None:
    """Small tiles under the interpreter; ``prefetch_all``: the double-buffered shapes also load x / the
    activations / the shared rows one iteration ahead (PREFETCH_ALL)."""
    monkeypatch.setattr(moe, "FUSED_MAX_TOKENS", max(T, moe.FUSED_MAX_TOKENS))
    monkeypatch.setattr(moe.lin, "WHOLE_ROWS", True)
    if not HAS_CUDA:
        pf = dict(PREFETCH=True, PREFETCH_ALL=prefetch_all)
        monkeypatch.setattr(moe, "ROUTER", dict(BLOCK_E=4, BLOCK_K=16, num_warps=4))
        monkeypatch.setattr(moe, "FUSED_GATE_UP", dict(BLOCK_N=8, BLOCK_K=16, num_warps=4))
        monkeypatch.setattr(moe, "FUSED_GATE_UP_NARROW", dict(BLOCK_N=4, BLOCK_K=16, num_warps=4, **pf))
        monkeypatch.setattr(moe, "FUSED_DOWN", dict(BLOCK_N=4, BLOCK_K=8, num_warps=4))
        monkeypatch.setattr(moe, "FUSED_DOWN_WIDE", dict(BLOCK_N=2, BLOCK_K=8, num_warps=4, **pf))
        monkeypatch.setattr(moe, "FUSED_DOWN_WIDE_SHARED_IN_LOOP", dict(BLOCK_N=1, BLOCK_K=8, num_warps=4, **pf))
    else:
        for name in ("FUSED_GATE_UP", "FUSED_GATE_UP_NARROW", "FUSED_DOWN", "FUSED_DOWN_WIDE",
                     "FUSED_DOWN_WIDE_SHARED_IN_LOOP"):
            monkeypatch.setattr(moe, name, {**getattr(moe, name), "PREFETCH_ALL": prefetch_all})


def _moe_case(case: tuple, dtype: torch.dtype) -> tuple:
    """The MoE block's arguments after x for a FUSED_CASES row: (gate, w13, w2, k, scoring, ..., ws13, ws2)."""
    T, E, H, I, k, scoring, renorm, bias, n_group, topk_group, scale, shared = case
    gate = torch.randn(E, H, device=DEVICE) / H**0.5 * 4    # fp32 router, spread-out logits (no near-ties)
    w13, w2 = _expert_weights(E, H, I, dtype)
    b = torch.randn(E, device=DEVICE) * 0.5 if bias else None
    ws13 = (torch.randn(2 * shared, H, device=DEVICE) / H**0.5).to(dtype) if shared else None
    ws2 = (torch.randn(H, shared, device=DEVICE) / shared**0.5).to(dtype) if shared else None
    return gate, w13, w2, k, scoring, renorm, b, n_group, topk_group, scale, ws13, ws2


@pytest.mark.parametrize("prefetch_all", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", FUSED_CASES)
def test_fused_moe_fold(triton_module, reference, monkeypatch, case, dtype, prefetch_all):
    T, H = case[0], case[2]
    from highspeed.ops.moe import fused_moe as ref_fused_moe

    moe = triton_module("moe")
    _moe_tiles(moe, monkeypatch, T, prefetch_all)
    s, r2, nw = _inputs((T, H), dtype)
    rest = _moe_case(case, dtype)
    sq = s.double().pow(2)
    # The input as a producer leaves it: the row and its partial sums of squares (split unevenly on purpose).
    sumsq = torch.stack([sq[:, : H // 3].sum(-1), sq[:, H // 3:].sum(-1), torch.zeros(T, dtype=sq.dtype, device=DEVICE)], -1)
    norm = DeferredNorm(ResidualSum(s, None, sumsq.float().contiguous()), nw, EPS)
    out = moe.fused_moe(norm, *rest, r2)
    normed = reference(ref_rms_norm, s, nw, EPS)
    block = reference(ref_fused_moe, normed, *rest)
    _check_sums(out, block + r2, dtype)
    assert norm.residual_out is s
    # Routing and the experts really see the normalised row: the unnormalised one gives another answer.
    assert rel_err(reference(ref_fused_moe, s, *rest), block) > 10 * REF_TOL[dtype]


def test_fused_moe_pending_residual(triton_module, reference, monkeypatch):
    """A norm whose residual add is still pending (its producer ran unfused) runs first; then the block adds the
    new residual stream, and the reference gives the same ResidualSum semantics."""
    from highspeed.ops.moe import fused_moe as ref_fused_moe

    moe = triton_module("moe")
    _moe_tiles(moe, monkeypatch, 1)
    T, E, H, I, k = 1, 8, 32, 16, 2
    y, r, nw = _inputs((T, H), torch.float32)
    gate = torch.randn(E, H, device=DEVICE) / H**0.5 * 4
    w13, w2 = _expert_weights(E, H, I, torch.float32)
    rest = (gate, w13, w2, k)
    norm = DeferredNorm(ResidualSum(y, r), nw, EPS)
    normed, s = reference(ref_add_rms_norm, y, r, nw, EPS)
    from highspeed.ops.norm import residual_of

    out = moe.fused_moe(norm, *rest, residual=residual_of(norm))
    assert torch.equal(norm.residual_out, s) if HAS_CUDA else rel_err(norm.residual_out, s) < 1e-6
    _check_sums(out, reference(ref_fused_moe, normed, *rest) + s, torch.float32)
    ref_out = reference(ref_fused_moe, normed, *rest, residual=s)
    assert isinstance(ref_out, ResidualSum) and ref_out.residual is s


def test_residual_sum_objects(reference):
    y, r, nw = _inputs((2, 16), torch.float32)
    pending = ResidualSum(y, r)
    assert torch.equal(pending.value(), y + r)
    norm = DeferredNorm(pending, nw, EPS)
    assert norm.residual is r and norm.sumsq is None
    with pytest.raises(RuntimeError, match="not been computed"):
        norm.residual_out
    out = reference(norm.run)
    assert reference(norm.run) is out   # computed once
    normed, s = reference(ref_add_rms_norm, y, r, nw, EPS)
    assert torch.equal(out, normed) and torch.equal(norm.residual_out, s)
    with pytest.raises(ValueError):
        DeferredNorm(pending, nw, EPS, r)
    from highspeed.ops.norm import residual_of

    with pytest.raises(TypeError):
        residual_of(y)


# ----------------------------------------------------------------------------------------------------------------
# HIGHSPEED_FOLD_NORM=self: producers add the residual and store no sums; consumers take them from the row
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture
def fold_self(monkeypatch):
    """FOLD_NORM=self, and a DeferredNorm.run that counts its calls (none should happen: the consumers fold)."""
    import highspeed.ops.norm as norm_ops

    monkeypatch.setattr(norm_ops, "FOLD_SELF", True)
    calls: list[int] = []
    run = DeferredNorm.run
    monkeypatch.setattr(DeferredNorm, "run", lambda self: calls.append(1) or run(self))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,K,bias", [(20, 40, False), (7, 37, True), (5, 300, True)])
def test_gemv_fold_self(triton_module, reference, monkeypatch, fold_self, dtype, N, K, bias):
    """The GEMV producer adds the residual and hands on no sums; the next whole-row GEMV normalises the row by its
    own sum of squares, with no norm launch."""
    lin = triton_module("linear")
    small_gemv_tiles(lin, monkeypatch, False, whole=True)
    rs, ref_s, nw = _gemv_producer(lin, reference, dtype, K, bias)
    assert rs.residual is None and rs.sumsq is None
    assert rel_err(rs.x, ref_s) < REF_TOL[dtype]
    w = (torch.randn(N, K, device=DEVICE) / K**0.5).to(dtype)
    norm = DeferredNorm(rs, nw, EPS)
    y = lin.linear(norm, w)
    ref = F.linear(reference(ref_rms_norm, rs.x, nw, EPS).double(), w.double())
    assert rel_err(y, ref) < REF_TOL[dtype], rel_err(y, ref)
    assert not fold_self and norm.residual_out is rs.x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", FUSED_CASES)
def test_fused_moe_fold_self(triton_module, reference, monkeypatch, fold_self, case, dtype):
    """Router and gate/up normalise the row by its own sum of squares (no sums from the producer, no norm launch),
    and the down kernel adds the residual and hands on no sums either."""
    T, H = case[0], case[2]
    from highspeed.ops.moe import fused_moe as ref_fused_moe

    moe = triton_module("moe")
    _moe_tiles(moe, monkeypatch, T, True)
    s, r2, nw = _inputs((T, H), dtype)
    rest = _moe_case(case, dtype)
    norm = DeferredNorm(ResidualSum(s, None, None), nw, EPS)
    out = moe.fused_moe(norm, *rest, r2)
    assert not fold_self
    assert out.residual is None and out.sumsq is None
    block = reference(ref_fused_moe, reference(ref_rms_norm, s, nw, EPS), *rest)
    assert rel_err(out.x, block + r2) < REF_TOL[dtype], rel_err(out.x, block + r2)
    # The kernels really normalise: the row scaled by 3 gives the same block (RMSNorm is scale-invariant).
    out3 = moe.fused_moe(DeferredNorm(ResidualSum((s.float() * 3).to(dtype), None, None), nw, EPS), *rest, r2)
    assert rel_err(out3.x, block + r2) < REF_TOL[dtype] + 1e-3, rel_err(out3.x, block + r2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,K", [(20, 40), (7, 37), (5, 300)])
def test_gemv_add_norm(triton_module, reference, monkeypatch, dtype, N, K):
    """A residual norm with its add still pending (a decoder layer's input norm) folded into the whole-row GEMV
    that reads it (HIGHSPEED_GEMV_ADD_NORM): each program adds the residual, normalises the sum by its own rms, and
    program 0 stores the sum as the norm's residual stream. No norm runs; the product and the residual stream are
    those of the norm launch (add_rms_norm) followed by the GEMV."""
    lin = triton_module("linear")
    small_gemv_tiles(lin, monkeypatch, False, whole=True)
    x, r, nw = _inputs((1, K), dtype)
    w = (torch.randn(N, K, device=DEVICE) / K**0.5).to(dtype)
    normed, s_ref = reference(ref_add_rms_norm, x, r, nw, EPS)
    ref = F.linear(normed.double(), w.double())

    calls = []
    real_run = DeferredNorm.run
    monkeypatch.setattr(DeferredNorm, "run", lambda self: calls.append(1) or real_run(self))
    monkeypatch.setattr(lin, "ADD_NORM", True)
    norm = DeferredNorm(x, nw, EPS, residual=r)
    y = lin.linear(norm, w)
    assert y.shape == (1, N) and y.dtype == dtype
    assert rel_err(y, ref) < REF_TOL[dtype], rel_err(y, ref)
    assert not calls
    # The residual stream: x + r rounded once to the dtype, as the norm launch stores it (exactly, but for the
    # interpreter's truncating bf16 cast on the CPU).
    s = norm.residual_out
    assert s.shape == x.shape and s.dtype == dtype
    if HAS_CUDA or dtype == torch.float32:
        assert torch.equal(s, s_ref)
    else:
        assert rel_err(s, s_ref) < REF_TOL[dtype]
    # Normalised by the sum's rms, not x's: the residual doubled changes the product.
    y2 = lin.linear(DeferredNorm(x, nw, EPS, residual=(r.float() * 2).to(dtype)), w)
    assert rel_err(y2, ref) > 0.1
    # Off, or once the norm has run, the norm launch's output is read.
    monkeypatch.setattr(lin, "ADD_NORM", False)
    norm_off = DeferredNorm(x, nw, EPS, residual=r)
    y_off = lin.linear(norm_off, w)
    assert len(calls) == 1 and rel_err(y_off, ref) < REF_TOL[dtype]
    monkeypatch.setattr(lin, "ADD_NORM", True)
    calls.clear()
    assert torch.equal(lin.linear(norm_off, w), y_off) and len(calls) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", [c for c in FUSED_CASES if c[0] == 1])
def test_fused_moe_router_add_norm(triton_module, reference, monkeypatch, case, dtype):
    """The post-attention norm with its residual add pending, done by the router (HIGHSPEED_ROUTER_ADD_NORM): no
    norm launch; the block's output and the residual stream are those of add_rms_norm followed by the block, and
    gate/up really reads the normalised row the router's program 0 stored."""
    from highspeed.ops.moe import fused_moe as ref_fused_moe

    moe = triton_module("moe")
    _moe_tiles(moe, monkeypatch, 1)
    monkeypatch.setattr(moe, "ROUTER_ADD_NORM", True)
    H = case[2]
    y, r, nw = _inputs((1, H), dtype)
    rest = _moe_case(case, dtype)
    calls = []
    real_run = DeferredNorm.run
    monkeypatch.setattr(DeferredNorm, "run", lambda self: calls.append(1) or real_run(self))
    norm = DeferredNorm(ResidualSum(y, r), nw, EPS)
    out = moe.fused_moe(norm, *rest)
    assert not calls and isinstance(out, torch.Tensor)
    normed, s = reference(ref_add_rms_norm, y, r, nw, EPS)
    s_got = norm.residual_out
    assert torch.equal(s_got, s) if HAS_CUDA or dtype == torch.float32 else rel_err(s_got, s) < REF_TOL[dtype]
    block = reference(ref_fused_moe, normed, *rest)
    assert rel_err(out, block) < REF_TOL[dtype], rel_err(out, block)
    # The residual doubled changes the answer (the add is not skipped).
    out2 = moe.fused_moe(DeferredNorm(ResidualSum(y, (r.float() * 2).to(dtype)), nw, EPS), *rest)
    assert rel_err(out2, block) > 10 * REF_TOL[dtype]
    # Off: the norm launch runs first; the same values.
    monkeypatch.setattr(moe, "ROUTER_ADD_NORM", False)
    out3 = moe.fused_moe(DeferredNorm(ResidualSum(y, r), nw, EPS), *rest)
    assert len(calls) == 1 and rel_err(out3, block) < REF_TOL[dtype]


def test_addable_norm_bounds(triton_module):
    """The add-norm folds (qkv GEMV, router) take one pending-residual row of at most ADD_NORM_MAX_K elements:
    wider rows spilled registers on the H200 (run 71), and several rows are not the batch-1 decode path."""
    norm_kernels = triton_module("norm")
    K = norm_kernels.ADD_NORM_MAX_K
    for shape, want in (((1, K), True), ((1, K + 1), False), ((2, K), False)):
        x, r, nw = _inputs(shape, torch.bfloat16)
        assert norm_kernels.addable_norm(DeferredNorm(x, nw, EPS, residual=r), x) is want, shape
    x, r, nw = _inputs((1, 64), torch.bfloat16)
    assert not norm_kernels.addable_norm(DeferredNorm(x, nw, EPS), x)    # no residual: SELF_NORM's case
    ran = DeferredNorm(x, nw, EPS, residual=r)
    ran.run()
    assert not norm_kernels.addable_norm(ran, x)                         # already computed: read as it is
