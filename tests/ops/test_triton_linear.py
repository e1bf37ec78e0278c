"""Triton skinny GEMM (highspeed.ops.triton.linear) against F.linear."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.ops.conftest import DEVICE, HAS_CUDA, TOL, rel_err


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,N,K,bias", [(1, 20, 40, False), (1, 7, 37, True), (3, 17, 50, True), (16, 33, 48, False),
                                        (2, 5, 300, True)])
def test_linear_gemv(triton_module, monkeypatch, dtype, M, N, K, bias):
    lin = triton_module("linear")
    if not HAS_CUDA:  # small tiles: several programs and K steps, partial tiles, under the interpreter
        monkeypatch.setattr(lin, "GEMV", dict(BLOCK_N=16, BLOCK_K=32, num_warps=4, num_stages=1))
        monkeypatch.setattr(lin, "GEMV_ROW", dict(BLOCK_N=4, BLOCK_K=16, num_warps=4, PREFETCH=M % 2 == 1))
    assert lin.use_gemv(M, N, K, torch.empty(N, K))
    x = torch.randn(M, K, device=DEVICE).to(dtype)
    w = (torch.randn(N, K, device=DEVICE) / K**0.5).to(dtype)
    b = torch.randn(N, device=DEVICE).to(dtype) if bias else None
    y = lin.linear(x, w, b)
    ref = F.linear(x.double(), w.double(), b.double() if bias else None)
    assert y.shape == (M, N) and y.dtype == dtype
    assert rel_err(y, ref) < TOL[dtype], rel_err(y, ref)


def test_linear_shapes_and_fallback(triton_module):
    """Leading dims are kept; more rows than MAX_ROWS, or N >= K, take F.linear (same numbers either way)."""
    lin = triton_module("linear")
    x = torch.randn(2, 1, 24, device=DEVICE)
    w = torch.randn(8, 24, device=DEVICE)
    assert lin.linear(x, w).shape == (2, 1, 8)
    big = torch.randn(lin.MAX_ROWS + 1, 24, device=DEVICE)
    assert not lin.use_gemv(lin.MAX_ROWS + 1, 8, 24, w) and not lin.use_gemv(1, 24, 24, w)
    assert torch.equal(lin.linear(big, w), F.linear(big, w))


def test_row_kernel_all_shapes(triton_module, monkeypatch):
    """ROW_ALL_SHAPES sends N >= K at one row to the row kernel too."""
    lin = triton_module("linear")
    monkeypatch.setattr(lin, "ROW_ALL_SHAPES", True)
    if not HAS_CUDA:
        monkeypatch.setattr(lin, "GEMV_ROW", dict(BLOCK_N=4, BLOCK_K=16, num_warps=4, PREFETCH=True))
    x, w = torch.randn(1, 24, device=DEVICE), torch.randn(40, 24, device=DEVICE)
    assert lin.use_gemv(1, 40, 24, w) and not lin.use_gemv(2, 40, 24, w)
    assert rel_err(lin.linear(x, w), F.linear(x.double(), w.double())) < TOL[torch.float32]
