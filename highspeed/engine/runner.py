"""The model runner: turns a SchedulerOutput into device tensors, runs the model, samples.

It owns the device side of the engine: the KV cache tensors, the attention context of each step, the sampler,
and (on CUDA) the captured decode graphs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from highspeed.context import AttentionContext, use_context
from highspeed.engine.kv_cache import allocate_kv_caches, copy_blocks
from highspeed.engine.scheduler import SchedulerOutput
from highspeed.ops.sampling import SamplingTensors, logprobs_topk, sample
from highspeed.sampling import SamplingParams


@dataclass
class SampleSpec:
    """One token to sample: from the logits of scheduled item ``item``, for a sequence with these settings."""
    item: int
    params: SamplingParams
    seed: int
    step: int


@dataclass
class SampleResult:
    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


class ModelRunner:
    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype, block_size: int):
        self.model = model
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.num_blocks = 0
        self.forward_calls = 0

    def allocate_kv_cache(self, num_blocks: int) -> int:
        self.num_blocks = num_blocks
        return allocate_kv_caches(self.model, num_blocks, self.block_size, self.dtype, self.device)

    # -- batch tensors ----------------------------------------------------------------------------------------
    def _prepare(self, out: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionContext, list[int]]:
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        qlens: list[int] = []
        slens: list[int] = []
        last_rows: list[int] = []
        tables: list[list[int]] = []
        for it in out.items:
            seq, start, n = it.seq, it.start, it.num_new_tokens
            ids.extend(seq.token_ids[start:start + n])
            pos.extend(range(start, start + n))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            qlens.append(n)
            slens.append(start + n)
            last_rows.append(len(ids) - 1)
            tables.append(table)
        width = max(len(t) for t in tables)
        bt = torch.zeros((len(tables), width), dtype=torch.int32)
        for i, t in enumerate(tables):
            bt[i, :len(t)] = torch.tensor(t, dtype=torch.int32)
        qsl = [0]
        for n in qlens:
            qsl.append(qsl[-1] + n)
        dev = self.device

        def to_dev(x: list[int] | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
            t = x if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=dtype)
            return t.to(dev, non_blocking=True)

        ctx = AttentionContext(
            query_lens=qlens, seq_lens=slens, query_start_loc=to_dev(qsl, torch.int32),
            seq_lens_t=to_dev(slens, torch.int32), slot_mapping=to_dev(slots, torch.int64),
            block_tables=to_dev(bt, torch.int32), block_size=bs, max_query_len=max(qlens), max_seq_len=max(slens),
            decode_only=all(n == 1 for n in qlens),
        )
        return to_dev(ids, torch.int64), to_dev(pos, torch.int64), ctx, last_rows

    # -- one step ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, specs: list[SampleSpec]) -> list[SampleResult]:
        copy_blocks(self.model, out.block_copies)
        input_ids, positions, ctx, last_rows = self._prepare(out)
        with use_context(ctx):
            hidden = self.model(input_ids, positions)
        self.forward_calls += 1
        if not specs:
            return []
        rows = torch.tensor([last_rows[s.item] for s in specs], dtype=torch.long, device=self.device)
        logits = self.model.compute_logits(hidden.index_select(0, rows)).float()
        return self._sample(logits, specs)

    def _sample(self, logits: torch.Tensor, specs: list[SampleSpec]) -> list[SampleResult]:
        p = [s.params for s in specs]
        st = SamplingTensors.build(
            temperature=[x.temperature for x in p], top_k=[x.top_k for x in p], top_p=[x.top_p for x in p],
            min_p=[x.min_p for x in p], seeds=[s.seed for s in specs], steps=[s.step for s in specs],
            device=logits.device,
        )
        tokens = sample(logits, st)
        want = [x.logprobs for x in p if x.logprobs is not None]
        if not want:
            return [SampleResult(int(t)) for t in tokens.tolist()]
        k = max(want)
        chosen, vals, ids = logprobs_topk(logits, tokens, k)
        tokens_l, chosen_l, vals_l, ids_l = tokens.tolist(), chosen.tolist(), vals.tolist(), ids.tolist()
        results = []
        for i, s in enumerate(specs):
            if s.params.logprobs is None:
                results.append(SampleResult(tokens_l[i]))
            else:
                kk = s.params.logprobs
                results.append(SampleResult(tokens_l[i], chosen_l[i], list(zip(ids_l[i][:kk], vals_l[i][:kk]))))
        return results
