"""Per-step attention metadata, set by the runner and read by attention layers.

One object per forward step instead of threading lengths and block tables through every layer call
(the nano-vllm pattern). Imports nothing of the project: models and engine both read it.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch


@dataclass
class AttentionContext:
    """Describes the flattened batch of one forward step.

    Tokens of all sequences are concatenated into one dimension T. Sequence i owns query rows
    ``query_start_loc[i]:query_start_loc[i+1]``; its queries sit at the last ``query_lens[i]`` positions of a
    context of ``seq_lens[i]`` tokens (cached + new).
    """

    query_lens: list[int]                 # host copy, new tokens per sequence
    seq_lens: list[int]                   # host copy, total context per sequence after this step
    query_start_loc: torch.Tensor         # [S+1] int32 on device, cumulative query_lens
    seq_lens_t: torch.Tensor              # [S] int32 on device
    slot_mapping: torch.Tensor | None = None   # [T] int64: cache slot (block * block_size + offset) per new token
    block_tables: torch.Tensor | None = None   # [S, max_blocks] int32, padded with 0
    block_size: int = 16
    max_query_len: int = 0
    max_seq_len: int = 0
    # True when every sequence contributes exactly one query token (pure decode step).
    decode_only: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def num_seqs(self) -> int:
        # From the device tensor's shape, not the host list: valid inside a captured CUDA graph too.
        return self.query_start_loc.shape[0] - 1

    @property
    def uses_cache(self) -> bool:
        """False for cache-less forwards (training, oracle tests): attention then sees only this step's tokens."""
        return self.slot_mapping is not None


_CONTEXT: AttentionContext | None = None


def get_context() -> AttentionContext:
    if _CONTEXT is None:
        raise RuntimeError("no attention context is set; wrap the forward in highspeed.context.use_context(...)")
    return _CONTEXT


def set_context(ctx: AttentionContext | None) -> None:
    global _CONTEXT
    _CONTEXT = ctx


@contextmanager
def use_context(ctx: AttentionContext) -> Iterator[AttentionContext]:
    prev = _CONTEXT
    set_context(ctx)
    try:
        yield ctx
    finally:
        set_context(prev)


def prefill_context(lengths: list[int], device: torch.device | str = "cpu") -> AttentionContext:
    """Cache-less context for full-sequence forwards of the given lengths (no KV cache written)."""
    qsl = [0]
    for n in lengths:
        qsl.append(qsl[-1] + n)
    return AttentionContext(
        query_lens=list(lengths),
        seq_lens=list(lengths),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        seq_lens_t=torch.tensor(lengths, dtype=torch.int32, device=device),
        max_query_len=max(lengths) if lengths else 0,
        max_seq_len=max(lengths) if lengths else 0,
    )
