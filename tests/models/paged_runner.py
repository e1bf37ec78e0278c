"""A test-only paged runner: allocates every attention module's KV cache from ``cache_spec()``, hands out
scattered blocks per sequence and builds the ``AttentionContext`` of each step by hand. It proves the model's
cache path independently of the engine (which has its own runner)."""
from __future__ import annotations

import random

import torch
from torch import nn

from highspeed.context import AttentionContext, prefill_context, use_context


def cache_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "cache_spec")]


class PagedRunner:
    def __init__(self, model: nn.Module, num_blocks: int = 96, block_size: int = 4, seed: int = 0):
        self.model, self.block_size = model, block_size
        dtype = next(p for n, p in model.named_parameters() if "gate." not in n).dtype
        for m in cache_modules(model):
            m.kv_caches = {name: torch.zeros(num_blocks, block_size, *shape, dtype=dtype)
                           for name, shape in m.cache_spec().items()}
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)  # non-contiguous blocks, as after churn
        self.tokens: dict[str, list[int]] = {}
        self.blocks: dict[str, list[int]] = {}
        self.computed: dict[str, int] = {}

    def add(self, seq_id: str, tokens: list[int]) -> None:
        self.tokens[seq_id], self.blocks[seq_id], self.computed[seq_id] = list(tokens), [], 0

    def step(self, plan: list[tuple[str, int]]) -> torch.Tensor:
        """Compute the next ``n`` uncomputed tokens of each listed sequence; returns fp32 logits ``[T, vocab]``
        for every computed token, in plan order."""
        ids, pos, slots, qlens, slens, tables = [], [], [], [], [], []
        for seq_id, n in plan:
            start = self.computed[seq_id]
            end = start + n
            assert end <= len(self.tokens[seq_id])
            while len(self.blocks[seq_id]) * self.block_size < end:
                self.blocks[seq_id].append(self.free.pop())
            for p in range(start, end):
                ids.append(self.tokens[seq_id][p])
                pos.append(p)
                slots.append(self.blocks[seq_id][p // self.block_size] * self.block_size + p % self.block_size)
            qlens.append(n)
            slens.append(end)
            tables.append(self.blocks[seq_id])
            self.computed[seq_id] = end
        width = max(len(t) for t in tables)
        qsl = [0]
        for n in qlens:
            qsl.append(qsl[-1] + n)
        ctx = AttentionContext(
            query_lens=qlens, seq_lens=slens, query_start_loc=torch.tensor(qsl, dtype=torch.int32),
            seq_lens_t=torch.tensor(slens, dtype=torch.int32), slot_mapping=torch.tensor(slots, dtype=torch.long),
            block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
            block_size=self.block_size, max_query_len=max(qlens), max_seq_len=max(slens),
            decode_only=all(n == 1 for n in qlens),
        )
        with use_context(ctx), torch.no_grad():
            hidden = self.model(torch.tensor(ids), torch.tensor(pos))
            return self.model.compute_logits(hidden)

    def greedy(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Batched greedy decoding of several prompts (prefilled together, then decoded together)."""
        names = [f"g{i}" for i in range(len(prompts))]
        for name, p in zip(names, prompts):
            self.add(name, p)
        out: list[list[int]] = [[] for _ in prompts]
        logits = self.step([(name, len(p)) for name, p in zip(names, prompts)])
        last = [sum(len(p) for p in prompts[: i + 1]) - 1 for i in range(len(prompts))]
        nxt = logits[last].argmax(-1).tolist()
        for _ in range(max_new_tokens - 1):
            for i, name in enumerate(names):
                out[i].append(nxt[i])
                self.tokens[name].append(nxt[i])
            nxt = self.step([(name, 1) for name in names]).argmax(-1).tolist()
        for i in range(len(prompts)):
            out[i].append(nxt[i])
        return out


def forward_without_cache(model: nn.Module, sequences: list[list[int]]) -> torch.Tensor:
    """Cache-less forward of several whole sequences flattened into one step -> fp32 logits ``[T, vocab]``."""
    ids = torch.tensor([t for s in sequences for t in s])
    pos = torch.tensor([p for s in sequences for p in range(len(s))])
    with use_context(prefill_context([len(s) for s in sequences])), torch.no_grad():
        return model.compute_logits(model(ids, pos))


def step_context(runner: PagedRunner, seq_id: str, end: int, total: int) -> AttentionContext:
    """Context for computing positions ``[computed, end)`` of one sequence of ``total`` tokens (for modules other
    than the main forward, e.g. the MTP layer); advances the runner's bookkeeping."""
    if seq_id not in runner.tokens:
        runner.add(seq_id, [0] * total)
    start = runner.computed[seq_id]
    while len(runner.blocks[seq_id]) * runner.block_size < end:
        runner.blocks[seq_id].append(runner.free.pop())
    blocks = runner.blocks[seq_id]
    slots = [blocks[p // runner.block_size] * runner.block_size + p % runner.block_size for p in range(start, end)]
    runner.computed[seq_id] = end
    return AttentionContext(
        query_lens=[end - start], seq_lens=[end], query_start_loc=torch.tensor([0, end - start], dtype=torch.int32),
        seq_lens_t=torch.tensor([end], dtype=torch.int32), slot_mapping=torch.tensor(slots, dtype=torch.long),
        block_tables=torch.tensor([blocks], dtype=torch.int32), block_size=runner.block_size,
        max_query_len=end - start, max_seq_len=end, decode_only=end - start == 1,
    )
