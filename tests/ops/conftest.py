"""Shared setup for the Triton kernel tests in tests/ops.

Without a CUDA device the kernels run in Triton's interpreter on the CPU. The interpreter is chosen when a
function is *decorated* with ``triton.jit`` (at import), and that includes Triton's own library (``tl.zeros``,
``tl.cumsum``, ...). So TRITON_INTERPRET is set here, and if some test collected earlier already imported Triton
without it (e.g. ``pytest.importorskip("triton")``), ``triton_module`` drops Triton and the kernel modules from
``sys.modules`` once and imports them again in interpreter mode.
"""
from __future__ import annotations

import importlib
import os
import sys
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


def _fresh_interpreted_triton() -> None:
    """Re-import Triton in interpreter mode if it was imported (decorated) before TRITON_INTERPRET was set."""
    if HAS_CUDA or "triton" not in sys.modules:
        return
    import triton.language as tl

    if type(tl.zeros).__name__ == "InterpretedFunction":
        return
    for name in list(sys.modules):
        # The native extension (triton._C) stays: initialising it twice aborts the process.
        if name.startswith("triton._C"):
            continue
        if name == "triton" or name.startswith("triton.") or name.startswith("highspeed.ops.triton"):
            del sys.modules[name]


@pytest.fixture(scope="session")
def triton_module() -> Callable[[str], ModuleType]:
    """``triton_module("moe")`` -> highspeed.ops.triton.moe, runnable on this machine (skips without triton)."""
    _fresh_interpreted_triton()
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
