"""Property tests: random arrivals, lengths, cancellations and pool sizes never lose a request or leak a block."""
from hypothesis import HealthCheck, given, settings, strategies as st

from highspeed.sampling import SamplingParams
from tests.engine.fake_model import make_engine

request = st.tuples(
    st.integers(0, 12),                       # arrival step
    st.lists(st.integers(1, 60), min_size=1, max_size=40),   # prompt
    st.integers(1, 12),                       # max_tokens
    st.one_of(st.none(), st.integers(0, 30)),  # cancel after this many steps (None = never)
    st.integers(1, 3),                        # n
    st.booleans(),                            # greedy
    st.integers(0, 2),                        # priority
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(reqs=st.lists(request, min_size=1, max_size=10), blocks=st.integers(16, 64), block_size=st.sampled_from([2, 4, 8]),
       budget=st.integers(4, 64), prefix=st.booleans(), shared=st.lists(st.integers(1, 60), max_size=16),
       overlap=st.booleans())
def test_random_workloads_drain_cleanly(tmp_path, reqs, blocks, block_size, budget, prefix, shared, overlap):
    e = make_engine(tmp_path, num_kv_blocks=blocks, block_size=block_size, max_num_batched_tokens=budget,
                    enable_prefix_caching=prefix, max_wait_steps=8, async_scheduling=overlap)
    pending = sorted(enumerate(reqs), key=lambda x: x[1][0])
    added, cancel_at, finished, rejected = {}, {}, set(), set()
    step = 0
    while pending or e.has_unfinished_requests():
        while pending and pending[0][1][0] <= step:
            i, (_, prompt, max_tokens, cancel, n, greedy, prio) = pending.pop(0)
            rid = f"r{i}"
            sp = SamplingParams(max_tokens=max_tokens, n=n, temperature=0.0 if greedy else 1.0, seed=i,
                                ignore_eos=True)
            try:
                e.add_request(rid, (shared + prompt)[:60], sp, priority=prio)
            except ValueError:
                rejected.add(rid)
                continue
            added[rid] = sp
            if cancel is not None:
                cancel_at[rid] = step + cancel
        for rid, at in list(cancel_at.items()):
            if at <= step and rid not in finished:
                e.abort_request(rid)
                finished.add(rid)
                del cancel_at[rid]
        for out in e.step():
            if out.finished:
                assert out.request_id not in finished
                finished.add(out.request_id)
                assert len(out.outputs) == added[out.request_id].n
                for o in out.outputs:
                    assert o.finish_reason in ("length", "stop")
                    assert len(o.token_ids) <= added[out.request_id].max_tokens
        assert all(r >= 0 for r in e.pool.ref)
        step += 1
        assert step < 5000, "the engine stopped making progress"
    assert set(added) == finished
    e.drain()
    e.pool.check_whole()
    assert all(r == 0 for r in e.pool.ref)
    assert e.pool.num_free_blocks == e.pool.num_blocks
    assert not e.scheduler.running and not e.scheduler.waiting
