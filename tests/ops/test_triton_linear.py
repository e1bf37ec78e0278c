"""Triton batch-1 GEMV (highspeed.ops.triton.linear) against F.linear."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.ops.conftest import DEVICE, HAS_CUDA, TOL, rel_err


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(7)


def small_gemv_tiles(lin, monkeypatch, prefetch: bool, whole: bool = False) -> None:
    """Under the interpreter: small tiles (several programs and K steps, partial tiles); on CUDA the shipped
    launch shapes, with or without the double-buffered weight tiles. ``whole``: the whole-row preload instead
    (under the interpreter with ~64-element programs, so several rows, programs and a K1 + K2 split occur)."""
    monkeypatch.setattr(lin, "WHOLE_ROWS", whole)
    if whole and not HAS_CUDA:
        monkeypatch.setattr(lin, "GEMV_WHOLE", {**lin.GEMV_WHOLE, "ELEMS": 64})
    if not HAS_CUDA:
        cfg = dict(BLOCK_N=4, BLOCK_K=16, num_warps=4, PREFETCH=prefetch)
        monkeypatch.setattr(lin, "GEMV_ROW", cfg)
        monkeypatch.setattr(lin, "GEMV_ROW_NARROW", {**cfg, "BLOCK_N": 2, "BLOCK_K": 32})
        monkeypatch.setattr(lin, "NARROW_N", 32)
    else:
        monkeypatch.setattr(lin, "GEMV_ROW", {**lin.GEMV_ROW, "PREFETCH": prefetch})
        monkeypatch.setattr(lin, "GEMV_ROW_NARROW", {**lin.GEMV_ROW_NARROW, "PREFETCH": prefetch})


@pytest.mark.parametrize("prefetch,whole", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,K,bias", [(20, 40, False), (7, 37, True), (33, 48, False), (5, 300, True), (64, 16, True)])
def test_linear_row_gemv(triton_module, monkeypatch, prefetch, whole, dtype, N, K, bias):
    lin = triton_module("linear")
    small_gemv_tiles(lin, monkeypatch, prefetch, whole)
    x = torch.randn(1, K, device=DEVICE).to(dtype)
    w = (torch.randn(N, K, device=DEVICE) / K**0.5).to(dtype)
    b = torch.randn(N, device=DEVICE).to(dtype) if bias else None
    assert lin.use_gemv(1, N, K, w)
    y = lin.linear(x, w, b)
    ref = F.linear(x.double(), w.double(), b.double() if bias else None)
    assert y.shape == (1, N) and y.dtype == dtype
    assert rel_err(y, ref) < TOL[dtype], rel_err(y, ref)


@pytest.mark.parametrize("N,K", [(5, 5120), (3, 4100)])
def test_linear_wide_rows(triton_module, monkeypatch, N, K):
    """Rows longer than WIDE_K (GLM-4.7-Flash's o_proj, K = 5120) take the wide shape -- two rows per program
    with the shipped knobs, odd row counts leaving a half-masked program -- and still give F.linear's result."""
    lin = triton_module("linear")
    monkeypatch.setattr(lin, "WHOLE_ROWS", True)
    assert K > lin.GEMV_WHOLE["WIDE_K"] and lin.whole_rows(K) and lin.whole_block_n(K, 2048) == 2
    x = torch.randn(1, K, device=DEVICE).to(torch.bfloat16)
    w = (torch.randn(N, K, device=DEVICE) / K**0.5).to(torch.bfloat16)
    y = lin.linear(x, w)
    ref = F.linear(x.double(), w.double())
    assert y.shape == (1, N) and rel_err(y, ref) < TOL[torch.bfloat16], rel_err(y, ref)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="model-sized GEMVs: too slow for the interpreter")
@pytest.mark.parametrize("N,K", [(2048, 5120), (2047, 5120), (5120, 2048), (1344, 2048), (2048, 4096), (5120, 768)])
def test_linear_model_shapes(triton_module, N, K):
    """The shipped launch shapes at the projection shapes of Qwen3-30B-A3B and GLM-4.7-Flash (and an odd N)."""
    lin = triton_module("linear")
    x = torch.randn(1, K, device=DEVICE).to(torch.bfloat16)
    w = (torch.randn(N, K, device=DEVICE) / K**0.5).to(torch.bfloat16)
    y = lin.linear(x, w)
    ref = F.linear(x.double(), w.double())
    assert rel_err(y, ref) < TOL[torch.bfloat16], rel_err(y, ref)


