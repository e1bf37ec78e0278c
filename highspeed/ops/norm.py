"""RMSNorm reference (HF semantics: normalise in fp32, cast back to the input dtype, then scale), and
``DeferredNorm``: an RMSNorm handed to the op that consumes its output, so that op can fuse it."""
from __future__ import annotations

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


class DeferredNorm:
    """``rms_norm(x + residual, weight, eps)`` (``rms_norm(x, ...)`` without a residual), not computed yet.

    Ops that take one in place of their input (``linear``, ``fused_moe``) call ``run()`` first, which is exactly
    the unfused norm, or, with ``HIGHSPEED_FUSE_NORM=1``, compute it inside their own first kernel at batch-1
    decode on CUDA (it saves a launch of mostly fixed latency, but measured slower end to end on the H200:
    ``ops/triton/norm.py``). Any other reader calls ``materialize``.
    Whoever computes it sets ``residual_out`` to ``x + residual`` (``x`` itself without a residual): the residual
    stream the decoder layer carries on."""

    def __init__(self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
        self.x, self.weight, self.eps, self.residual = x, weight, eps, residual
        self._residual_out = x if residual is None else None
        self._out: torch.Tensor | None = None

    @property
    def residual_out(self) -> torch.Tensor:
        if self._residual_out is None:
            raise RuntimeError("the deferred norm has not been computed: pass it to an op or call materialize()")
        return self._residual_out

    def set_residual_out(self, s: torch.Tensor) -> None:
        """For a kernel that computed ``x + residual`` itself."""
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
