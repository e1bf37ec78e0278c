"""The programmatic-dependent-launch contract (``highspeed.ops.triton.pdl``), checked on every kernel's source:
a kernel that takes ``PDL`` must wait (``gdc_wait()``) before its first store, atomic, early return or read of an
activation pointer it was given, and every launch that passes ``**pdl(...)`` must target such a kernel. A kernel
that broke this would race with its predecessor only on a Hopper GPU, where no CPU test could see it."""
from __future__ import annotations

import ast
import pathlib

import pytest

KERNEL_DIR = pathlib.Path(__file__).resolve().parents[2] / "highspeed" / "ops" / "triton"
# Pointers a kernel may read before its wait: weights and other parameters that no kernel of the decode chain
# writes (each kernel's prefetch is listed here on purpose, so adding one is a visible decision).
PARAM_POINTERS = {"w_ptr", "w_rows", "w_gate", "w_up", "s_rows"}


def _kernels() -> list[tuple[str, ast.FunctionDef]]:
    out = []
    for path in sorted(KERNEL_DIR.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and any(
                    ast.unparse(d).startswith("triton.jit") for d in node.decorator_list):
                out.append((path.name, node))
    return out


PDL_KERNELS = [(f, k) for f, k in _kernels() if any(a.arg == "PDL" for a in k.args.args)]


def test_kernels_with_pdl_exist():
    names = {k.name for _, k in PDL_KERNELS}
    assert {"_router_kernel", "_fused_gate_up_kernel", "_fused_down_kernel", "_gemv_row_kernel", "_rms_norm_kernel",
            "_rope_write_kernel", "_paged_attn_kernel", "_combine_kernel"} <= names


@pytest.mark.parametrize("fname,kernel", PDL_KERNELS, ids=[k.name for _, k in PDL_KERNELS])
def test_pdl_kernel_waits_first(fname, kernel):
    """Walk the kernel's statements in order until the wait; nothing before it may store, return, use atomics or
    load (or prefetch into L2, or preload whole rows with ``whole_rows_load``) through a pointer other than the
    listed parameter pointers."""
    waited = False
    for stmt in kernel.body:
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
            continue   # the docstring
        src = ast.unparse(stmt)
        if "gdc_wait()" in src:
            waited = True
            break
        assert "tl.store(" not in src and "atomic" not in src and "return" not in src, (fname, kernel.name, src)
        for call in [n for n in ast.walk(stmt) if isinstance(n, ast.Call)
                     and ast.unparse(n.func) in ("tl.load", "prefetch_l2", "whole_rows_load")]:
            base = ast.unparse(call.args[0]).split("+")[0].strip().split("[")[0]
            assert base in PARAM_POINTERS, f"{fname}:{kernel.name} loads {base!r} before gdc_wait()"
    assert waited, f"{fname}:{kernel.name} takes PDL but never calls gdc_wait()"


def test_pdl_launches_target_pdl_kernels():
    with_pdl = {k.name for _, k in PDL_KERNELS}
    for path in sorted(KERNEL_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and any(
                    isinstance(kw.value, ast.Call) and ast.unparse(kw.value.func) == "pdl" for kw in node.keywords
                    if kw.arg is None):
                target = ast.unparse(node.func).split("[")[0]
                assert target in with_pdl, f"{path.name}: {target} is launched with **pdl() but takes no PDL"
