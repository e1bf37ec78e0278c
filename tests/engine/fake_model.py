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
        ctx = get_context()
        cache = self.kv_caches["tok"].view(-1)
        cache[ctx.slot_mapping] = input_ids.float()
        self.tokens_computed += int(input_ids.numel())
        out = torch.zeros(input_ids.numel(), dtype=torch.float32)
        bs = ctx.block_size
        row = 0
        for i, (q, L) in enumerate(zip(ctx.query_lens, ctx.seq_lens)):
            table = ctx.block_tables[i]
            slots = torch.stack([table[p // bs] * bs + p % bs for p in range(L)]).long()
            vals = cache[slots]
            for j in range(q):
                upto = L - q + j + 1
                w = torch.arange(1, upto + 1, dtype=torch.float32)
                out[row] = float((vals[:upto] * w).sum().item() % 9973)
                row += 1
        return out[:, None]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
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
