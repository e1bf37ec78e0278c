"""Requests and their sequences: the unit the scheduler moves between queues.

A ``Request`` is one computation: a prompt and its sampling params. It holds one ``Sequence`` until its prompt
has been prefilled; with ``n > 1`` it then forks into n sequences that share the prompt's KV blocks. Several
callers may subscribe to one Request (identical deterministic requests are computed once).
"""
from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from highspeed.outputs import Logprob, RequestMetrics
from highspeed.sampling import SamplingParams

if TYPE_CHECKING:
    from highspeed.engine.prefix_cache import RadixNode
    from highspeed.tokenizer import IncrementalDetokenizer


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_seq_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    request: "Request"
    index: int                                   # which of the request's n samples
    token_ids: list[int]
    num_prompt_tokens: int
    seed: int
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    # Prefix-cache bookkeeping: how many of block_table's leading blocks are registered in the radix tree, and
    # the tree node of the last one (the parent for the next registration).
    num_cached_blocks: int = 0
    last_node: "RadixNode | None" = None
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float = 0.0
    detok: "IncrementalDetokenizer | None" = None
    text: str = ""
    num_preemptions: int = 0
    num_placeholders: int = 0                    # trailing token ids sampled on the device, not yet read back
    prompt_hashes: list[int] | None = None       # chain hashes of the prompt's full blocks (request merging)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def in_prefill(self) -> bool:
        return self.num_computed_tokens < self.num_tokens - 1

    @property
    def is_finished(self) -> bool:
        return self.status == SeqStatus.FINISHED


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    seqs: list[Sequence] = field(default_factory=list)
    metrics: RequestMetrics = field(init=False)
    cached_tokens: int = 0                       # prompt tokens served by the prefix cache
    computed_prompt_tokens: int = 0              # prompt tokens the model actually computed (all attempts)
    forked: bool = False                         # n > 1: sequences created after the prompt's prefill
    wait_steps: int = 0                          # steps spent waiting while admissible (starvation bound)
    order: int = 0                               # arrival order, the FCFS tie-break
    subscribers: list[Any] = field(default_factory=list)
    merge_key: tuple | None = None
    base_seed: int = 0                           # the request's seed (or a drawn one); sequence i uses a mix of it

    def __post_init__(self) -> None:
        self.metrics = RequestMetrics(arrival_time=self.arrival_time)

    @property
    def is_finished(self) -> bool:
        return bool(self.seqs) and all(s.is_finished for s in self.seqs) and (self.forked or self.params.n == 1)
