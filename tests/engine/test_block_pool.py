"""The block pool and prefix tree: reference counts, LRU eviction, prefix matching."""
import pytest

from highspeed.engine.kv_cache import BlockPool


def test_allocate_release_whole():
    pool = BlockPool(8, 4)
    a = pool.allocate(3)
    b = pool.allocate(5)
    assert pool.num_free_blocks == 0
    with pytest.raises(RuntimeError):
        pool.allocate(1)
    pool.release(a)
    pool.release(b)
    assert pool.num_free_blocks == 8
    pool.check_whole()


def test_prefix_match_and_lru_eviction():
    pool = BlockPool(4, 2)
    toks = [1, 2, 3, 4, 5]
    blocks = pool.allocate(3)
    n1 = pool.register(None, (1, 2), blocks[0])
    n2 = pool.register(n1, (3, 4), blocks[1])
    assert n2 is not None
    pool.release(blocks)
    # Two full blocks are cached; the partial third is free.
    assert len(pool.evictable) == 2 and pool.num_free_blocks == 4
    match = pool.match_prefix(toks)
    assert [n.block for n in match] == blocks[:2]
    # A prompt that is exactly the cached tokens keeps its last block to compute (it needs logits).
    assert len(pool.match_prefix([1, 2, 3, 4])) == 1
    # Taking the match pins the blocks; allocating the rest never evicts them.
    pool.take([n.block for n in match])
    pool.allocate(2)
    with pytest.raises(RuntimeError):
        pool.allocate(1)
    pool.check_whole()


def test_eviction_frees_deepest_first():
    pool = BlockPool(3, 1)
    b = pool.allocate(3)
    n = None
    for i, blk in enumerate(b):
        n = pool.register(n, (i,), blk)
    pool.release(b)
    pool.allocate(1)           # evicts the deepest block (released first)
    assert len(pool.match_prefix([0, 1, 2, 9])) == 2
    assert pool.stats.evicted_blocks == 1
    pool.check_whole()


def test_duplicate_registration_is_refused():
    pool = BlockPool(4, 2)
    a, b = pool.allocate(2)
    assert pool.register(None, (7, 7), a) is not None
    assert pool.register(None, (7, 7), b) is None
    pool.release([a, b])
    pool.check_whole()
    assert pool.num_free_blocks == 4