def test_whole_row_split():
    """K1 + K2 covers K with two power-of-two tiles; rows per program keep the tile near ELEMS elements."""
    from highspeed.ops.triton import linear as lin   # host-side helpers only: no kernel runs here

    for K in (1, 2, 3, 37, 300, 576, 768, 2048, 4096, 5120, 7168):
        k1, k2 = lin.whole_split(K)
        assert k1 & (k1 - 1) == 0 and (k2 == 0 or k2 & (k2 - 1) == 0)
        assert k1 <= K <= k1 + k2 + (K if k2 == 0 else 0) and (k2 == 0) == (k1 == K) and k2 <= k1
    # GLM-4.7-Flash's o_proj (K = 5120) is a wide row: two rows per program, not one (x read half as often).
    assert [lin.whole_block_n(K, 1 << 20) for K in (2048, 4096, 5120, 768)] == [8, 4, 2, 16]
    assert {lin.whole_warps(K) for K in (768, 5120)} == {lin.GEMV_WHOLE["num_warps"]}


def test_whole_rows_wide_shape(monkeypatch):
    """Rows longer than WIDE_K take WIDE_ELEMS / WIDE_WARPS; shorter ones keep ELEMS / num_warps."""
    from highspeed.ops.triton import linear as lin

    monkeypatch.setattr(lin, "GEMV_WHOLE", {**lin.GEMV_WHOLE, "WIDE_K": 4096, "WIDE_ELEMS": 20480, "WIDE_WARPS": 8})
    assert [lin.whole_block_n(K, 1 << 20) for K in (2048, 4096, 5120, 7168)] == [8, 4, 4, 2]
    assert [lin.whole_warps(K) for K in (4096, 5120)] == [lin.GEMV_WHOLE["num_warps"], 8]


def test_whole_rows_min_programs(monkeypatch):
    """MIN_PROGRAMS halves the rows per program (not below one) until the grid has that many programs; 0 is off.
    GLM-4.7-Flash's q_a + kv_a (1344 rows of 2048) and q_b (5120 rows of 768); Qwen3-30B-A3B's qkv and o_proj keep
    theirs by default."""
    from highspeed.ops.triton import linear as lin

    assert [lin.whole_block_n(K, N) for K, N in ((2048, 5120), (4096, 2048))] == [8, 4]
    for floor, want in ((0, [8, 16]), (512, [2, 8]), (1024, [1, 4]), (4096, [1, 1])):
        monkeypatch.setattr(lin, "GEMV_WHOLE", {**lin.GEMV_WHOLE, "MIN_PROGRAMS": floor})
        assert [lin.whole_block_n(K, N) for K, N in ((2048, 1344), (768, 5120))] == want, floor


def test_linear_shapes_and_fallback(triton_module, monkeypatch):
    """Leading dims are kept; more than one row, or a weight over MAX_WEIGHT_BYTES (when set), takes F.linear."""
    lin = triton_module("linear")
    monkeypatch.setattr(lin, "MAX_WEIGHT_BYTES", 64 * 2**20)
    x = torch.randn(1, 1, 24, device=DEVICE)
    w = torch.randn(8, 24, device=DEVICE)
    assert lin.linear(x, w).shape == (1, 1, 8)
    two = torch.randn(2, 24, device=DEVICE)
    assert not lin.use_gemv(2, 8, 24, w)
    assert torch.equal(lin.linear(two, w), F.linear(two, w))
    big = torch.empty(lin.MAX_WEIGHT_BYTES // 4 + 1, device="meta").view(1, -1)
    assert not lin.use_gemv(1, 1, big.shape[1], big)
    monkeypatch.setattr(lin, "MAX_WEIGHT_BYTES", None)    # the default: any size (the lm_head too)
    assert lin.use_gemv(1, 1, big.shape[1], big) and not lin.use_gemv(2, 1, big.shape[1], big)


def test_tuned_launch_shapes(monkeypatch):
    """HIGHSPEED_TUNE_<NAME> overrides a launch shape's keys (ints, bools); an unknown key is an error."""
    pytest.importorskip("triton")
    from highspeed.ops.triton import tuned

    base = dict(BLOCK_N=4, BLOCK_K=256, PREFETCH=False)
    assert tuned("X_TEST", base) is base
    monkeypatch.setenv("HIGHSPEED_TUNE_X_TEST", "BLOCK_K=128, PREFETCH=1")
    assert tuned("X_TEST", base) == dict(BLOCK_N=4, BLOCK_K=128, PREFETCH=True) and base["BLOCK_K"] == 256
    monkeypatch.setenv("HIGHSPEED_TUNE_X_TEST", "BLOCKK=128")
    with pytest.raises(ValueError, match="BLOCKK"):
        tuned("X_TEST", base)
