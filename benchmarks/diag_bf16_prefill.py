"""Per-op ablation of a bf16 prefill on the GPU: the torch path against the Triton kernels, all of them and then one
op family at a time, for tiny random GLM-4.7-Flash (glm4_moe_lite) and Qwen3-MoE models and an fp32 control.
Prints the largest log-probability difference of the last token and both top-5s.

    PYTHONPATH=. python benchmarks/diag_bf16_prefill.py   (output of run 5: results/diag-bf16-prefill-h200-run5.log)
"""
import importlib

import torch

from highspeed.config import HFConfig
from highspeed.context import AttentionContext, use_context
from highspeed.engine.kv_cache import allocate_kv_caches
from highspeed.models.loader import build_model
from tests.checkpoints import _COMMON, CONFIGS

NAMES = ("activation", "attention", "dsa", "linear", "moe", "norm", "rope")
OPS = {n: importlib.import_module(f"highspeed.ops.{n}") for n in NAMES}
PROMPT = [120, 4, 33, 201, 6, 66, 13, 150, 29, 44, 1, 300, 87, 8, 19, 240, 55, 10, 71, 3, 16, 99]


def kernel(module: str, name: str, x: torch.Tensor):
    try:
        return getattr(importlib.import_module(f"highspeed.ops.triton.{module}"), name)
    except (ImportError, AttributeError):
        return None


def main() -> None:
    for arch, dtype in (("glm4_moe_lite", torch.bfloat16), ("qwen3_moe", torch.bfloat16),
                        ("glm4_moe_lite", torch.float32)):
        cls, fields = CONFIGS[arch]
        cfg = dict(_COMMON, **fields)
        cfg.update(architectures=[cls], eos_token_id=1)
        torch.manual_seed(0)
        model = build_model(HFConfig(cfg), dtype=dtype, device="cuda", random_init=True)
        allocate_kv_caches(model, 16, 16, dtype, torch.device("cuda"))
        ids = torch.tensor(PROMPT, device="cuda")
        n = len(PROMPT)

        def run(triton_ops: set[str]) -> torch.Tensor:
            for name, mod in OPS.items():
                mod.triton_kernel = kernel if name in triton_ops else (lambda module, fn, x: None)
            ctx = AttentionContext(
                query_lens=[n], seq_lens=[n], query_start_loc=torch.tensor([0, n], dtype=torch.int32, device="cuda"),
                seq_lens_t=torch.tensor([n], dtype=torch.int32, device="cuda"),
                slot_mapping=torch.arange(n, device="cuda"),
                block_tables=torch.tensor([[0, 1]], dtype=torch.int32, device="cuda"),
                block_size=16, max_query_len=n, max_seq_len=n)
            with torch.inference_mode(), use_context(ctx):
                logits = model.compute_logits(model(ids, torch.arange(n, device="cuda")))
            return torch.log_softmax(logits[-1].float(), -1)

        ref = run(set())
        for only in [set(NAMES)] + [{x} for x in NAMES]:
            out = run(only)
            print(arch, str(dtype)[6:], "triton:", ",".join(sorted(only)),
                  "max|dlp| %.4f" % float((out - ref).abs().max()),
                  "top5", ref.topk(5).indices.tolist(), out.topk(5).indices.tolist(), flush=True)


if __name__ == "__main__":
    main()
