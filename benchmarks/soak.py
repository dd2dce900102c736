"""A long run against the hardened server: a steady rate near its capacity, then bursts above it.

Every request is one PNG on a keep-alive connection. The steady phase sends at `--rate` requests/s
(open loop: a request is due at its time whether or not the earlier ones are answered); each burst
runs `--burst-clients` clients back to back for `--burst-s` seconds, past the server's
`--max-inflight`, where refusals must be fast 503s with Retry-After. The worker's resident memory,
open files and threads are sampled twice a second. It holds when: no 5xx but those 503s, every
request answered, memory flat after warm-up (growth per 1,000 requests stated), no growth of files
or threads. `tests/test_soak.py` runs a short version in CI.

    python -m benchmarks.soak [--minutes 10] [--rate 40] [--model resnet18]
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil

from pipeline.data.sources import load_test_set
from pipeline.model.imaging import encode_png
from pipeline.tracking.lineage import PROJECT_ROOT

TOKEN = "soak-token"


@dataclass
class Sample:
    seconds: float
    rss_mb: float
    open_files: int
    threads: int
    answered: int


@dataclass
class SoakResult:
    """Per request (time sent, seconds, status, phase) and the worker's samples."""

    requests: list[tuple[float, float, int, str]] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def of(self, phase: str, status: int | None = None) -> list[tuple[float, float, int, str]]:
        return [r for r in self.requests if r[3] == phase and (status is None or r[2] == status)]

    def summary(self, warm_up: float = 0.3) -> dict:
        """The numbers the run is judged by; memory growth is the slope of a line through the
        steady phase's samples after its first `warm_up` share."""
        steady = self.of("steady")
        end = max(t for t, *_ in steady) if steady else 0.0
        after = [s for s in self.samples if warm_up * end <= s.seconds <= end]
        if len(after) >= 3:
            slope = np.polyfit([s.answered for s in after], [s.rss_mb for s in after], 1)[0]
        else:
            slope = float("nan")
        steady_ok = [d for _, d, status, _ in steady if status == 200]
        refused = self.of("burst", 503)
        statuses = sorted({status for *_, status, _ in self.requests})
        return {
            "requests": len(self.requests),
            "statuses": {str(s): sum(r[2] == s for r in self.requests) for s in statuses},
            "unanswered": len(self.errors),
            "steady_p50_ms": round(float(np.percentile(steady_ok, 50)) * 1000, 1),
            "steady_p99_ms": round(float(np.percentile(steady_ok, 99)) * 1000, 1),
            "steady_requests_per_s": round(len(steady) / end, 1) if end else 0.0,
            "burst_answered": len(self.of("burst", 200)),
            "burst_refused_503": len(refused),
            "burst_503_p99_ms": round(
                float(np.percentile([d for _, d, *_ in refused], 99)) * 1000, 1
            )
            if refused
            else None,
            "rss_mb_after_warm_up": [round(after[0].rss_mb, 1), round(after[-1].rss_mb, 1)]
            if after
            else None,
            "rss_growth_mb_per_1000_requests": round(float(slope) * 1000, 3),
            "open_files": [min(s.open_files for s in after), max(s.open_files for s in after)]
            if after
            else None,
            "threads": [min(s.threads for s in after), max(s.threads for s in after)]
            if after
            else None,
        }


def one_png_body() -> bytes:
    image = load_test_set("synthetic").images[0]
    picture = base64.b64encode(encode_png(image)).decode()
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": [[picture]]}}).encode()


class Client:
    """One keep-alive connection that reconnects when the server closes it."""

    def __init__(self, port: int, token: str, body: bytes) -> None:
        self.port, self.body = port, body
        self.headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
        self.connection: http.client.HTTPConnection | None = None

    def call(self) -> int:
        if self.connection is None:
            self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            self.connection.request("POST", "/invocations", self.body, self.headers)
            response = self.connection.getresponse()
            response.read()
            if response.getheader("connection", "").lower() == "close":
                self.close()
            if response.status == 503 and not response.getheader("retry-after"):
                raise RuntimeError("a 503 without Retry-After")
            return response.status
        except Exception:
            self.close()
            raise

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
        self.connection = None


