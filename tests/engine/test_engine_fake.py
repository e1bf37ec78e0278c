"""Engine behaviour on the cache-hashing stand-in model: batching, prefix reuse, merging, preemption, n > 1."""
import copy
import random

import pytest

from highspeed.sampling import SamplingParams
from tests.engine.fake_model import install_eager_graphs, make_engine, run_all


def _prompts(seed, n, lo=3, hi=60, shared=0):
    rng = random.Random(seed)
    pre = [rng.randrange(1, 60) for _ in range(shared)]
    return [pre + [rng.randrange(1, 60) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


def _tokens(done):
    return {k: [o.token_ids for o in v.outputs] for k, v in done.items()}


def greedy(n=12):
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def test_alone_equals_batched(tmp_path):
    prompts = _prompts(0, 6)
    alone = {}
    for i, p in enumerate(prompts):
        e = make_engine(tmp_path, enable_prefix_caching=False)
        alone[f"r{i}"] = _tokens(run_all(e, [p], [greedy()]))["r0"]
    e = make_engine(tmp_path, max_num_batched_tokens=32, block_size=4)
    assert _tokens(run_all(e, prompts, [greedy()] * len(prompts))) == alone
    e.pool.check_whole()
    assert e.pool.num_free_blocks == e.pool.num_blocks


def test_prefix_cache_saves_prompt_compute(tmp_path):
    prompts = _prompts(1, 8, shared=40)
    off = make_engine(tmp_path, enable_prefix_caching=False, enable_request_merging=False, block_size=4)
    r_off = run_all(off, prompts, [greedy()] * 8)
    on = make_engine(tmp_path, block_size=4)
    r_on = run_all(on, prompts, [greedy()] * 8)
    assert _tokens(r_on) == _tokens(r_off)
    total = sum(len(p) for p in prompts)
    assert off.scheduler.prompt_tokens_computed == total
    # The 40-token shared prefix (10 blocks) is computed once; the others reuse it.
    assert on.scheduler.prompt_tokens_computed <= total - 7 * 40
    assert sum(o.usage.cached_tokens for o in r_on.values()) >= 7 * 40
    assert on.stats()["prefix_cache_hits"] >= 7 * 40


def test_identical_requests_computed_once(tmp_path):
    p = _prompts(2, 1)[0]
    e = make_engine(tmp_path, enable_prefix_caching=False)
    done = run_all(e, [p] * 5, [greedy()] * 5)
    assert e.scheduler.prompt_tokens_computed == len(p)
    assert e.merged_requests == 4
    toks = _tokens(done)
    assert all(v == toks["r0"] for v in toks.values())


def test_n_forks_after_one_prefill(tmp_path):
    p = _prompts(3, 1, lo=21, hi=22)[0]
    e = make_engine(tmp_path, block_size=4, enable_prefix_caching=False)
    sp = SamplingParams(n=4, max_tokens=8, temperature=1.0, seed=5, ignore_eos=True)
    done = run_all(e, [p], [sp])["r0"]
    assert e.scheduler.prompt_tokens_computed == len(p)
    assert len(done.outputs) == 4 and all(len(o.token_ids) == 8 for o in done.outputs)
    e.pool.check_whole()
    assert e.pool.num_free_blocks == e.pool.num_blocks


def test_preemption_keeps_greedy_results(tmp_path):
    prompts = _prompts(4, 6, lo=10, hi=30)
    ref = _tokens(run_all(make_engine(tmp_path, block_size=4), prompts, [greedy(20)] * 6))
    small = make_engine(tmp_path, block_size=4, num_kv_blocks=14)
    got = _tokens(run_all(small, prompts, [greedy(20)] * 6))
    assert got == ref
    assert small.scheduler.num_preemptions > 0
    small.pool.check_whole()
    assert small.pool.num_free_blocks == small.pool.num_blocks


def test_request_that_never_fits_is_rejected(tmp_path):
    e = make_engine(tmp_path, block_size=4, num_kv_blocks=4)
    with pytest.raises(ValueError, match="KV cache"):
        e.add_request("x", list(range(1, 15)), greedy(8))
    assert not e.has_unfinished_requests()


def test_seeded_sampling_is_batch_invariant(tmp_path):
    prompts = _prompts(5, 4)
    sp = [SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=i, ignore_eos=True) for i in range(4)]
    alone = {}
    for i, p in enumerate(prompts):
        alone[f"r{i}"] = _tokens(run_all(make_engine(tmp_path), [p], [copy.copy(sp[i])]))["r0"]
    assert _tokens(run_all(make_engine(tmp_path), prompts, sp)) == alone


def test_stop_strings_and_tokens(tmp_path):
    e = make_engine(tmp_path)
    p = _prompts(6, 1)[0]
    full = run_all(e, [p], [greedy(10)])["r0"].outputs[0]
    third = full.token_ids[2]
    e2 = make_engine(tmp_path)
    out = run_all(e2, [p], [SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, stop_token_ids=[third])])
    o = out["r0"].outputs[0]
    assert o.finish_reason == "stop" and o.stop_reason == third and o.token_ids == full.token_ids[:3]
    e3 = make_engine(tmp_path)
    stop = f"<{full.token_ids[3]}>"
    o = run_all(e3, [p], [SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, stop=[stop])])["r0"].outputs[0]
    assert o.finish_reason == "stop" and stop not in o.text and o.text == full.text[:full.text.find(stop)]


