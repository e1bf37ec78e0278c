"""Registers, spills and shared memory of the batch-1 decode kernels at real model shapes (GPU only).

Residency decides how much of the next kernel can start under PDL while this one runs: a kernel whose programs
fill the register file leaves no room for the next one's weight loads. Run: ``python3 benchmarks/kernel_regs.py``
(it honours the HIGHSPEED_TUNE_* launch-shape overrides, so variants can be compared)."""
from __future__ import annotations

import json
import sys

import torch

from offline_compile import SHAPES  # the same model shapes as the offline compile (a sibling script)


def compiled_kernels(module) -> list[dict]:
    out = []
    for name, fn in vars(module).items():
        caches = getattr(fn, "device_caches", None)
        if not isinstance(caches, dict):
            continue
        for entry in caches.values():
            cache = entry[0] if isinstance(entry, tuple) else entry
            for kernel in cache.values():
                meta = getattr(kernel, "metadata", None)
                out.append(dict(kernel=name, n_regs=getattr(kernel, "n_regs", None),
                                n_spills=getattr(kernel, "n_spills", None),
                                num_warps=getattr(meta, "num_warps", None), shared=getattr(meta, "shared", None)))
    return out


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("kernel_regs.py needs a CUDA device")
    from highspeed.ops.norm import DeferredNorm, ResidualSum
    from highspeed.ops.triton import linear as lin
    from highspeed.ops.triton import moe

    dev, dt = "cuda", torch.bfloat16
    props = torch.cuda.get_device_properties(0)
    report = {"device": props.name, "regs_per_sm": getattr(props, "regs_per_multiprocessor", 65536), "shapes": {}}
    for name, (H, E, I, k, S, qkv, o_in) in SHAPES.items():
        torch.manual_seed(0)
        x = torch.randn(1, H, device=dev, dtype=dt)
        r = torch.randn(1, H, device=dev, dtype=dt)
        nw = torch.ones(H, device=dev, dtype=dt)
        w13 = torch.randn(E, 2 * I, H, device=dev, dtype=dt) / H**0.5
        w2 = torch.randn(E, H, I, device=dev, dtype=dt) / I**0.5
        gate = torch.randn(E, H, device=dev)
        ws13 = torch.randn(2 * S, H, device=dev, dtype=dt) / H**0.5 if S else None
        ws2 = torch.randn(H, S, device=dev, dtype=dt) / S**0.5 if S else None
        a = torch.randn(1, o_in, device=dev, dtype=dt)
        w_o = torch.randn(H, o_in, device=dev, dtype=dt) / o_in**0.5
        s = lin.linear(a, w_o, None, r)                                           # o_proj + residual
        moe.fused_moe(DeferredNorm(s, nw, 1e-6), gate, w13, w2, k, residual=r,    # the MoE block
                      shared_w13=ws13, shared_w2=ws2)
        if qkv:
            lin.linear(DeferredNorm(ResidualSum(x, None, torch.ones(1, 4, device=dev)), nw, 1e-6),
                       torch.randn(qkv, H, device=dev, dtype=dt))
        torch.cuda.synchronize()
        report["shapes"][name] = compiled_kernels(lin) + compiled_kernels(moe)
        for mod in (lin, moe):   # next shape compiles afresh: report each shape's kernels once
            for fn in vars(mod).values():
                if isinstance(getattr(fn, "device_caches", None), dict):
                    fn.device_caches.clear()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