def run_soak(
    port: int,
    worker: psutil.Process,
    token: str,
    rate: float,
    steady_s: float,
    bursts: int,
    burst_s: float,
    burst_clients: int,
    threads: int = 16,
) -> SoakResult:
    """Drive the server on `port` and sample `worker` (the process holding the model)."""
    result, lock, body = SoakResult(), threading.Lock(), one_png_body()
    started = time.perf_counter()
    done = threading.Event()

    def record(phase: str, client: Client) -> None:
        sent = time.perf_counter()
        try:
            status = client.call()
        except Exception as error:
            with lock:
                result.errors.append(f"{phase}: {type(error).__name__}: {error}")
            return
        with lock:
            result.requests.append((sent - started, time.perf_counter() - sent, status, phase))

    def sample() -> None:
        while not done.wait(0.5):
            with lock:
                answered = len(result.requests)
            try:
                memory = worker.memory_info().rss / 2**20
                result.samples.append(Sample(time.perf_counter() - started, memory,
                                             worker.num_fds(), worker.num_threads(), answered))  # fmt: skip
            except psutil.Error:
                return

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    due = iter(range(int(rate * steady_s)))
    due_lock = threading.Lock()

    def steady_worker() -> None:
        client = Client(port, token, body)
        while True:
            with due_lock:
                slot = next(due, None)
            if slot is None:
                break
            wait = started + slot / rate - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            record("steady", client)
        client.close()

    pool = [threading.Thread(target=steady_worker) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    for _ in range(bursts):

        def burst_worker(until: float) -> None:
            client = Client(port, token, body)
            while time.perf_counter() < until:
                record("burst", client)
            client.close()

        until = time.perf_counter() + burst_s
        crowd = [threading.Thread(target=burst_worker, args=(until,)) for _ in range(burst_clients)]
        for thread in crowd:
            thread.start()
        for thread in crowd:
            thread.join()
        time.sleep(1.0)  # the server recovers between bursts
    done.set()
    sampler.join()
    return result


def promote_a_champion(model: str, env: dict[str, str]) -> str:
    """Train `model` for one epoch on synthetic images (speed does not depend on accuracy) and
    promote it as the champion in the store `env` names; its model URI."""
    for stage in (["train", "--model", model, "--data-dir", "synthetic", "--epochs", "1",
                   "--max-train-images", "64"], ["promote", "--force", "true", "--architectures", model]):  # fmt: skip
        subprocess.run([sys.executable, "-m", "pipeline.cli", *stage, "--experiment-name",
                        "benchmark"], env=env, cwd=PROJECT_ROOT, check=True,
                       capture_output=True)  # fmt: skip
    return "models:/cifar10-resnet@champion"


def model_worker(server: subprocess.Popen) -> psutil.Process:
    process = psutil.Process(server.pid)
    return max([process, *process.children(recursive=True)], key=lambda p: p.memory_info().rss)


def plot(result: SoakResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (memory, latency) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    memory.plot([s.seconds for s in result.samples], [s.rss_mb for s in result.samples])
    memory.set_ylabel("worker RSS (MiB)")
    for phase, colour in (("steady", "tab:blue"), ("burst", "tab:orange")):
        rows = result.of(phase)
        latency.scatter([r[0] for r in rows], [r[1] * 1000 for r in rows], s=2, c=colour,
                        label=phase)  # fmt: skip
    latency.set_yscale("log")
    latency.set_ylabel("latency (ms)")
    latency.set_xlabel("seconds")
    latency.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=90)


def main() -> None:
    from benchmarks.machine import machine
    from benchmarks.monitoring_cost import free_port
    from registry.server import TOKEN_ENV, hardened_command, wait_until_serving

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--rate", type=float, default=40)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--max-inflight", type=int, default=16)
    parser.add_argument("--bursts", type=int, default=3)
    parser.add_argument("--burst-clients", type=int, default=64)
    parser.add_argument("--out", default="benchmarks/results/soak_cpu.jsonl")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        env = os.environ | {"MLFLOW_TRACKING_URI": uri}
        promote_a_champion(args.model, env)
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", *hardened_command("models:/cifar10-resnet@champion", port,
                                                      "--max-inflight", str(args.max_inflight))],
            env=env | {TOKEN_ENV: TOKEN}, cwd=PROJECT_ROOT,
            stdout=(Path(tmp) / "server.log").open("w"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            wait_until_serving(f"http://127.0.0.1:{port}", server)
            result = run_soak(port, model_worker(server), TOKEN, args.rate, args.minutes * 60,
                              args.bursts, 10.0, args.burst_clients)  # fmt: skip
        finally:
            server.terminate()
            server.wait(timeout=60)
    plot(result, Path("benchmarks/results/soak_cpu.png"))
    record = {
        "benchmark": "soak",
        **machine(),
        "model": f"{args.model} (1 epoch, synthetic)",
        "steady_minutes": args.minutes,
        "rate": args.rate,
        "max_inflight": args.max_inflight,
        "bursts": f"{args.bursts} x 10 s, {args.burst_clients} clients",
        **result.summary(),
        "errors": result.errors[:5],
    }
    with open(args.out, "a") as out:
        out.write(json.dumps(record) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
