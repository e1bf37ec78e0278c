"""Choose between a Triton kernel and the torch reference, per call.

Each reference op in ``highspeed/ops/<file>.py`` asks ``triton_kernel(<file>, <function>, x)`` first. The kernel is
``highspeed.ops.triton.<file>.<function>`` with the same signature as the reference. It is used only when the input
is on CUDA, the module imports and ``HIGHSPEED_DISABLE_TRITON`` is unset (or "0"); otherwise the reference runs,
so CPU always works and a missing or half-written kernel never breaks the model. A kernel that cannot handle a
case may simply call the reference itself.
"""
from __future__ import annotations

import importlib
import os
from typing import Callable

import torch

_KERNELS: dict[tuple[str, str], Callable | None] = {}


def triton_disabled() -> bool:
    return os.environ.get("HIGHSPEED_DISABLE_TRITON", "").strip().lower() not in ("", "0", "false", "no")


def triton_kernel(module: str, name: str, x: torch.Tensor) -> Callable | None:
    """The Triton implementation of ``name`` for input ``x``, or None to use the reference."""
    if not x.is_cuda or triton_disabled():
        return None
    key = (module, name)
    if key not in _KERNELS:
        try:
            _KERNELS[key] = getattr(importlib.import_module(f"highspeed.ops.triton.{module}"), name)
        except (ImportError, AttributeError):
            _KERNELS[key] = None
    return _KERNELS[key]
