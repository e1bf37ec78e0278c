"""``python -m highspeed serve`` as a real process, driven by ``highspeed bench serve``; Prometheus metrics after."""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from highspeed.bench import serve as bench_serve

API_KEY = "bench-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tiny_checkpoint, tmp_path_factory):
    port = _free_port()
    log = open(tmp_path_factory.mktemp("serve-log") / "serve.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "highspeed", "serve", "--model", tiny_checkpoint, "--host", "127.0.0.1",
         "--port", str(port), "--device", "cpu", "--dtype", "float32", "--max-model-len", "128",
         "--num-kv-blocks", "128", "--served-model-name", "tiny", "--api-key", API_KEY,
         "--max-waiting-requests", "64", "--max-body-bytes", "65536"],
        stdout=log, stderr=subprocess.STDOUT, cwd=os.getcwd())
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, _tail(log)
        assert time.monotonic() < deadline, "server did not come up:\n" + _tail(log)
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    yield url, proc, log
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    log.close()


def _tail(log) -> str:
    log.flush()
    log.seek(0)
    return log.read()[-3000:]


def _check_record(path: str, num: int, output_len: int | None) -> dict:
    with open(path, encoding="utf-8") as f:
        record = json.load(f)
    res = record["results"]
    assert res["completed"] == num and res["failed"] == 0, res
    if output_len is not None:
        assert res["total_output_tokens"] == num * output_len
    for name in ("ttft", "tpot", "itl", "e2el"):
        p50, p90, p99 = res[f"p50_{name}_ms"], res[f"p90_{name}_ms"], res[f"p99_{name}_ms"]
        assert p50 is not None and 0 < p50 <= p90 <= p99 and math.isfinite(p99), (name, res)
    assert res["request_throughput"] > 0 and res["output_throughput"] > 0
    assert record["model"] == "tiny" and record["commit"] and "api_key" not in record["config"]
    assert len(record["requests"]) == num
    return record


def test_bench_random_poisson(served, tmp_path):
    url, _, _ = served
    rc = bench_serve.main(["--base-url", url, "--api-key", API_KEY, "--num-prompts", "12",
                           "--random-input-len", "16", "--random-output-len", "8", "--request-rate", "20",
                           "--ignore-eos", "--result-dir", str(tmp_path), "--result-name", "rand"])
    assert rc == 0
    _check_record(str(tmp_path / "rand.json"), 12, 8)
    assert (tmp_path / "rand.png").stat().st_size > 10_000


def test_bench_sharegpt_chat_concurrency(served, tmp_path):
    url, _, _ = served
    data = [{"conversations": [{"from": "human", "value": f"Tell me about experts number {i}, please."},
                               {"from": "gpt", "value": "Experts are small feed-forward networks. " * 2}]}
            for i in range(10)]
    (tmp_path / "sharegpt.json").write_text(json.dumps(data))
    rc = bench_serve.main(["--base-url", url, "--api-key", API_KEY, "--dataset", str(tmp_path / "sharegpt.json"),
                           "--num-prompts", "10", "--max-concurrency", "3", "--endpoint", "/v1/chat/completions",
                           "--ignore-eos", "--result-dir", str(tmp_path), "--result-name", "sgpt", "--no-plot"])
    assert rc == 0
    _check_record(str(tmp_path / "sgpt.json"), 10, None)
    assert not (tmp_path / "sgpt.png").exists()


def test_bench_fails_cleanly_on_wrong_key(served, tmp_path):
    url, _, _ = served
    with pytest.raises(RuntimeError, match="401"):
        bench_serve.main(["--base-url", url, "--api-key", "wrong", "--model", "tiny", "--num-prompts", "2",
                          "--result-dir", str(tmp_path)])


def test_metrics_after_traffic(served):
    url, _, _ = served
    text = httpx.get(url + "/metrics", timeout=10).text
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    # Warm-up requests count too: at least the 22 benchmark requests finished by length.
    assert samples['highspeed:request_success_total{finished_reason="length"}'] >= 22
    for hist in ("time_to_first_token_seconds", "time_per_output_token_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds"):
        assert samples[f"highspeed:{hist}_count"] >= 22, hist
        assert samples[f'highspeed:{hist}_bucket{{le="+Inf"}}'] == samples[f"highspeed:{hist}_count"]
    assert samples["highspeed:generation_tokens_total"] >= 12 * 8
    assert samples["highspeed:prompt_tokens_total"] > 0
    assert samples["highspeed:num_requests_running"] == 0 and samples["highspeed:num_requests_waiting"] == 0
    assert samples["highspeed:kv_cache_usage_perc"] == 0.0
    assert 0.0 <= samples["highspeed:prefix_cache_hit_rate"] <= 1.0
    assert samples["highspeed:prefix_cache_queries_total"] >= samples["highspeed:prefix_cache_hits_total"] > 0
    assert samples['highspeed:request_errors_total{status="401"}'] >= 1


def test_graceful_shutdown(served):
    _, proc, log = served
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 0, _tail(log)
