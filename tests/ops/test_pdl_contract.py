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
PARAM_POINTERS = {"w_ptr", "w_rows", "w_gate", "w_up", "s_rows", "nw_ptr", "qw_ptr", "kw_ptr"}
# The step's context, which no kernel of a forward writes (highspeed.ops.triton.EARLY_CTX_*): decode attention and
# the RoPE + cache-write programs may read it before their wait, directly or through ``rope_context``.
CONTEXT_POINTERS = {"seq_lens_ptr", "bt_row", "pos_ptr", "slot_ptr", "cs_ptr"}
# The routing ids, which the fused gate/up kernel's program 0 stores and fences before it lets the down kernel
# launch (highspeed.ops.triton.moe.EARLY_IDS): the down kernel may read them before its wait.
PUBLISHED_POINTERS = {"ids_ptr"}
# Activations that a kernel may only ask L2 for (prefetch_l2) before its wait, never load: a prefetch returns no
# data, and L2 is the GPU's point of coherence, so it cannot make anyone read a stale value. The whole-row GEMV's
# program 0 asks for the residual it adds after the wait (linear.ADD_NORM).
PREFETCH_ONLY_POINTERS = {"rin_ptr"}


def _check_before_wait(where: str, stmt: ast.stmt, published: frozenset = frozenset()) -> None:
    """A statement before the wait: no store, return or atomic; loads only of parameters or the step's context
    (or of ``published`` pointers, which the previous kernel stored before it let this one launch)."""
    src = ast.unparse(stmt)
    assert "tl.store(" not in src and "atomic" not in src and "return" not in src, (where, src)
    for call in [n for n in ast.walk(stmt) if isinstance(n, ast.Call)]:
        name = ast.unparse(call.func)
        if name in ("tl.load", "prefetch_l2", "whole_rows_load", "norm_weights_load", "_rope_norm_weights"):
            base = ast.unparse(call.args[0]).split("+")[0].strip().split("[")[0]
            ok = PARAM_POINTERS | CONTEXT_POINTERS | published
            if name == "prefetch_l2":
                ok = ok | PREFETCH_ONLY_POINTERS
            assert base in ok, f"{where} loads {base!r} before gdc_wait()"
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
            "_rope_write_kernel", "_paged_attn_kernel", "_combine_kernel", "_embedding_kernel"} <= names


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


def _if_with(body: list, test: str, contains: str) -> ast.If:
    return next(n for n in body for n in ast.walk(n)
                if isinstance(n, ast.If) and ast.unparse(n.test) == test and contains in ast.unparse(n))


def test_early_ids_down_reads_only_published_before_wait():
    """With EARLY_IDS the down kernel's wait moves below its routing: what comes before it may read the ids (and
    the weight rows they select), and nothing else of the previous kernels'."""
    kernel = {k.name: k for _, k in PDL_KERNELS}["_fused_down_kernel"]
    first = kernel.body[0]
    assert ast.unparse(first.test) == "PDL" and "if not EARLY_IDS:" in ast.unparse(first), ast.unparse(first)
    rest = kernel.body[1:]
    waits = [i for i, stmt in enumerate(rest) if "gdc_wait()" in ast.unparse(stmt)]
    assert waits and "EARLY_IDS" in ast.unparse(rest[waits[0]]), "no EARLY_IDS wait after the routing loads"
    loads = set()
    for stmt in rest[:waits[0]]:
        _check_before_wait("_fused_down_kernel", stmt, frozenset(PUBLISHED_POINTERS))
        loads |= {ast.unparse(c.args[0]).split("+")[0].strip() for c in ast.walk(stmt)
                  if isinstance(c, ast.Call) and ast.unparse(c.func) == "tl.load"}
    assert "ids_ptr" in loads, "the ids are not loaded before the EARLY_IDS wait"


def test_early_ids_gate_up_publishes_before_trigger():
    """The publisher's side: with EARLY_IDS, program 0 of the fused gate/up kernel triggers its dependents only
    through ``_publish_ids`` (the store, then a GPU-scope fence and a barrier, then the trigger: the trigger orders
    no memory); every other program triggers at its start."""
    kernels = {k.name: k for _, k in _kernels()}
    gate_up = kernels["_fused_gate_up_kernel"]
    top = _if_with(gate_up.body, "EARLY_IDS", "tl.program_id(1) != 0")
    assert [ast.unparse(n.test) for n in top.body] == ["tl.program_id(1) != 0"], ast.unparse(top)
    calls = [ast.unparse(n.func) for n in ast.walk(gate_up) if isinstance(n, ast.Call)]
    assert calls.count("_publish_ids") == 1 and calls.count("gdc_launch_dependents") == 2, calls
    publish = _if_with(gate_up.body, "p == 0", "_publish_ids")
    assert [ast.unparse(stmt) for stmt in publish.body] == [
        "_publish_ids(ids_ptr, t, ivec, TOP_K, BLOCK_TK, PDL)"], ast.unparse(publish)
    body = [ast.unparse(stmt) for stmt in kernels["_publish_ids"].body[1:]]   # after the docstring
    gate = body.index(next(stmt for stmt in body if stmt.startswith("if TRIGGER:")))
    assert any(stmt.startswith("tl.store(ids_ptr") for stmt in body[:gate]), body
    pdl_block = [ast.unparse(stmt) for stmt in kernels["_publish_ids"].body[1:][gate].body]
    assert pdl_block == ["fence_gpu(t.to(tl.int32))", "tl.debug_barrier()", "gdc_launch_dependents()"], pdl_block


def test_pdl_launches_target_pdl_kernels():
    with_pdl = {k.name for _, k in PDL_KERNELS}
    for path in sorted(KERNEL_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and any(
                    isinstance(kw.value, ast.Call) and ast.unparse(kw.value.func) == "pdl" for kw in node.keywords
                    if kw.arg is None):
                target = ast.unparse(node.func).split("[")[0]
                assert target in with_pdl, f"{path.name}: {target} is launched with **pdl() but takes no PDL"
