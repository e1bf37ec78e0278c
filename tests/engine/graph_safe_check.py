"""Run one decode step of a checkpoint the way a captured CUDA graph runs it: Triton kernels (in the interpreter
on the CPU) and *no host-side lengths* in the attention context. Prints the largest logit difference from the
torch reference path with ordinary host lengths. Used by test_graph_safe.py in a subprocess, because the
Triton interpreter must be chosen before any kernel module is imported."""
import importlib
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

torch.set_num_threads(1)

import highspeed.ops  # noqa: E402
from highspeed.context import AttentionContext, use_context  # noqa: E402
from highspeed.engine.kv_cache import allocate_kv_caches  # noqa: E402
from highspeed.engine.runner import HostLengthsUnavailable  # noqa: E402
from highspeed.models.loader import load_model  # noqa: E402

# The op modules by name: ``highspeed.ops.rope`` as an attribute is the re-exported function, not the module.
OPS = tuple(importlib.import_module(f"highspeed.ops.{name}")
            for name in ("activation", "attention", "dsa", "linear", "moe", "norm", "rope"))


def triton_on_cpu(module: str, name: str, x: torch.Tensor):
    try:
        return getattr(importlib.import_module(f"highspeed.ops.triton.{module}"), name)
    except (ImportError, AttributeError):
        return None


def main(path: str, lens: list[int]) -> None:
    """One decode token for each of up to three sequences of these lengths (at most 8, 4 and 12 tokens)."""
    model, _ = load_model(path, dtype=torch.float32, device="cpu", progress=False)
    allocate_kv_caches(model, 16, 4, torch.float32, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    for caches in (m.kv_caches for m in model.modules() if hasattr(m, "cache_spec")):
        for t in caches.values():
            t.normal_(generator=gen)
    batch = len(lens)   # one sequence: batch-1 decode, where the norms run inside the projections' / MoE's kernels
    tables = torch.tensor([[0, 1, 0], [2, 0, 0], [5, 6, 7]], dtype=torch.int32)[:batch]
    ids, pos = torch.tensor([3, 4, 9])[:batch], torch.tensor([n - 1 for n in lens])
    slots = [int(tables[i, p // 4]) * 4 + p % 4 for i, p in enumerate(pos.tolist())]
    common = dict(query_start_loc=torch.arange(batch + 1, dtype=torch.int32), seq_lens_t=torch.tensor(lens, dtype=torch.int32),
                  slot_mapping=torch.tensor(slots, dtype=torch.int64), block_tables=tables, block_size=4,
                  max_query_len=1, decode_only=True)
    snapshot = {id(t): t.clone() for m in model.modules() if hasattr(m, "cache_spec") for t in m.kv_caches.values()}

    def restore() -> None:
        for m in model.modules():
            if hasattr(m, "cache_spec"):
                for t in m.kv_caches.values():
                    t.copy_(snapshot[id(t)])

    with torch.inference_mode():
        with use_context(AttentionContext(query_lens=[1] * batch, seq_lens=list(lens), max_seq_len=max(lens), **common)):
            ref = model.compute_logits(model(ids, pos))
        restore()
        for m in OPS:
            if hasattr(m, "triton_kernel"):
                m.triton_kernel = triton_on_cpu
        graph_ctx = AttentionContext(query_lens=HostLengthsUnavailable(), seq_lens=HostLengthsUnavailable(),
                                     max_seq_len=12, extra={"cuda_graph": True}, **common)
        with use_context(graph_ctx):
            out = model.compute_logits(model(ids, pos))
    print(f"max_abs_diff {float((out - ref).abs().max()):.3e} scale {float(ref.abs().max()):.3e}")


if __name__ == "__main__":
    main(sys.argv[1], [int(n) for n in (sys.argv[2] if len(sys.argv) > 2 else "7,3,10").split(",")])
