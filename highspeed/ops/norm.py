"""RMSNorm reference (HF semantics: normalise in fp32, cast back to the input dtype, then scale); ``DeferredNorm``:
an RMSNorm handed to the op that consumes its output, so that op can fuse it; ``ResidualSum``: the residual
stream as an op that added it in its epilogue hands it on."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from highspeed.ops.dispatch import triton_kernel


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x / sqrt(mean(x^2) + eps))`` over the last dim."""
    kernel = triton_kernel("norm", "rms_norm", x)
    if kernel is not None:
        return kernel(x, weight, eps)
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add then RMSNorm: returns ``(rms_norm(x + residual), x + residual)``."""
    kernel = triton_kernel("norm", "add_rms_norm", x)
    if kernel is not None:
        return kernel(x, residual, weight, eps)
    s = x + residual
    return rms_norm(s, weight, eps), s


# Whether the decode producers of the residual stream (the batch-1 GEMV, the fused MoE's down kernel) add the
# residual in their epilogue and hand the next RMSNorm the sums of squares of the rows they write
# (``ResidualSum.sumsq``), so that its consumers fold the norm into their own kernels (``DeferredNorm``). Off
# unless HIGHSPEED_FOLD_NORM=1: measured slower on the H200 (runs 8b/8c, batch-1 graph replay): Qwen3-30B-A3B
# 2.55-2.60 ms folded against 2.47-2.48 ms with the norm launches, GLM-4.7-Flash 3.27-3.45 against 3.23-3.24 ms.
# Under PDL the norm launch costs little: the next GEMV's weights are still streaming in while it runs. Re-measured
# in run 40 (Qwen3 2.377 against 2.220 ms, GLM-4.7-Flash 2.935-2.942 against 2.907): each consumer program of the
# qkv GEMV reads all of the producer's partial sums (1024 from the down kernel), so the fold lengthened it.
# HIGHSPEED_FOLD_NORM=self (FOLD_SELF): the producers add the residual, store no sums, and the consumers -- whole-row
# GEMVs, the MoE router and gate/up, which load the whole row anyway -- take its sum of squares themselves, as
# q_b_proj does for q_a_layernorm (linear.SELF_NORM). Measured (H200, batch 1): Qwen3 2.352 against 2.224 ms (run
# 43: down and the GEMVs slower by more than the norm launches cost), GLM-4.7-Flash 0.2-0.4% faster (runs 43, 45);
# off. Off (0), the residual add stays with the norm launch (``add_rms_norm``), exactly as before the fold existed.
_FOLD = os.environ.get("HIGHSPEED_FOLD_NORM", "0")
FOLD_NORM: bool = _FOLD in ("1", "self")
FOLD_SELF: bool = _FOLD == "self"


@dataclass
class ResidualSum:
    """The residual stream after a block: ``x + residual`` (``x`` alone when ``residual`` is None, i.e. the op
    that produced ``x`` added it already, in its epilogue). ``sumsq`` [T, P] fp32, when the producing kernel
    wrote it: per-program partial sums of squares of each row of ``x`` (they add up to the row's sum of squares),
    which is all the next RMSNorm needs of the row to be folded into its consumer."""

    x: torch.Tensor
    residual: torch.Tensor | None = None
    sumsq: torch.Tensor | None = None

    def value(self) -> torch.Tensor:
        return self.x if self.residual is None else self.x + self.residual


class DeferredNorm:
    """``rms_norm(x + residual, weight, eps)`` (``rms_norm(x, ...)`` without a residual), not computed yet.

    Ops that take one in place of their input (``linear``, ``fused_moe``) call ``run()``, which is exactly the
    unfused norm (one ``add_rms_norm`` or ``rms_norm`` launch), or, when ``sumsq`` is known (the producer of ``x``
    wrote its rows' sums of squares, see ``ResidualSum``), normalise ``x`` inside their own first kernel at
    batch-1 decode on CUDA: a launch fewer per norm. Any other reader calls ``materialize``.
    Whoever computes it sets ``residual_out`` to ``x + residual`` (``x`` itself without a residual): the residual
    stream the decoder layer carries on."""

    def __init__(self, x: torch.Tensor | ResidualSum, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None):
        self.sumsq: torch.Tensor | None = None
        if isinstance(x, ResidualSum):
            if residual is not None:
                raise ValueError("a ResidualSum carries its own residual")
            x, residual, self.sumsq = x.x, x.residual, x.sumsq
        self.x, self.weight, self.eps, self.residual = x, weight, eps, residual
        self._residual_out = x if residual is None else None
        self._out: torch.Tensor | None = None

    @property
    def residual_out(self) -> torch.Tensor:
        if self._residual_out is None:
            raise RuntimeError("the deferred norm has not been computed: pass it to an op or call materialize()")
        return self._residual_out

    def set_residual_out(self, s: torch.Tensor) -> None:
        """For a kernel that added the pending residual itself (and normalised in its own registers): the sum."""
        if self._residual_out is not None:
            raise RuntimeError("the residual stream of this norm is already known")
        self._residual_out = s

    def needs_grad(self) -> bool:
        """Whether autograd must see the norm (then the fused kernels, which it cannot see through, stay out)."""
        return torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (self.x, self.residual, self.weight))

    def run(self) -> torch.Tensor:
        """The normalised tensor, computed once by the ordinary norm ops."""
        if self._out is None:
            if self.residual is None:
                self._out = rms_norm(self.x, self.weight, self.eps)
            else:
                self._out, self._residual_out = add_rms_norm(self.x, self.residual, self.weight, self.eps)
        return self._out


def materialize(x: torch.Tensor | DeferredNorm) -> torch.Tensor:
    """``x`` itself, or a deferred norm's output."""
    return x.run() if isinstance(x, DeferredNorm) else x


def unnormed(x: torch.Tensor | DeferredNorm) -> torch.Tensor:
    """The tensor an input is computed from (``x`` of a deferred norm): its device and shape are the input's."""
    return x.x if isinstance(x, DeferredNorm) else x


def residual_of(x: DeferredNorm) -> torch.Tensor:
    """The residual stream a block's output is added to: its input norm's ``residual_out`` (the norm runs first
    if its residual add is still pending)."""
    if not isinstance(x, DeferredNorm):
        raise TypeError("the residual stream of a block comes from its input norm (a DeferredNorm)")
    if x._residual_out is None:
        x.run()
    return x.residual_out
