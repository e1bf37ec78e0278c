"""The paged KV cache: one pool of fixed-size blocks, reference counts, and LRU eviction of cached blocks.

A block is in exactly one of three states: *free* (holds nothing useful), *in use* (ref > 0: some running
sequence's block table names it) or *cached* (ref == 0 but registered in the prefix tree, so a later request
may reuse it). Cached blocks are evicted least recently released first, only when a fresh block is needed.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

import torch
from torch import nn

from highspeed.engine.prefix_cache import RadixNode, RadixTree


@dataclass
class PrefixCacheStats:
    queries: int = 0          # prompt tokens looked up
    hits: int = 0             # of those, tokens found cached
    query_requests: int = 0
    hit_requests: int = 0
    evicted_blocks: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref = [0] * num_blocks
        self.free: deque[int] = deque(range(num_blocks))
        self.evictable: OrderedDict[int, None] = OrderedDict()
        self.tree = RadixTree(block_size)
        self.stats = PrefixCacheStats()

    # -- accounting -------------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks obtainable now: free ones plus cached ones nobody uses."""
        return len(self.free) + len(self.evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def check_whole(self) -> None:
        """Invariant check for tests: every block accounted for exactly once."""
        assert all(r >= 0 for r in self.ref), "negative reference count"
        in_use = [b for b in range(self.num_blocks) if self.ref[b] > 0]
        free, evictable = set(self.free), set(self.evictable)
        assert len(free) == len(self.free), "a block is free twice"
        assert not (free & evictable), "a block is both free and cached"
        assert not (free & set(in_use)) and not (evictable & set(in_use)), "a block in use is also free"
        assert len(free) + len(evictable) + len(in_use) == self.num_blocks, "a block leaked"
        assert evictable <= set(self.tree.node_of_block), "an evictable block is not in the prefix tree"

    # -- allocation -------------------------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        if n > self.num_free_blocks:
            raise RuntimeError(f"asked for {n} KV blocks, {self.num_free_blocks} free")
        out = []
        for _ in range(n):
            if not self.free:
                self._evict_one()
            b = self.free.popleft()
            self.ref[b] = 1
            out.append(b)
        return out

    def _evict_one(self) -> None:
        block, _ = self.evictable.popitem(last=False)
        # Descendants of an evictable node are evictable too (a sequence holding a child holds its parent).
        for b in self.tree.remove_subtree(self.tree.node_of_block[block]):
            self.evictable.pop(b, None)
            self.free.append(b)
            self.stats.evicted_blocks += 1

    def take(self, blocks: list[int]) -> None:
        """Add a reference to blocks found in the prefix cache (or shared by a fork)."""
        for b in blocks:
            if self.ref[b] == 0:
                self.evictable.pop(b)
            self.ref[b] += 1

    def release(self, blocks: list[int]) -> None:
        # Last block first, so deeper (longer-prefix) blocks are evicted before the prefixes they extend.
        for b in reversed(blocks):
            self.ref[b] -= 1
            assert self.ref[b] >= 0, f"block {b} released twice"
            if self.ref[b] == 0:
                if b in self.tree.node_of_block:
                    self.evictable[b] = None
                else:
                    self.free.append(b)

    # -- prefix cache -----------------------------------------------------------------------------------------
    def match_prefix(self, token_ids: list[int]) -> list[RadixNode]:
        """Longest cached prefix of full blocks, always leaving at least one token to compute (its logits)."""
        if not self.enable_prefix_caching:
            return []
        max_blocks = (len(token_ids) - 1) // self.block_size
        return self.tree.match(token_ids, max_blocks)

    def record_query(self, num_tokens: int, hit_tokens: int) -> None:
        self.stats.queries += num_tokens
        self.stats.hits += hit_tokens
        self.stats.query_requests += 1
        self.stats.hit_requests += hit_tokens > 0

    def register(self, parent: RadixNode | None, key: tuple[int, ...], block: int) -> RadixNode | None:
        if not self.enable_prefix_caching:
            return None
        return self.tree.insert(parent, key, block)

    def reset_prefix_cache(self) -> None:
        """Forget every cached block that nobody uses (e.g. after weights change)."""
        while self.evictable:
            self._evict_one()


# -- device tensors -------------------------------------------------------------------------------------------
def cache_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "cache_spec") and callable(m.cache_spec)]


def cache_bytes_per_token(model: nn.Module, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    total = 0
    for m in cache_modules(model):
        for shape in m.cache_spec().values():
            n = 1
            for d in shape:
                n *= d
            total += n * elem
    return total


def allocate_kv_caches(model: nn.Module, num_blocks: int, block_size: int, dtype: torch.dtype,
                       device: torch.device) -> int:
    """Give every caching module its ``kv_caches`` tensors; return the bytes allocated."""
    total = 0
    for m in cache_modules(model):
        caches = {}
        for name, shape in m.cache_spec().items():
            t = torch.zeros((num_blocks, block_size, *shape), dtype=dtype, device=device)
            caches[name] = t
            total += t.numel() * t.element_size()
        m.kv_caches = caches
    return total


def copy_blocks(model: nn.Module, pairs: list[tuple[int, int]]) -> None:
    """Copy whole KV blocks src -> dst in every cache (copy-on-write for forked sequences)."""
    if not pairs:
        return
    src = torch.tensor([p[0] for p in pairs], dtype=torch.long)
    dst = torch.tensor([p[1] for p in pairs], dtype=torch.long)
    for m in cache_modules(model):
        for t in m.kv_caches.values():
            t[dst.to(t.device)] = t[src.to(t.device)]
