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
# prefetch_ahead's first tensor (A0, and A1, A2 with it) is a later layer's weight (``CausalLM.link_prefetch``).
PARAM_POINTERS = {"w_ptr", "w_rows", "w_gate", "w_up", "s_rows", "A0"}


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
        src = ast.unparse(stmt)
        if "gdc_wait()" in src:
            waited = True
            break
        assert "tl.store(" not in src and "atomic" not in src and "return" not in src, (fname, kernel.name, src)
        for call in [n for n in ast.walk(stmt) if isinstance(n, ast.Call)
                     and ast.unparse(n.func) in ("tl.load", "prefetch_l2", "whole_rows_load", "prefetch_ahead")]:
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


# What decode attention may read before its wait with EARLY_KV: the step's context, written before the forward's
# first kernel (host copies into the graph's inputs, highspeed/engine/runner.py), and the KV cache through
# _kv_tile (earlier tokens' rows; the new token's row is replaced after the wait). Never q or the new k / v.
EARLY_KV_POINTERS = {"seq_lens_ptr", "bt_row", "pos_ptr", "slot_ptr"}
EARLY_KV_HELPERS = {"_kv_tile": {"k_ptr"}, "_rope_cos_sin": {"cs_ptr"}}


def test_attention_early_kv_reads_only_context_and_cache_before_wait():
    kernel = next(k for _, k in PDL_KERNELS if k.name == "_paged_attn_kernel")
    top = ast.unparse(kernel.body[0])
    assert "if not EARLY_KV" in top and "gdc_wait()" in top   # the wait at the top is skipped only with EARLY_KV
    decode = next(n for n in kernel.body if isinstance(n, ast.If) and ast.unparse(n.test) == "DECODE")
    early = None
    before: list[ast.stmt] = []
    for stmt in decode.body:
        if isinstance(stmt, ast.If) and ast.unparse(stmt.test) == "EARLY_KV":
            early = stmt
            break
        before.append(stmt)
    assert early is not None
    for stmt in early.body:
        if "gdc_wait()" in ast.unparse(stmt):
            break
        before.append(stmt)
    else:
        raise AssertionError("the EARLY_KV branch never waits")
    seen = set()
    for stmt in before:
        src = ast.unparse(stmt)
        assert "tl.store(" not in src and "atomic" not in src and "return" not in src, src
        for call in [n for n in ast.walk(stmt) if isinstance(n, ast.Call)]:
            name = ast.unparse(call.func)
            if name == "tl.load":
                base = ast.unparse(call.args[0]).split("+")[0].strip()
                assert base in EARLY_KV_POINTERS, f"EARLY_KV loads {base!r} before gdc_wait()"
                seen.add(base)
            elif name in EARLY_KV_HELPERS:
                base = ast.unparse(call.args[0]).split("+")[0].strip()
                assert base in EARLY_KV_HELPERS[name], f"EARLY_KV calls {name} on {base!r} before gdc_wait()"
                seen.add(name)
            else:
                assert not name.startswith("_") or name in ("_rope_lanes",), f"EARLY_KV calls {name} before the wait"
    assert {"seq_lens_ptr", "bt_row", "_kv_tile"} <= seen
