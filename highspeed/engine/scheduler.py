"""The scheduler: which tokens of which sequences the next step computes.

Each step packs, under a token budget and a sequence cap:
1. every running sequence, in priority-then-arrival order: one token for a decode, or the next chunk of a
   prompt still being prefilled (chunked prefill, so a long prompt never stalls running decodes for long);
2. then waiting sequences, ordered to raise prefix-cache hits without starving anyone.

When KV blocks run out, the newest lowest-priority running sequence is preempted: its blocks are released (its
full blocks stay in the prefix cache) and it is recomputed later. No prompt is computed twice where it can be
avoided: a waiting request whose next uncached block is being computed by an in-flight prefill waits for it,
``n > 1`` forks after one prefill, and identical deterministic requests are merged by the engine before they
reach this class.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from highspeed.engine.kv_cache import BlockPool
from highspeed.engine.request import Request, Sequence, SeqStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int
    start: int                     # first position computed this step

    @property
    def samples(self) -> bool:
        """Whether this step reaches the end of the sequence's known tokens, so a new token is sampled."""
        return self.start + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    items: list[ScheduledSeq] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(i.num_new_tokens for i in self.items)

    @property
    def is_empty(self) -> bool:
        return not self.items


def _chain_hashes(token_ids: list[int], block_size: int) -> list[int]:
    """h_j identifies the whole prefix up to the end of full block j."""
    out, h = [], 0
    for j in range(len(token_ids) // block_size):
        h = hash((h, tuple(token_ids[j * block_size:(j + 1) * block_size])))
        out.append(h)
    return out


class Scheduler:
    def __init__(self, pool: BlockPool, max_num_seqs: int, max_num_batched_tokens: int,
                 max_wait_steps: int = 64, enable_request_merging: bool = True):
        self.pool = pool
        self.block_size = pool.block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_wait_steps = max_wait_steps
        self.enable_request_merging = enable_request_merging
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self._order = 0
        self.num_preemptions = 0
        self.prompt_tokens_computed = 0   # every prompt token the model computed (recomputation included)
        self._pending_copies: list[tuple[int, int]] = []   # from forks, run before the next forward

    # -- queue ------------------------------------------------------------------------------------------------
    def add(self, req: Request, seed: int) -> None:
        req.order = self._order
        self._order += 1
        seq = Sequence(request=req, index=0, token_ids=list(req.prompt_token_ids),
                       num_prompt_tokens=len(req.prompt_token_ids), seed=seed)
        req.seqs = [seq]
        self.waiting.append(seq)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @staticmethod
    def _rank(seq: Sequence) -> tuple[int, int, int]:
        return (seq.request.priority, seq.request.order, seq.index)

    # -- the step ---------------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(block_copies=self._pending_copies)
        self._pending_copies = []
        budget = self.max_num_batched_tokens
        now = time.monotonic()

        # 1. Running sequences first, best rank first; victims of preemption come from the other end.
        self.running.sort(key=self._rank)
        i = 0
        while i < len(self.running) and budget > 0 and len(out.items) < self.max_num_seqs:
            seq = self.running[i]
            max_tokens = seq.request.params.max_tokens
            if max_tokens is not None and seq.num_output_tokens >= max_tokens:
                i += 1   # its last token is still in flight; it finishes when that is read back
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            need = self.blocks_for(seq.num_computed_tokens + n) - len(seq.block_table)
            while need > self.pool.num_free_blocks and self.running[-1] is not seq:
                self._preempt(self.running.pop(), out)
            if need > self.pool.num_free_blocks:
                self.running.pop()
                self._preempt(seq, out)
                break
            seq.block_table += self.pool.allocate(need)
            out.items.append(ScheduledSeq(seq, n, seq.num_computed_tokens))
            budget -= n
            i += 1

        # 2. Waiting sequences, unless this step had to preempt (then memory is short: admit nothing).
        if not out.preempted:
            self._admit(out, budget, now)
        return out

    def _admit(self, out: SchedulerOutput, budget: int, now: float) -> None:
        if not self.waiting:
            return
        # Prefixes being computed right now by prompts still in prefill: a waiting request whose next uncached
        # block is one of them waits for it to land in the prefix cache instead of computing it again.
        inflight: set[int] = set()
        if self.enable_request_merging:
            for s in self.running:
                if s.in_prefill:
                    inflight.update(self._hashes(s))

        matches: dict[int, list] = {}
        for seq in self.waiting:
            matches[seq.seq_id] = self.pool.match_prefix(seq.token_ids)

        def order(seq: Sequence) -> tuple:
            req = seq.request
            overdue = req.wait_steps >= self.max_wait_steps
            # Overdue requests go first, in arrival order; otherwise longer cached prefixes go first, so
            # requests sharing a prefix run together while it is still cached.
            return (req.priority, not overdue, 0 if overdue else -len(matches[seq.seq_id]), req.order, seq.index)

        admitted: list[Sequence] = []
        for seq in sorted(self.waiting, key=order):
            if budget <= 0 or len(self.running) + len(admitted) >= self.max_num_seqs:
                break
            req = seq.request
            nodes = matches[seq.seq_id]
            overdue = req.wait_steps >= self.max_wait_steps
            if inflight and not overdue and seq.num_computed_tokens == 0:
                hashes = self._hashes(seq)
                if len(nodes) < len(hashes) and hashes[len(nodes)] in inflight:
                    continue   # its prefix is being computed: share it once that prefill is done
            cached = len(nodes) * self.block_size
            n = min(seq.num_tokens - cached, budget)
            need = self.blocks_for(cached + n) - len(nodes)
            reusable_free = sum(1 for nd in nodes if self.pool.ref[nd.block] == 0)
            if need > self.pool.num_free_blocks - reusable_free:
                break   # keep arrival order under memory pressure: don't let later requests jump ahead
            blocks = [nd.block for nd in nodes]
            self.pool.take(blocks)
            seq.block_table = blocks + self.pool.allocate(need)
            seq.num_computed_tokens = cached
            seq.num_cached_blocks = len(nodes)
            seq.last_node = nodes[-1] if nodes else None
            if seq.num_preemptions == 0 and seq.index == 0:
                self.pool.record_query(seq.num_prompt_tokens, cached)
                req.cached_tokens = cached
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = now
            seq.status = SeqStatus.RUNNING
            out.items.append(ScheduledSeq(seq, n, cached))
            admitted.append(seq)
            budget -= n
            if self.enable_request_merging:
                inflight.update(self._hashes(seq))

        if admitted:
            ids = {s.seq_id for s in admitted}
            self.waiting = [s for s in self.waiting if s.seq_id not in ids]
            self.running.extend(admitted)
        for s in self.waiting:
            s.request.wait_steps += 1

    def _hashes(self, seq: Sequence) -> list[int]:
        if seq.prompt_hashes is None:
            seq.prompt_hashes = _chain_hashes(seq.token_ids[:seq.num_prompt_tokens], self.block_size)
        return seq.prompt_hashes

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        """Release a running sequence's blocks; it is recomputed (reusing its cached prefix) when readmitted."""
        out.items = [it for it in out.items if it.seq is not seq]
        self.pool.release(seq.block_table)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_cached_blocks = 0
        seq.last_node = None
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        out.preempted.append(seq)
        self.waiting.insert(0, seq)

    # -- after the step ---------------------------------------------------------------------------------------
    def update(self, out: SchedulerOutput) -> None:
        """Account for the tokens the step computed and register newly full blocks in the prefix cache."""
        for it in out.items:
            seq = it.seq
            prompt_part = max(0, min(it.start + it.num_new_tokens, seq.num_prompt_tokens) - it.start)
            self.prompt_tokens_computed += prompt_part
            seq.request.computed_prompt_tokens += prompt_part
            seq.num_computed_tokens = it.start + it.num_new_tokens
            self.register_full_blocks(seq)

    def register_full_blocks(self, seq: Sequence) -> None:
        bs = self.block_size
        # Only blocks whose tokens the host knows (a placeholder's real token is still on the device).
        full = min(seq.num_computed_tokens, seq.num_tokens - seq.num_placeholders) // bs
        while seq.num_cached_blocks < full:
            j = seq.num_cached_blocks
            if j > 0 and seq.last_node is None:
                return   # an earlier block of this path is held by another sequence's copy: stop here
            node = self.pool.register(seq.last_node, tuple(seq.token_ids[j * bs:(j + 1) * bs]), seq.block_table[j])
            if node is None:
                seq.num_cached_blocks = full   # duplicate prefix: keep these blocks private
                seq.last_node = None
                return
            seq.last_node = node
            seq.num_cached_blocks += 1

    def fork(self, seq: Sequence, n: int, seeds: list[int]) -> list[Sequence]:
        """Turn a prefilled sequence into n sequences sharing its KV blocks (copy-on-write for the partial
        last block). The copies are executed by the runner before the next forward, which is the first one
        that can write into the parent's partial block."""
        req = seq.request
        children = []
        full = seq.num_computed_tokens // self.block_size
        for i in range(1, n):
            shared = seq.block_table[:full]
            self.pool.take(shared)
            table = list(shared)
            if len(seq.block_table) > full:
                (fresh,) = self.pool.allocate(1) if self.pool.num_free_blocks else (None,)
                if fresh is None:   # no room to copy: this child recomputes from the prefix cache later
                    self.pool.release(shared)
                    child = self._new_child(seq, i, seeds[i])
                    child.status = SeqStatus.WAITING
                    self.waiting.append(child)
                    children.append(child)
                    continue
                self._pending_copies.append((seq.block_table[full], fresh))
                table.append(fresh)
            child = self._new_child(seq, i, seeds[i])
            child.block_table = table
            child.num_computed_tokens = seq.num_computed_tokens
            child.num_cached_blocks = min(seq.num_cached_blocks, full)
            child.last_node = seq.last_node if child.num_cached_blocks == seq.num_cached_blocks else None
            child.status = SeqStatus.RUNNING
            self.running.append(child)
            children.append(child)
        req.seqs = [seq] + children
        req.forked = True
        return children

    @staticmethod
    def _new_child(seq: Sequence, index: int, seed: int) -> Sequence:
        child = Sequence(request=seq.request, index=index, token_ids=seq.token_ids[:seq.num_prompt_tokens],
                         num_prompt_tokens=seq.num_prompt_tokens, seed=seed)
        child.logprobs = [] if seq.logprobs is not None else None
        return child

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        if seq.is_finished:
            return
        seq.status = SeqStatus.FINISHED
        if seq.num_placeholders:
            del seq.token_ids[-seq.num_placeholders:]
            seq.num_placeholders = 0
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.pool.release(seq.block_table)
        seq.block_table = []

    def abort(self, req: Request) -> None:
        for seq in req.seqs:
            self.finish(seq, "abort")
