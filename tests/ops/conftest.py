"""Shared setup for the Triton kernel tests in tests/ops.

Without a CUDA device the kernels run in Triton's interpreter on the CPU. The interpreter is chosen when a kernel
is *decorated* (at import), so TRITON_INTERPRET is set here, before any test module of this folder imports a
kernel module, and ``triton_module`` re-imports a module that some other test imported before that.
"""
from __future__ import annotations

import importlib
import os
from contextlib import contextmanager
from types import ModuleType
from typing import Any, Callable, Iterator

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if HAS_CUDA else "cpu"


def _interpreted(mod: ModuleType) -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    kernels = [v for v in vars(mod).values() if type(v).__name__ in ("JITFunction", "InterpretedFunction")]
    return all(isinstance(v, InterpretedFunction) for v in kernels)


@pytest.fixture(scope="session")
def triton_module() -> Callable[[str], ModuleType]:
    """``triton_module("moe")`` -> highspeed.ops.triton.moe, runnable on this machine (skips without triton)."""
    pytest.importorskip("triton")

    def load(name: str) -> ModuleType:
        mod = importlib.import_module(f"highspeed.ops.triton.{name}")
        if not HAS_CUDA and not _interpreted(mod):
            mod = importlib.reload(mod)
        return mod

    return load


@contextmanager
def _torch_reference() -> Iterator[None]:
    old = os.environ.get("HIGHSPEED_DISABLE_TRITON")
    os.environ["HIGHSPEED_DISABLE_TRITON"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["HIGHSPEED_DISABLE_TRITON"]
        else:
            os.environ["HIGHSPEED_DISABLE_TRITON"] = old


@pytest.fixture(scope="session")
def reference() -> Callable[..., Any]:
    """``reference(fn, *args)`` runs a highspeed.ops reference with the Triton dispatch turned off (on CUDA the
    references would otherwise call the very kernels under test)."""

    def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with _torch_reference():
            return fn(*args, **kwargs)

    return call


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere counts as failure (returns inf)."""
    o, r = out.double(), ref.double()
    if not torch.isfinite(o).all():
        return float("inf")
    return float((o - r).norm() / r.norm().clamp_min(1e-30))


# Tolerances on rel_err by dtype: fp32 kernels land far under 1e-4 (TF32 dots aside); bf16 within 1e-2.
TOL = {torch.float32: 5e-3 if HAS_CUDA else 1e-5, torch.float16: 5e-3, torch.bfloat16: 1.5e-2}
