"""The model runner: turns a SchedulerOutput into device tensors, runs the model, samples.

It owns the device side of the engine: the KV cache tensors, the attention context of each step, the sampler,
and (on CUDA) the captured decode graphs.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from highspeed.context import AttentionContext, use_context
from highspeed.engine.kv_cache import allocate_kv_caches, copy_blocks
from highspeed.engine.scheduler import SchedulerOutput
from highspeed.ops.sampling import SamplingTensors, greedy_advance, logprobs_topk, sample
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


class HostLengthsUnavailable(list):
    """Stands in for the host copies of the lengths while a CUDA graph is captured: an op that reads them would
    bake one step's lengths into the graph, so reading them fails the capture and the runner stays eager."""

    def _fail(self, *a: object, **k: object) -> None:
        raise RuntimeError("host-side lengths are not available inside a CUDA graph")

    __iter__ = __getitem__ = __len__ = _fail  # type: ignore[assignment]


# The decode graphs end with the next step's inputs (``greedy_advance``): the argmax of the logits written into the
# token ids, the live rows' positions, slots and lengths one token on. A steady greedy step (the same sequences, one
# token further) is then one graph replay and the samples' copy to the host, where the host otherwise added to the
# positions and lengths, copied the last samples into the ids, cast the logits to fp32 and took their argmax (five
# launches, ~24 us per step on the H200 beside Qwen3-30B-A3B's 2.22 ms replay, run 43). Steps that sample with a
# temperature cast the graph's bf16 logits to fp32 outside it. HIGHSPEED_GRAPH_GREEDY=0: the graph ends at the fp32
# logits.
GREEDY_IN_GRAPH: bool = os.environ.get("HIGHSPEED_GRAPH_GREEDY", "1") != "0"
# With GREEDY_IN_GRAPH the graph's last kernel also writes the tokens into a ring of RING_ROWS rows in pinned host
# memory (row = a replay count kept on the device, bumped once per replay), and the host reads a step's row after
# the step's event. The alternative, a device-to-host copy launched behind each replay, left the device idle around
# it: in real Qwen3-30B-A3B / GLM-4.7-Flash steps on the H200 the copy ended 5.8-7.4 us after the replay, and the next
# replay's first kernel started 4-6 us after that, against 1.3 us between back-to-back replays (run 50 timelines).
# At most one step is in flight while the host reads another, so two rows would do; the host's count follows the
# device's because every replay goes through CudaGraphDecoder.run, which sets the device count whenever it refills
# the inputs. HIGHSPEED_HOST_RING=0: the copy (the A/B baseline).
HOST_RING: bool = os.environ.get("HIGHSPEED_HOST_RING", "1") != "0"
RING_ROWS: int = 4


