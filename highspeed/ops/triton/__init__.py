"""Triton kernels for the ops in ``highspeed.ops``; one module per fused op.

Each module exports functions with exactly the signatures of the torch references in ``highspeed/ops/<name>.py``;
the dispatch there calls them for CUDA tensors. Importing this package without Triton raises ``ImportError``
(and nothing else), so the dispatch can fall back to the references on machines without it.
"""
from __future__ import annotations

try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only where triton is absent
    raise ImportError("highspeed.ops.triton needs the 'triton' package (pip install triton)") from exc


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (Triton block shapes must be powers of two)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (CPU tests). The interpreter's tl.dot is wrong for bf16 operands
    (Triton 3.9: it returns garbage), so kernels upcast dot operands to fp32 there; on GPUs they stay bf16.
    Kernels also take that fp32 branch, with IEEE precision (not TF32), when the operands are fp32: the fp32 fast
    path must give the torch path's greedy tokens."""
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
