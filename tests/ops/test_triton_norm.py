"""Triton RMSNorm kernels (highspeed.ops.triton.norm) against highspeed.ops.norm."""
from __future__ import annotations

import pytest
import torch

from highspeed.ops.norm import add_rms_norm as ref_add_rms_norm
from highspeed.ops.norm import rms_norm as ref_rms_norm
from tests.ops.conftest import DEVICE, HAS_CUDA, TOL, rel_err


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(99)


SHAPES = [(1, 16), (5, 33), (3, 4, 100), (2, 1000)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm(triton_module, reference, shape, dtype):
    norm = triton_module("norm")
    x = (torch.randn(shape, device=DEVICE) * 2 + 0.5).to(dtype)
    w = torch.randn(shape[-1], device=DEVICE).to(dtype)
    y = norm.rms_norm(x, w, 1e-6)
    ref = reference(ref_rms_norm, x, w, 1e-6)
    assert y.shape == x.shape and y.dtype == ref.dtype
    assert rel_err(y, ref) < (1e-6 if dtype == torch.float32 else 8e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_add_rms_norm(triton_module, reference, shape, dtype):
    norm = triton_module("norm")
    x = torch.randn(shape, device=DEVICE).to(dtype)
    r = torch.randn(shape, device=DEVICE).to(dtype)
    w = torch.randn(shape[-1], device=DEVICE).to(dtype)
    y, s = norm.add_rms_norm(x, r, w, 1e-5)
    y_ref, s_ref = reference(ref_add_rms_norm, x, r, w, 1e-5)
    if HAS_CUDA or dtype == torch.float32:
        assert torch.equal(s, s_ref)  # the residual sum is one rounding of x + r: exact
    else:
        # Triton 3.9's interpreter casts fp32 -> bf16 by truncation, not round-to-nearest as GPUs do.
        assert rel_err(s, s_ref) < 8e-3
    assert rel_err(y, y_ref) < (1e-6 if dtype == torch.float32 else 8e-3)


def test_rms_norm_strided_rows(triton_module, reference):
    norm = triton_module("norm")
    base = torch.randn(6, 80, device=DEVICE)
    x = base[:, 8:72]  # rows with a stride larger than their width
    w = torch.randn(64, device=DEVICE)
    assert rel_err(norm.rms_norm(x, w, 1e-6), reference(ref_rms_norm, x, w, 1e-6)) < TOL[torch.float32]