class CudaGraphDecoder:
    """Decode steps captured as CUDA graphs for a ladder of batch sizes: one launch per step from the host.

    Inputs live in static buffers that each replay reads; a batch of b sequences runs in the smallest captured
    graph of size >= b, the extra rows padded (slot -1: nothing written; context of one token). With
    GREEDY_IN_GRAPH each replay leaves the buffers holding the next steady step's inputs.
    """

    def __init__(self, runner: "ModelRunner", batch_sizes: list[int], max_blocks_per_seq: int, max_model_len: int):
        self.runner = runner
        dev = runner.device
        self.sizes = sorted(batch_sizes)
        m = self.sizes[-1]
        self.ids = torch.zeros(m, dtype=torch.int64, device=dev)
        # Positions and slots share one buffer so a steady decode step advances both with a single add.
        self.pos_slots = torch.zeros((2, m), dtype=torch.int64, device=dev)
        self.pos, self.slots = self.pos_slots[0], self.pos_slots[1]
        self.slots.fill_(-1)
        self.tables = torch.zeros((m, max_blocks_per_seq), dtype=torch.int32, device=dev)
        self.seq_lens = torch.ones(m, dtype=torch.int32, device=dev)
        self.qsl = torch.arange(m + 1, dtype=torch.int32, device=dev)
        self.max_model_len = max_model_len
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self._last: tuple | None = None   # (seq ids, graph size, block-table lengths, positions) of the last replay
        self.ring, self.ring_count = _host_ring(dev, m) if GREEDY_IN_GRAPH and HOST_RING else (None, None)
        self.replays = 0   # the host's copy of ring_count after the last replay

    def _ctx(self, b: int) -> AttentionContext:
        return AttentionContext(
            query_lens=HostLengthsUnavailable(), seq_lens=HostLengthsUnavailable(), query_start_loc=self.qsl[:b + 1],
            seq_lens_t=self.seq_lens[:b], slot_mapping=self.slots[:b], block_tables=self.tables[:b],
            block_size=self.runner.block_size, max_query_len=1, max_seq_len=self.max_model_len, decode_only=True,
            extra={"cuda_graph": True},
        )

    @torch.inference_mode()
    def capture(self) -> None:
        pool = None
        for b in reversed(self.sizes):
            ctx = self._ctx(b)
            with use_context(ctx):
                for _ in range(2):   # warm up: Triton compiles, allocator settles (every slot is -1: no advance)
                    self._step(b)
                torch.cuda.synchronize()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool):
                    logits = self._step(b)
            pool = g.pool()
            self.graphs[b] = g
            self.logits[b] = logits
        torch.cuda.synchronize()

    def _step(self, b: int) -> torch.Tensor:
        """What a graph of b rows runs: the model, the logits, and (GREEDY_IN_GRAPH) the next step's inputs."""
        model = self.runner.model
        logits = model.compute_logits(model(self.ids[:b], self.pos[:b]), float32=not GREEDY_IN_GRAPH)
        if GREEDY_IN_GRAPH:
            greedy_advance(logits, self.ids[:b], self.pos_slots[:, :b], self.seq_lens[:b], self.ring, self.ring_count)
        return logits

    def host_tokens(self, b: int) -> torch.Tensor | None:
        """The ring row the last replay wrote its first b tokens to (None without a ring): read it only after
        that replay's event."""
        return None if self.ring is None else self.ring[self.replays % RING_ROWS, :b]

    def freeze(self) -> None:
        """For replaying graphs back to back (benchmarks): every row becomes padding (slot -1), so a replay writes
        no cache row and moves no input on; the next real step refills the inputs."""
        self.slots.fill_(-1)
        self._last = None

    def size_for(self, b: int) -> int | None:
        for s in self.sizes:
            if s >= b:
                return s
        return None

    def run(self, items: list, prev: "InFlight | None", runner: "ModelRunner") -> torch.Tensor:
        """Fill the static inputs for these decode items and replay. In steady decode (the same sequences as the
        last replay, one position further, no new block) the inputs advance on the device with two adds and the
        token ids come straight from the previous step's samples: no host-to-device copy at all."""
        t0 = time.perf_counter()
        bs = runner.block_size
        b = len(items)
        g = self.size_for(b)
        assert g is not None
        seqs = [it.seq for it in items]
        key = [s.seq_id for s in seqs]
        pos = [it.start for it in items]
        tlens = [len(s.block_table) for s in seqs]
        last = self._last
        if (last is not None and last[1] == g and last[0] == key and last[2] == tlens
                and all(p == q + 1 for p, q in zip(pos, last[3]))):
            if not GREEDY_IN_GRAPH:   # otherwise the last replay moved them on already
                self.pos_slots[:, :b].add_(1)
                self.seq_lens[:b].add_(1)
        else:
            if self.ring_count is not None:   # resynchronise: replays outside run() (benchmarks) moved it too
                self.ring_count.fill_(self.replays)
            slots = [s.block_table[p // bs] * bs + p % bs for s, p in zip(seqs, pos)]
            host = runner._host([pos, slots], torch.int64)
            self.pos[:g].fill_(0)       # padding rows: position 0, slot -1 (nothing written)
            self.slots[:g].fill_(-1)
            self.pos_slots[:, :b].copy_(host, non_blocking=True)
            self.seq_lens[:g].fill_(1)
            self.seq_lens[:b].copy_(runner._host([p + 1 for p in pos], torch.int32), non_blocking=True)
            width = max(tlens)
            tab = torch.zeros((b, width), dtype=torch.int32)
            for i, s in enumerate(seqs):
                tab[i, :len(s.block_table)] = torch.tensor(s.block_table, dtype=torch.int32)
            self.tables[:b, :width].copy_(runner._host(tab, torch.int32), non_blocking=True)
        self._last = (key, g, tlens, pos)
        ids = [s.token_ids[p] for s, p in zip(seqs, pos)]
        if (prev is not None and prev.tokens is not None and prev.tokens.shape[0] >= b and all(t == -1 for t in ids)
                and all(prev.row_of_seq.get(k) == i for i, k in enumerate(key))):
            if prev.tokens.data_ptr() != self.ids.data_ptr():   # else the graph wrote them there itself
                self.ids[:b].copy_(prev.tokens[:b])
        else:
            self.ids[:b].copy_(runner._input_ids(ids, prev, key))
        runner.host_time_s += time.perf_counter() - t0
        self.graphs[g].replay()
        self.replays += 1
        return self.logits[g][:b]


def _host_ring(device: torch.device, rows: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(ring [RING_ROWS, rows] int64, its count [1] int64 on the device) for greedy_advance, or (None, None) where
    the device cannot write the ring itself: on CUDA the ring is pinned host memory, written by the Triton kernel,
    and one call checks that it lands. On the CPU (tests stand the graphs in with eager runs) a plain tensor."""
    count = torch.zeros(1, dtype=torch.int64, device=device)
    if device.type != "cuda":
        return torch.zeros((RING_ROWS, rows), dtype=torch.int64), count
    try:
        ring = torch.full((RING_ROWS, rows), -1, dtype=torch.int64, pin_memory=True)
        logits = torch.zeros((1, 8), dtype=torch.float32, device=device)
        logits[0, 5] = 1.0
        pos_slots = torch.full((2, 1), -1, dtype=torch.int64, device=device)
        greedy_advance(logits, torch.zeros(1, dtype=torch.int64, device=device), pos_slots,
                       torch.ones(1, dtype=torch.int32, device=device), ring, count)
        torch.cuda.synchronize(device)
        if int(ring[1, 0]) == 5:
            return ring, count
    except (RuntimeError, ValueError):   # no Triton (the reference cannot write host memory), or an unmapped ring
        pass
    return None, None


class ModelRunner:
    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype, block_size: int):
        self.model = model
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.num_blocks = 0
        self.forward_calls = 0
        self.graph_steps = 0
        self.graphs: CudaGraphDecoder | None = None
        self.host_time_s = 0.0   # host work before each launch: building inputs, filling graph buffers
        self.wait_time_s = 0.0   # time the host spent blocked on the device reading samples back

    def capture_cuda_graphs(self, max_batch: int, max_model_len: int) -> bool:
        """Capture decode graphs; on any failure (an op that syncs or reads host lengths) stay eager."""
        if self.device.type != "cuda":
            return False
        sizes = [s for s in (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 512) if s <= max_batch]
        if not sizes or sizes[-1] < max_batch <= 512:
            sizes.append(max_batch)
        dec = CudaGraphDecoder(self, sizes, -(-max_model_len // self.block_size), max_model_len)
        try:
            dec.capture()
        except Exception as e:  # noqa: BLE001 - any capture failure means: run eager
            import logging

            logging.getLogger("highspeed").warning("CUDA graph capture failed, decoding eagerly: %s", e)
            torch.cuda.synchronize()
            return False
        self.graphs = dec
        return True

    def allocate_kv_cache(self, num_blocks: int) -> int:
        self.num_blocks = num_blocks
        return allocate_kv_caches(self.model, num_blocks, self.block_size, self.dtype, self.device)

    # -- batch tensors ----------------------------------------------------------------------------------------
    def _host(self, x: list[int] | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A host tensor ready for an asynchronous copy (pinned on CUDA, so the copy never waits for the GPU)."""
        t = x if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=dtype)
        return t.pin_memory() if self.device.type == "cuda" else t

    def _to_dev(self, x: list[int] | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self._host(x, dtype).to(self.device, non_blocking=True)

    def _input_ids(self, ids: list[int], prev: "InFlight | None", seqs: list[int]) -> torch.Tensor:
        """Token ids on the device. A -1 marks a token the previous step sampled that the host has not read
        yet: it is taken from that step's device output, so this step can be enqueued before reading it."""
        dev_ids = self._to_dev(ids, torch.int64)
        if prev is None or -1 not in ids:
            return dev_ids
        src = [prev.row_of_seq.get(sid, -1) if t == -1 else -1 for t, sid in zip(ids, seqs)]
        src_t = self._to_dev(src, torch.int64)
        return torch.where(src_t >= 0, prev.tokens[src_t.clamp(min=0)], dev_ids)

    def _prepare(self, out: SchedulerOutput, prev: "InFlight | None"
                 ) -> tuple[torch.Tensor, torch.Tensor, AttentionContext, list[int]]:
        bs = self.block_size
        ids: list[int] = []
        owners: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        qlens: list[int] = []
        slens: list[int] = []
        last_rows: list[int] = []
        tables: list[list[int]] = []
        for it in out.items:
            seq, start, n = it.seq, it.start, it.num_new_tokens
            ids.extend(seq.token_ids[start:start + n])
            owners.extend([seq.seq_id] * n)
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
        ctx = AttentionContext(
            query_lens=qlens, seq_lens=slens, query_start_loc=self._to_dev(qsl, torch.int32),
            seq_lens_t=self._to_dev(slens, torch.int32), slot_mapping=self._to_dev(slots, torch.int64),
            block_tables=self._to_dev(bt, torch.int32), block_size=bs, max_query_len=max(qlens),
            max_seq_len=max(slens), decode_only=all(n == 1 for n in qlens),
        )
        return self._input_ids(ids, prev, owners), self._to_dev(pos, torch.int64), ctx, last_rows

    # -- one step ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def launch(self, out: SchedulerOutput, specs: list[SampleSpec], owners: list[Any],
               prev: "InFlight | None" = None) -> "InFlight":
        """Enqueue one step (forward + sampling) on the device; nothing here waits for the device."""
        copy_blocks(self.model, out.block_copies)
        t0 = time.perf_counter()
        logits = None
        graph_tokens = host_tokens = None
        if self.graphs is not None and self._graphable(out):
            logits = self._run_graph(out, prev)        # one row per item
            self.graph_steps += 1
            items = [s.item for s in specs]
            if specs and items != list(range(len(out.items))):
                logits = logits.index_select(0, self._to_dev(items, torch.int64))
            elif GREEDY_IN_GRAPH:
                graph_tokens = self.graphs.ids[:len(items)]   # the graph's argmax, one per item
                host_tokens = self.graphs.host_tokens(len(items))
        else:
            input_ids, positions, ctx, rows_of_item = self._prepare(out, prev)
            self.host_time_s += time.perf_counter() - t0
            with use_context(ctx):
                hidden = self.model(input_ids, positions)
            if specs:
                rows = self._to_dev([rows_of_item[s.item] for s in specs], torch.int64)
                logits = self.model.compute_logits(hidden.index_select(0, rows)).float()
        self.forward_calls += 1
        flight = InFlight(out=out, specs=specs, owners=owners)
        if not specs or logits is None:
            return flight
        self._sample(logits, flight, graph_tokens)
        if flight.tokens is graph_tokens:
            flight.host_tokens = host_tokens
        flight.start_readback()
        for row, seq in enumerate(owners):
            flight.row_of_seq.setdefault(seq.seq_id, row)
        return flight

    def collect(self, flight: "InFlight") -> list[SampleResult]:
        """Read a launched step's samples back to the host: the one place the host waits for the device."""
        if not flight.specs:
            return []
        t0 = time.perf_counter()
        host = flight.finish_readback()
        self.wait_time_s += time.perf_counter() - t0
        tokens = host[0].tolist()
        if flight.logprobs is None:
            return [SampleResult(t) for t in tokens]
        chosen, vals, ids = (x.tolist() for x in host[1:])
        results = []
        for i, s in enumerate(flight.specs):
            if s.params.logprobs is None:
                results.append(SampleResult(tokens[i]))
            else:
                k = s.params.logprobs
                results.append(SampleResult(tokens[i], chosen[i], list(zip(ids[i][:k], vals[i][:k]))))
        return results

    def execute(self, out: SchedulerOutput, specs: list[SampleSpec], owners: list[Any] | None = None
                ) -> list[SampleResult]:
        return self.collect(self.launch(out, specs, owners or [None] * len(specs)))

    def _graphable(self, out: SchedulerOutput) -> bool:
        assert self.graphs is not None
        return (all(it.num_new_tokens == 1 for it in out.items)
                and self.graphs.size_for(len(out.items)) is not None)

    def _run_graph(self, out: SchedulerOutput, prev: "InFlight | None") -> torch.Tensor:
        assert self.graphs is not None
        return self.graphs.run(out.items, prev, self)

    def _sample(self, logits: torch.Tensor, flight: "InFlight", graph_tokens: torch.Tensor | None = None) -> None:
        """Sample one token per spec; ``graph_tokens``: the argmax the decode graph already took (GREEDY_IN_GRAPH)."""
        specs = flight.specs
        p = [s.params for s in specs]
        if all(x.temperature == 0 for x in p) and all(x.logprobs is None for x in p):
            # Greedy batch: one kernel (or none), no sampling tensors to build.
            flight.tokens = graph_tokens if graph_tokens is not None else logits.argmax(dim=-1)
            return
        logits = logits.float()
        st = SamplingTensors.build(
            temperature=[x.temperature for x in p], top_k=[x.top_k for x in p], top_p=[x.top_p for x in p],
            min_p=[x.min_p for x in p], seeds=[s.seed for s in specs], steps=[s.step for s in specs],
            device=logits.device,
        )
        flight.tokens = sample(logits, st)
        want = [x.logprobs for x in p if x.logprobs is not None]
        if want:
            flight.logprobs = logprobs_topk(logits, flight.tokens, max(want))


@dataclass
class InFlight:
    """A launched step whose sampled tokens may still be on the device."""
    out: SchedulerOutput
    specs: list[SampleSpec]
    owners: list[Any]
    tokens: torch.Tensor | None = None
    logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    row_of_seq: dict[int, int] = field(default_factory=dict)
    host_tokens: torch.Tensor | None = None   # where the decode graph wrote the tokens to host memory itself
    _host: list[torch.Tensor] = field(default_factory=list)
    _done: "torch.cuda.Event | None" = None

    def start_readback(self) -> None:
        """Enqueue the samples' copy to pinned host memory right behind the sampling kernels, with an event after
        it. A plain `.tolist()` later would wait for the whole stream, including the next step already enqueued
        behind this one, and the device would idle while the host read and scheduled. Tokens the graph wrote to
        its host ring (``host_tokens``) need the event alone."""
        assert self.tokens is not None
        if self.host_tokens is not None and self.logprobs is None:
            # Nothing to copy now: finish_readback copies the ring row out after the event.
            if self.tokens.device.type == "cuda":
                self._done = torch.cuda.Event()
                self._done.record()
            return
        dev = [self.tokens, *(self.logprobs or ())]
        if self.tokens.device.type != "cuda":
            # A copy, as on CUDA: the tokens may be the decode graph's input buffer, which the next step rewrites.
            self._host = [t.clone() for t in dev]
            return
        self._host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in dev]
        for h, d in zip(self._host, dev):
            h.copy_(d, non_blocking=True)
        self._done = torch.cuda.Event()
        self._done.record()

    def finish_readback(self) -> list[torch.Tensor]:
        """The samples on the host: waits for this step's copy alone, not for any step enqueued after it."""
        if self._done is not None:
            self._done.synchronize()
        if self.host_tokens is not None and not self._host:
            # A view of the ring, which a later replay rewrites: copy it out now (the host's own memory, no device op).
            self._host = [self.host_tokens.clone()]
        return self._host
