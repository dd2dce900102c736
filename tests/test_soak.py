"""The short soak: a real server held at a steady rate, then a burst past its in-flight limit.
Nothing is lost, nothing fails but fast 503s with Retry-After in the burst, memory and open files
stay flat (the 10-minute version is benchmarks/soak.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.soak import model_worker, run_soak
from registry.server import TOKEN_ENV, hardened_command, wait_until_serving
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def limited_server(tiny_server, tmp_path):
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", *hardened_command("models:/cifar10-tiny@champion", port,
                                                  "--max-inflight", "16")],
        env=os.environ | {"MLFLOW_TRACKING_URI": tiny_server.tracking_uri,
                          TOKEN_ENV: tiny_server.token},
        stdout=(tmp_path / "server.log").open("w"), stderr=subprocess.STDOUT, cwd=ROOT,
    )  # fmt: skip
    try:
        wait_until_serving(f"http://127.0.0.1:{port}", server)
        yield port, model_worker(server), tiny_server.token
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow
def test_a_steady_load_then_a_burst_loses_nothing_and_refuses_fast(limited_server):
    port, worker, token = limited_server
    # Warm-up: the first burst starts the worker's threads and their allocator arenas (the
    # 10-minute benchmark shows memory flat once they exist); then the run that is judged.
    run_soak(port, worker, token, rate=40, steady_s=4, bursts=1, burst_s=2, burst_clients=48)
    result = run_soak(port, worker, token, rate=40, steady_s=20, bursts=1, burst_s=3,
                      burst_clients=48)  # fmt: skip
    summary = result.summary(warm_up=0.0)
    assert result.errors == [] and summary["unanswered"] == 0
    assert {status for *_, status, _ in result.of("steady")} == {200}
    assert {status for *_, status, _ in result.of("burst")} == {200, 503}
    assert summary["burst_503_p99_ms"] < 1000  # refused at once, not after a queue
    assert summary["steady_requests_per_s"] > 35 and summary["steady_p99_ms"] < 500
    first, last = summary["rss_mb_after_warm_up"]
    after_burst = result.samples[-1].rss_mb
    assert max(last, after_burst) - first < 8, summary  # flat; the benchmark measures the slope
    low, high = summary["open_files"]
    assert high - low <= 4, summary
    assert result.samples[-1].open_files <= high + 4  # the burst's connections are closed again
