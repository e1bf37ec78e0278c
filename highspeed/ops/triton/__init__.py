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


import os  # noqa: E402
from functools import lru_cache  # noqa: E402

import torch  # noqa: E402
import triton.language as tl  # noqa: E402

try:  # grid dependency control (programmatic dependent launch), Triton >= 3.4
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: F401
    _HAS_GDC = True
except ImportError:  # pragma: no cover - older Triton: the kernels' PDL branches are never compiled
    _HAS_GDC = False
    gdc_launch_dependents = gdc_wait = None


# The step's context -- lengths, block tables, positions, slots -- and the RoPE table are written by no kernel of a
# forward: host copies before it, and inside a CUDA graph the greedy tail writes them at the very end of the
# previous replay. So decode kernels may read them before their PDL wait (stores stay after it), and after the wait
# only the loads of the previous kernel's output remain on the critical path.
# H200, batch-1 decode chain, two passes each: decode attention (run 57) Qwen3-30B-A3B 2.121 / 2.120 ms per step
# against 2.166 / 2.168, GLM-4.7-Flash 2.809 / 2.810 against 2.826 / 2.826; the RoPE + latent-cache programs of
# GLM-4.7-Flash's fused absorb launch too (run 58) 2.798 / 2.794 against 2.814 / 2.813 (attention only).
# HIGHSPEED_EARLY_CTX = all (default) | attn (decode attention only) | 0 (neither).
_EARLY_CTX_ENV = os.environ.get("HIGHSPEED_EARLY_CTX", "all")
if _EARLY_CTX_ENV not in ("attn", "all", "0"):
    raise ValueError(f"HIGHSPEED_EARLY_CTX={_EARLY_CTX_ENV!r}: expected attn, all or 0")
EARLY_CTX_ATTN: bool = _EARLY_CTX_ENV in ("attn", "all")
EARLY_CTX_ROPE: bool = _EARLY_CTX_ENV == "all"


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (Triton block shapes must be powers of two)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def tuned(name: str, shape: dict) -> dict:
    """A kernel's launch shape ``shape`` with the overrides in ``HIGHSPEED_TUNE_<name>`` ("KEY=int,KEY=int"), for
    A/B runs of launch shapes inside the whole decode chain, where PDL overlap and residency decide what is fast
    (a kernel timed alone can rank shapes differently). Unknown keys are an error, so a typo cannot pass as a
    measured variant."""
    spec = os.environ.get(f"HIGHSPEED_TUNE_{name}", "").strip()
    if not spec:
        return shape
    out = dict(shape)
    for item in spec.split(","):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in out:
            raise ValueError(f"HIGHSPEED_TUNE_{name}: {key!r} is not one of {sorted(out)}")
        out[key] = value.strip().lower() in ("1", "true") if isinstance(out[key], bool) else int(value)
    return out


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (CPU tests). The interpreter's tl.dot is wrong for bf16 operands
    (Triton 3.9: it returns garbage), so kernels upcast dot operands to fp32 there; on GPUs they stay bf16.
    Kernels also take that fp32 branch, with IEEE precision (not TF32), when the operands are fp32: the fp32 fast
    path must give the torch path's greedy tokens."""
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@lru_cache(maxsize=8)
def _pdl_device(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl(x: torch.Tensor) -> dict:
    """Launch arguments for programmatic dependent launch (PDL, Hopper and newer): ``kernel[grid](..., **pdl(x))``.

    With PDL the next kernel of the decode chain is scheduled while this one still runs: its programs start,
    issue the loads that do not depend on the previous kernel (weights), and park in ``gdc_wait`` until the
    previous kernel has finished and its writes are visible. That hides the launch gap and the first DRAM round
    trip of each of the ~10 small kernels per layer (CUDA graphs keep the programmatic edges). The contract for
    every kernel taking ``PDL``: call ``gdc_launch_dependents()`` early and ``gdc_wait()`` before its first read of
    anything a previous kernel wrote and before its first store, and never return before the wait (a kernel that
    finishes without waiting would let the kernel after it run ahead of the one before).

    On by default; ``HIGHSPEED_PDL=0`` turns it off. H200 (torch 2.11, Triton 3.6, run 5): once the batch-1 GEMVs
    load their first weight tile before the wait, batch-1 decode went from 315 to 336 tok/s on Qwen3-30B-A3B
    (graph replay 2.81 -> 2.72 ms) and from 261 to 271 tok/s on GLM-4.7-Flash (3.67 -> 3.47 ms); before that
    change it measured within noise (3.23 vs 3.27 ms)."""
    on = (_HAS_GDC and x.is_cuda and not interpreting()
          and os.environ.get("HIGHSPEED_PDL", "1").strip().lower() not in ("0", "false", "no")
          and _pdl_device(x.device.index if x.device.index is not None else torch.cuda.current_device()))
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


def l2_prefetch(x: torch.Tensor) -> dict:
    """Launch constants for ``prefetch_l2``: ``{"L2_PREFETCH": bool, "LINE": elements per 128-byte line}``.

    With PDL a kernel's programs start while the previous kernel still runs; a kernel whose weights do not
    depend on that kernel (the projections, the router) asks L2 for all of them before its ``gdc_wait``, and the
    fused gate/up kernel, once it has routed, asks for the chosen experts' down rows. HBM then stays busy across
    the latency-bound kernels (attention, RoPE, norms) and across each kernel's ramp and tail, which is where batch-1
    decode lost a third of the copy bandwidth (KERNEL_NOTES.md). Measured on the H200 (runs 6b-6d, batch-1 graph
    replay) it did not pay: within 1.5% either way (Qwen3-30B-A3B 2.76 vs 2.72 ms without it in run 6c, 2.83 vs
    2.85 ms in run 6d; GLM-4.7-Flash 3.41-3.48 vs 3.40-3.49 ms), and 10% slower with the down-row prefetch. So it
    is off unless ``HIGHSPEED_L2_PREFETCH=1``, and never under the interpreter (inline PTX)."""
    on = (x.is_cuda and not interpreting()
          and os.environ.get("HIGHSPEED_L2_PREFETCH", "0").strip().lower() not in ("0", "false", "no", ""))
    # Weights streamed once are loaded evict-first, so they do not push out lines prefetched for the next kernel.
    return {"L2_PREFETCH": on, "LINE": max(1, 128 // x.element_size()), "W_EVICT": "evict_first" if on else ""}


@triton.jit
def prefetch_l2(ptrs):
    """Ask L2 for the 128-byte lines holding ``ptrs`` (a tensor of addresses, one per line wanted) and go on: no
    registers are held and nothing waits for the data. The caller clamps every address into its tensor."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def fence_gpu(dummy):
    """Make this thread's earlier global stores visible GPU-wide before anything after it (``fence.acq_rel.gpu``).
    ``dummy`` is any scalar (inline asm needs an operand). A kernel publishing data for its PDL dependent to read
    before that dependent's ``gdc_wait`` stores it, calls this, ``tl.debug_barrier()``, and only then
    ``gdc_launch_dependents()``: the trigger itself orders no memory."""
    tl.inline_asm_elementwise("fence.acq_rel.gpu;\n\tmov.u32 $0, 0;", "=r,r", [dummy], dtype=tl.int32,
                              is_pure=False, pack=1)
