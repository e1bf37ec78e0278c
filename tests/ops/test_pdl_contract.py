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
# The step's context, which no kernel of a forward writes (highspeed.ops.triton.EARLY_CTX_*): decode attention and
# the RoPE + cache-write programs may read it before their wait, directly or through ``rope_context``.
CONTEXT_POINTERS = {"seq_lens_ptr", "bt_row", "pos_ptr", "slot_ptr", "cs_ptr"}


def _check_before_wait(where: str, stmt: ast.stmt) -> None:
    """A statement before the wait: no store, return or atomic; loads only of parameters or the step's context."""
    src = ast.unparse(stmt)
    assert "tl.store(" not in src and "atomic" not in src and "return" not in src, (where, src)
    for call in [n for n in ast.walk(stmt) if isinstance(n, ast.Call)]:
        name = ast.unparse(call.func)
        if name in ("tl.load", "prefetch_l2", "whole_rows_load"):
            base = ast.unparse(call.args[0]).split("+")[0].strip().split("[")[0]
            assert base in PARAM_POINTERS | CONTEXT_POINTERS, f"{where} loads {base!r} before gdc_wait()"
        elif name == "rope_context":
            assert {ast.unparse(a) for a in call.args[:3]} <= CONTEXT_POINTERS, (where, src)


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
        if "gdc_wait()" in ast.unparse(stmt):
            waited = True
            break
        _check_before_wait(f"{fname}:{kernel.name}", stmt)
    assert waited, f"{fname}:{kernel.name} takes PDL but never calls gdc_wait()"


@pytest.mark.parametrize("name,branch", [("_paged_attn_kernel", "DECODE"), ("_absorb_rope_kernel", "pid < n_absorb")])
def test_pdl_deferred_wait(name, branch):
    """Kernels whose wait sits inside a branch (decode attention with EARLY_CTX; the rope programs of the fused
    absorb launch): the branch's statements before its wait obey the same rule."""
    kernel = {k.name: k for _, k in PDL_KERNELS}[name]
    node = next(n for n in kernel.body if isinstance(n, ast.If) and ast.unparse(n.test) == branch)
    body = node.body if name == "_paged_attn_kernel" else node.orelse
    waits = [i for i, stmt in enumerate(body) if "gdc_wait()" in ast.unparse(stmt)]
    assert waits, f"{name}: no gdc_wait() in the {branch!r} branch"
    for stmt in body[:waits[0]]:
        _check_before_wait(name, stmt)


def test_pdl_launches_target_pdl_kernels():
    with_pdl = {k.name for _, k in PDL_KERNELS}
    for path in sorted(KERNEL_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and any(
                    isinstance(kw.value, ast.Call) and ast.unparse(kw.value.func) == "pdl" for kw in node.keywords
                    if kw.arg is None):
                target = ast.unparse(node.func).split("[")[0]
                assert target in with_pdl, f"{path.name}: {target} is launched with **pdl() but takes no PDL"
