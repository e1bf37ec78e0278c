"""Prometheus metrics, named as vLLM and SGLang name theirs (prefix ``highspeed:``) so dashboards carry over.

Per-request figures (latencies, token counts, finish reasons) are recorded by the server when a request ends.
Engine state (queue lengths, KV usage, prefix-cache counters) is read at scrape time from the async engine's
stats snapshot, so a scrape never calls into the engine thread.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from highspeed.outputs import RequestOutput

# Latency buckets (seconds) as vLLM uses them: fine below 100 ms where decode lives, coarse up to minutes.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                480.0, 960.0, 1920.0, 7680.0)

# LLMEngine.stats() keys -> exported gauges. A key the engine does not report is simply not exported.
_GAUGES: tuple[tuple[str, str, str], ...] = (
    ("num_requests_running", "highspeed:num_requests_running", "Requests with sequences in the running batch."),
    ("num_requests_waiting", "highspeed:num_requests_waiting", "Requests waiting to be scheduled."),
    ("kv_cache_usage", "highspeed:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full)."),
    ("prefix_cache_hit_rate", "highspeed:prefix_cache_hit_rate",
     "Prompt tokens served from the prefix cache over prompt tokens looked up, since start."),
    ("num_free_kv_blocks", "highspeed:kv_cache_free_blocks", "Free KV-cache blocks (cached-but-unused count as free)."),
    ("num_kv_blocks", "highspeed:kv_cache_total_blocks", "KV-cache blocks in the pool."),
    ("frontend_in_flight", "highspeed:num_requests_in_flight", "Requests the HTTP front end is serving."),
)
_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("prefix_cache_queries", "highspeed:prefix_cache_queries", "Prompt tokens looked up in the prefix cache."),
    ("prefix_cache_hits", "highspeed:prefix_cache_hits", "Prompt tokens found in the prefix cache."),
    ("prefix_cache_evicted_blocks", "highspeed:prefix_cache_evicted_blocks", "Cached blocks evicted for reuse."),
    ("num_preemptions", "highspeed:num_preemptions", "Sequences preempted for lack of KV blocks."),
    ("prompt_tokens_computed", "highspeed:prompt_tokens_computed",
     "Prompt tokens the model actually computed (the rest came from the prefix cache or merging)."),
    ("merged_requests", "highspeed:merged_requests", "Requests served by joining an identical one in flight."),
    ("num_steps", "highspeed:engine_steps", "Engine steps run."),
)


class _EngineStatsCollector(Collector):
    def __init__(self, stats: Callable[[], dict[str, Any]]):
        self._stats = stats

    def collect(self) -> Iterable[Metric]:
        stats = self._stats()
        for key, name, doc in _GAUGES:
            if isinstance(stats.get(key), (int, float)):
                yield GaugeMetricFamily(name, doc, value=float(stats[key]))
        for key, name, doc in _COUNTERS:
            if isinstance(stats.get(key), (int, float)):
                yield CounterMetricFamily(name, doc, value=float(stats[key]))


class ServerMetrics:
    """One registry per app, so several apps in one process (tests) never collide."""

    def __init__(self, stats: Callable[[], dict[str, Any]]):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.request_success = Counter("highspeed:request_success", "Finished requests by finish reason.",
                                       ["finished_reason"], registry=r)
        self.request_errors = Counter("highspeed:request_errors", "Requests answered with an error, by HTTP status.",
                                      ["status"], registry=r)
        self.prompt_tokens = Counter("highspeed:prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.generation_tokens = Counter("highspeed:generation_tokens", "Generated tokens of finished requests.",
                                         registry=r)
        self.ttft = Histogram("highspeed:time_to_first_token_seconds", "Arrival to first generated token.",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("highspeed:time_per_output_token_seconds",
                              "Mean time between generated tokens of one request (after the first).",
                              buckets=_TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("highspeed:e2e_request_latency_seconds", "Arrival to last token.",
                             buckets=_E2E_BUCKETS, registry=r)
        self.queue_time = Histogram("highspeed:request_queue_time_seconds", "Arrival to first scheduled.",
                                    buckets=_TTFT_BUCKETS, registry=r)
        r.register(_EngineStatsCollector(stats))

    def observe_finished(self, out: RequestOutput, finished_reason: str | None = None) -> None:
        """Record one engine request that ended (``finished_reason`` overrides, e.g. 'abort' on disconnect)."""
        # One count per request, as vLLM counts; with n > 1 the first choice's reason stands for the request.
        reason = finished_reason or next((c.finish_reason for c in out.outputs if c.finish_reason), "abort")
        self.request_success.labels(finished_reason=reason).inc()
        self.prompt_tokens.inc(out.usage.prompt_tokens)
        self.generation_tokens.inc(out.usage.completion_tokens)
        m = out.metrics
        for hist, value in ((self.ttft, m.time_to_first_token), (self.e2e, m.e2e_latency),
                            (self.queue_time, m.queue_time)):
            if value is not None and value >= 0:
                hist.observe(value)
        longest = max((len(c.token_ids) for c in out.outputs), default=0)
        tpot = m.time_per_output_token(longest)
        if tpot is not None and tpot >= 0:
            self.tpot.observe(tpot)

    def observe_abort(self) -> None:
        """A request that ended before producing anything (its client left while it waited)."""
        self.request_success.labels(finished_reason="abort").inc()

    def observe_error(self, status: int) -> None:
        self.request_errors.labels(status=str(status)).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