def test_abort_frees_blocks(tmp_path):
    e = make_engine(tmp_path, block_size=4)
    e.add_request("a", _prompts(7, 1)[0], greedy(50))
    e.step()
    e.step()
    assert e.pool.num_used_blocks > 0
    e.abort_request("a")
    assert not e.has_unfinished_requests()
    e.pool.release([])
    # Only cached (reusable) blocks remain, nothing is in use.
    assert all(r == 0 for r in e.pool.ref)
    e.pool.check_whole()


@pytest.mark.parametrize("blocks", [None, 14])
def test_overlapped_steps_give_the_same_tokens(tmp_path, blocks):
    """Step N+1 enqueued before step N's tokens are read: same greedy tokens, stops noticed late drop the
    extra token, and nothing leaks."""
    prompts = _prompts(8, 6, lo=10, hi=30)
    params = [SamplingParams(max_tokens=20, temperature=0, ignore_eos=True) for _ in prompts]
    ref = _tokens(run_all(make_engine(tmp_path, block_size=4), prompts, params))
    e = make_engine(tmp_path, block_size=4, num_kv_blocks=blocks, async_scheduling=True)
    assert _tokens(run_all(e, prompts, [copy.copy(p) for p in params])) == ref
    e.drain()
    e.pool.check_whole()
    assert e.pool.num_free_blocks == e.pool.num_blocks
    # A stop token noticed one step late: the output still ends at the stop.
    stop_at = ref["r0"][0][4]
    e2 = make_engine(tmp_path, block_size=4, async_scheduling=True)
    o = run_all(e2, [prompts[0]], [SamplingParams(max_tokens=20, temperature=0, ignore_eos=True,
                                                  stop_token_ids=[stop_at])])["r0"].outputs[0]
    assert o.token_ids == ref["r0"][0][:ref["r0"][0].index(stop_at) + 1]
    e2.drain()
    assert all(r == 0 for r in e2.pool.ref)


def test_priority_runs_first_and_waits_are_bounded(tmp_path):
    # One sequence at a time: the order of first tokens is the admission order.
    e = make_engine(tmp_path, block_size=4, max_num_seqs=1, max_wait_steps=3)
    first_token_order = []
    e.add_request("low", _prompts(9, 1)[0], greedy(3), priority=5)
    e.add_request("high", _prompts(10, 1)[0], greedy(3), priority=0)
    while e.has_unfinished_requests():
        for o in e.step():
            if o.outputs[0].token_ids and o.request_id not in first_token_order:
                first_token_order.append(o.request_id)
    assert first_token_order == ["high", "low"]

    # A request sharing no cached prefix is not starved by a stream of requests that hit the cache.
    e = make_engine(tmp_path, block_size=4, max_num_seqs=1, max_wait_steps=3)
    shared = _prompts(11, 1, lo=20, hi=21)[0]
    run_all(e, [shared + [1]], [greedy(1)])                  # warm the prefix cache
    e.add_request("loner", _prompts(12, 1)[0], greedy(2))
    started, step = None, 0
    for i in range(30):
        e.add_request(f"hit{i}", shared + [2 + i], greedy(2))
        for o in e.step():
            if o.request_id == "loner" and started is None:
                started = step
        step += 1
    assert started is not None and started <= 3 + 3, f"the loner waited {started} steps"
    while e.has_unfinished_requests():
        e.step()
    e.pool.check_whole()


def test_graph_host_ring_survives_replays_outside_the_engine(tmp_path):
    """Greedy graph steps return their tokens through the decoder's host ring (row = a replay count on the device).
    Replays the engine does not make (a benchmark's, after freeze()) move that count; the next refill of the inputs
    sets it back to the host's, so a later batch still reads its own tokens."""
    prompts = _prompts(21, 3, lo=5, hi=20)
    params = [SamplingParams(max_tokens=10, temperature=0, ignore_eos=True) for _ in prompts]
    ref = _tokens(run_all(make_engine(tmp_path, block_size=4), prompts, [copy.copy(p) for p in params]))
    e = make_engine(tmp_path, block_size=4, async_scheduling=True, enable_prefix_caching=False)
    install_eager_graphs(e)
    dec = e.runner.graphs
    assert dec.ring is not None
    assert _tokens(run_all(e, prompts, [copy.copy(p) for p in params])) == ref
    steps = e.runner.graph_steps
    dec.freeze()
    for _ in range(3):
        dec.graphs[4].replay()
    assert _tokens(run_all(e, prompts, [copy.copy(p) for p in params])) == ref
    assert e.runner.graph_steps >= 2 * steps > 0


@pytest.mark.parametrize("in_graph", [True, False])
@pytest.mark.parametrize("blocks", [None, 20])
def test_graph_decode_buffers_track_every_step(tmp_path, monkeypatch, blocks, in_graph):
    """The decode-graph path (static buffers advanced on the device in steady decode -- by the graph's own tail,
    GREEDY_IN_GRAPH, or by the host -- refilled when the batch changes) with overlapped steps gives the plain
    path's tokens, across prefix hits, joins and preemption."""
    import highspeed.engine.runner as runner

    monkeypatch.setattr(runner, "GREEDY_IN_GRAPH", in_graph)
    prompts = _prompts(13, 7, lo=5, hi=30, shared=8)
    params = [SamplingParams(max_tokens=24, temperature=0, ignore_eos=True) for _ in prompts]
    ref = _tokens(run_all(make_engine(tmp_path, block_size=4), prompts, [copy.copy(p) for p in params]))
    e = make_engine(tmp_path, block_size=4, num_kv_blocks=blocks, async_scheduling=True, max_num_batched_tokens=24)
    install_eager_graphs(e)
    assert _tokens(run_all(e, prompts, params)) == ref
    assert e.runner.graph_steps > 20
    e.drain()
    e.pool.check_whole()
