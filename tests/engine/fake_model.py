"""A tiny stand-in model that really uses the paged KV cache, for scheduler and engine tests.

Its next token is a hash of the *whole* context, read back from the KV cache: if the engine served a wrong
block (bad prefix match, broken copy-on-write, stale block after preemption) the output changes. So greedy
outputs must be identical under any batching, prefix reuse, merging or preemption.
"""
from __future__ import annotations

import json
import os

import torch
from torch import nn

from highspeed.config import EngineConfig
from highspeed.context import get_context
from highspeed.engine.engine import LLMEngine

VOCAB = 61
EOS = 0


class HashModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.kv_caches: dict[str, torch.Tensor] = {}
        self.tokens_computed = 0

    def cache_spec(self) -> dict[str, tuple[int, ...]]:
        return {"tok": (1,)}

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # Reads only the context's tensors (never its host lists), like a kernel inside a CUDA graph.
        ctx = get_context()
        cache = self.kv_caches["tok"].view(-1)
        keep = ctx.slot_mapping >= 0
        cache[ctx.slot_mapping[keep]] = input_ids[keep].float()
        self.tokens_computed += int(input_ids.numel())
        out = torch.zeros(input_ids.numel(), dtype=torch.float32)
        bs = ctx.block_size
        qsl, lens = ctx.query_start_loc.tolist(), ctx.seq_lens_t.tolist()
        for i in range(ctx.num_seqs):
            q, L = qsl[i + 1] - qsl[i], lens[i]
            table = ctx.block_tables[i]
            slots = torch.stack([table[p // bs] * bs + p % bs for p in range(L)]).long()
            vals = cache[slots]
            for j in range(q):
                upto = L - q + j + 1
                w = torch.arange(1, upto + 1, dtype=torch.float32)
                out[qsl[i] + j] = float((vals[:upto] * w).sum().item() % 9973)
        return out[:, None]

    def compute_logits(self, hidden: torch.Tensor, float32: bool = True) -> torch.Tensor:
        h = hidden[:, 0].long()
        nxt = (h * 31 + 7) % VOCAB
        return torch.nn.functional.one_hot(nxt, VOCAB).float() * 10.0 + torch.linspace(0, 1, VOCAB)[None] * 0.01


class FakeTokenizer:
    eos_token_id = EOS
    chat_template = None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [1 + (ord(c) % (VOCAB - 1)) for c in text]}

    def decode(self, ids: list[int], skip_special_tokens: bool = True, **kw) -> str:
        return "".join(f"<{i}>" for i in ids if not (skip_special_tokens and i == EOS))


def make_engine(tmp_path, **options) -> LLMEngine:
    path = os.path.join(str(tmp_path), "hash-model")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"architectures": ["HashModel"], "vocab_size": VOCAB, "max_position_embeddings": 4096,
                   "eos_token_id": EOS}, f)
    options.setdefault("device", "cpu")
    options.setdefault("dtype", "float32")
    return LLMEngine(EngineConfig(model=path, **options), model=HashModel(), tokenizer=FakeTokenizer())


def run_all(engine: LLMEngine, prompts, params) -> dict:
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(f"r{i}", p, sp)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done


class EagerReplay:
    """Stands in for a captured CUDA graph on the CPU: 'replay' runs the model on the decoder's static buffers,
    exactly the inputs a real graph would read, so the buffer bookkeeping is tested without a GPU."""

    def __init__(self, decoder, b: int):
        self.decoder, self.b = decoder, b

    def replay(self) -> None:
        from highspeed.context import use_context

        d, b = self.decoder, self.b
        with use_context(d._ctx(b)):
            d.logits[b].copy_(d._step(b))   # what the captured graph runs, incl. its tail (greedy_advance)


def install_eager_graphs(engine: LLMEngine, sizes=(1, 2, 4, 8)) -> None:
    from highspeed.engine.runner import CudaGraphDecoder

    dec = CudaGraphDecoder(engine.runner, list(sizes), 64, engine.max_model_len)
    for b in dec.sizes:
        dec.graphs[b] = EagerReplay(dec, b)
        dec.logits[b] = torch.zeros(b, VOCAB)
    engine.runner.graphs = dec
