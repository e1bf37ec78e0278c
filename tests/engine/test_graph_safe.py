"""The decode step reads no host-side lengths (so it can be captured as a CUDA graph) and, with the Triton
kernels, gives the torch reference path's logits. Runs the kernels in Triton's interpreter on the CPU."""
import os
import subprocess
import sys

import pytest

from tests.checkpoints import make_tiny_checkpoint

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("arch,lens", [
    *[(a, "7,3,10") for a in ("qwen3_moe", "glm4_moe", "glm4_moe_lite", "deepseek_v3", "mixtral", "llama")],
    # DSA with index_topk=8 and a graph bound (max_seq_len 12) above it: the indexer always selects in the graph.
    # Mixed lengths: the reference selects too (10 > 8), and the short sequences get all their positions.
    ("glm_moe_dsa", "7,3,10"),
    # All shorter than index_topk: the reference runs dense MLA, the graph selects every position -- the same.
    ("glm_moe_dsa", "7,3,5"),
    # Batch 1: the decoder layers' norms (and MLA's q_a_layernorm) run in the prologues of the GEMVs and the MoE.
    *[(a, "7") for a in ("qwen3_moe", "glm4_moe_lite", "llama", "glm_moe_dsa")],
])
def test_decode_step_is_graph_safe_and_matches_reference(tmp_path, arch, lens):
    path = make_tiny_checkpoint(arch, tmp_path / arch)
    env = dict(os.environ, PYTHONPATH=ROOT, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "engine", "graph_safe_check.py"), path, lens],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("max_abs_diff")][-1]
    diff, scale = float(line.split()[1]), float(line.split()[3])
    assert diff <= 1e-4 * max(1.0, scale), line
