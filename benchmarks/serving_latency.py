"""The hardened server (`cifar10 serve`) against plain `mlflow models serve`, same model, one run.

Trains and promotes a ResNet-18 (1 epoch on synthetic data: latency does not depend on accuracy) in
a temp registry, in child processes, then measures:

1. the layer's single-image overhead, twice: in process, the layer around an app that answers at
   once against that app alone (the layer's own cost, in microseconds); and over HTTP, both servers
   up at once with micro-batching off, blocks of requests to one and the other alternating,
   overhead = median over pairs of (hardened p50 - plain p50). On a shared 2-core VM the machine's
   speed drifts by tens of percent within minutes, which unpaired runs would mistake for overhead;
2. requests/s, p50 and p99 at concurrency 1, 8 and 32 (1 PNG per request, keep-alive connections,
   the client on the same cores) for each server with micro-batching off and on;
3. a 100 MB body sent to the hardened server: time until the 413 arrives, and the worker's
   resident memory before and at its peak while the body is sent.

    python benchmarks/serving_latency.py [--requests 240] [--pairs 20] [--out results.jsonl]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil

from pipeline.data.sources import load_test_set
from pipeline.model.imaging import encode_png
from pipeline.tracking.lineage import PROJECT_ROOT
from registry.server import TOKEN_ENV, hardened_command, serve_command, wait_until_serving

MODEL_URI = "models:/cifar10-resnet@champion"
TOKEN = "benchmark-token"


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def summary(latencies: list[float], seconds: float) -> dict:
    return {
        "requests_per_second": round(len(latencies) / seconds, 1),
        "p50_ms": round(percentile(latencies, 50) * 1000, 2),
        "p99_ms": round(percentile(latencies, 99) * 1000, 2),
    }


def time_calls(call, count: int) -> list[float]:
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - started)
    return latencies


def http_caller(port: int, body: bytes):
    """One keep-alive connection; each call sends one request and checks it succeeded."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"}

    def call() -> None:
        connection.request("POST", "/invocations", body, headers)
        response = connection.getresponse()
        response.read()
        assert response.status == 200, response.status

    return call


def measure_http(port: int, body: bytes, requests: int, concurrency: int) -> dict:
    def worker(count: int) -> list[float]:
        return time_calls(http_caller(port, body), count)

    per_worker = max(2, requests // concurrency)
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(worker, [per_worker] * concurrency))
    return summary([x for r in results for x in r], time.perf_counter() - started)


def block_p50_ms(call, count: int) -> float:
    return percentile(time_calls(call, count), 50) * 1000


def paired_overhead(plain_port: int, hardened_port: int, body: bytes, pairs: int) -> dict:
    """Alternate blocks of 10 requests to each server; the overhead is the hardened one's extra."""
    callers = {"plain": http_caller(plain_port, body), "hardened": http_caller(hardened_port, body)}
    p50s: dict[str, list[float]] = {"plain": [], "hardened": []}
    for pair in range(pairs):
        order = ("plain", "hardened") if pair % 2 else ("hardened", "plain")
        for name in order:
            p50s[name].append(block_p50_ms(callers[name], 10))
    overhead = np.array(p50s["hardened"]) - np.array(p50s["plain"])
    return {
        "plain_p50_ms": round(float(np.median(p50s["plain"])), 2),
        "hardened_p50_ms": round(float(np.median(p50s["hardened"])), 2),
        "overhead_p50_ms": round(float(np.median(overhead)), 2),
        "overhead_iqr_ms": [round(float(np.percentile(overhead, q)), 2) for q in (25, 75)],
    }


def layer_cost_in_process(body: bytes, calls: int = 3000) -> dict:
    """Median time of one request through the layer around an app that answers at once, and
    through that app alone, in one event loop."""
    from registry.gateway import build_gateway
    from registry.guards import GuardSettings
    from registry.metrics import ServerMetrics

    async def answer_at_once(scope, receive, send) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b'{"predictions": []}'})

    layered = build_gateway(answer_at_once, GuardSettings(token=TOKEN), ServerMetrics())
    headers = [
        (b"content-type", b"application/json"),
        (b"authorization", f"Bearer {TOKEN}".encode()),
    ]
    scope = {"type": "http", "method": "POST", "path": "/invocations", "headers": headers}

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message) -> None:
        pass

    async def timings(app) -> list[float]:
        result = []
        for _ in range(calls):
            started = time.perf_counter()
            await app(dict(scope), receive, send)
            result.append(time.perf_counter() - started)
        return result

    alone = asyncio.run(timings(answer_at_once))
    through = asyncio.run(timings(layered))
    return {
        "app_alone_p50_us": round(percentile(alone, 50) * 1e6, 1),
        "through_layer_p50_us": round(percentile(through, 50) * 1e6, 1),
        "layer_cost_p50_us": round((percentile(through, 50) - percentile(alone, 50)) * 1e6, 1),
    }


def start(kind: str, port: int, tracking_uri: str, log: Path, batching: bool) -> subprocess.Popen:
    max_images = 256 if batching else 1
    env = os.environ | {"MLFLOW_TRACKING_URI": tracking_uri, TOKEN_ENV: TOKEN}
    if kind == "plain":
        command = [sys.executable, "-m", *serve_command(MODEL_URI, "127.0.0.1", port)]
        env["MLFLOW_PYFUNC_INFERENCE_CONFIG"] = json.dumps({"max_batch_images": max_images})
    else:
        command = [sys.executable, "-m", *hardened_command(MODEL_URI, port)]
        command += ["--max-batch-images", str(max_images)]
    server = subprocess.Popen(
        command,
        env=env,
        cwd=PROJECT_ROOT,
        stdout=log.open("a"),
        stderr=subprocess.STDOUT,
    )
    wait_until_serving(f"http://127.0.0.1:{port}", server)
    return server


def stop(server: subprocess.Popen) -> None:
    """Stop the server and its children (`mlflow models serve` runs uvicorn as a child process)."""
    children = psutil.Process(server.pid).children(recursive=True)
    server.terminate()
    server.wait(timeout=30)
    for child in children:
        child.terminate()
    psutil.wait_procs(children, timeout=30)


def worker_process(server: subprocess.Popen) -> psutil.Process:
    """The process that holds the model: the server itself, or uvicorn's child under the mlflow CLI."""
    process = psutil.Process(server.pid)
    children = process.children(recursive=True)
    return max([process, *children], key=lambda p: p.memory_info().rss)


def oversized_body(port: int, worker: psutil.Process, megabytes: int = 100) -> dict:
    """Send `megabytes` of JSON in 1 MB pieces until the answer arrives; sample the worker's RSS."""
    before = worker.memory_info().rss
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], worker.memory_info().rss)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    size = megabytes * 2**20
    head = (
        f"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {TOKEN}\r\nContent-Length: {size}\r\n\r\n"
    ).encode()
    piece = b"A" * 2**20
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as connection:
        connection.sendall(head)
        connection.setblocking(False)
        sent, answer = 0, b""
        while b"\r\n" not in answer:
            try:
                answer += connection.recv(4096)
            except BlockingIOError:
                if sent < size:
                    try:
                        sent += connection.send(piece)
                    except BlockingIOError:
                        time.sleep(0.001)
                else:
                    time.sleep(0.001)
        seconds = time.perf_counter() - started
    time.sleep(0.2)
    done.set()
    sampler.join()
    return {
        "body_mb": megabytes,
        "status_line": answer.split(b"\r\n")[0].decode(),
        "seconds_to_answer": round(seconds, 3),
        "mb_sent_before_answer": round(sent / 2**20, 1),
        "worker_rss_growth_mb": round((peak[0] - before) / 2**20, 1),
    }


def train_and_promote(tracking_uri: str) -> None:
    for stage in (
        ["train", "--model", "resnet18", "--data-dir", "synthetic", "--epochs", "1"]
        + ["--max-train-images", "64"],
        ["promote", "--force", "true"],
    ):
        subprocess.run(
            [sys.executable, "-m", "pipeline.cli", *stage, "--experiment-name", "bench"],
            env=os.environ | {"MLFLOW_TRACKING_URI": tracking_uri},
            cwd=PROJECT_ROOT,
            check=True,
            capture_output=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=240)
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--port", type=int, default=5077)
    parser.add_argument("--out", type=Path, help="also append each result line to this file")
    args = parser.parse_args()

    def report(result: dict) -> None:
        line = json.dumps(result)
        print(line, flush=True)
        if args.out:
            with args.out.open("a") as f:
                f.write(line + "\n")

    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        log = Path(tmp) / "servers.log"
        train_and_promote(uri)
        body = json.dumps(
            {
                "dataframe_split": {
                    "columns": ["image"],
                    "data": [
                        [
                            base64.b64encode(
                                encode_png(load_test_set("synthetic").images[0])
                            ).decode()
                        ]
                    ],
                }
            }
        ).encode()
        report({"measure": "layer_cost_in_process"} | layer_cost_in_process(body))
        plain = start("plain", args.port, uri, log, batching=False)
        hardened = start("hardened", args.port + 1, uri, log, batching=False)
        try:
            for port in (args.port, args.port + 1):
                measure_http(port, body, 20, 1)  # warm-up
            report(
                {
                    "measure": "layer_overhead",
                    **paired_overhead(args.port, args.port + 1, body, args.pairs),
                }
            )
        finally:
            stop(plain)
            stop(hardened)
        for kind in ("plain", "hardened"):
            for batching in (False, True):
                server = start(kind, args.port, uri, log, batching)
                try:
                    measure_http(args.port, body, 20, 1)  # warm-up
                    for concurrency in (1, 8, 32):
                        result = measure_http(args.port, body, args.requests, concurrency)
                        report(
                            {"server": kind, "micro_batching": batching, "concurrency": concurrency}
                            | result
                        )
                    if kind == "hardened" and batching:
                        report(
                            {"measure": "oversized_body"}
                            | oversized_body(args.port, worker_process(server))
                        )
                finally:
                    stop(server)


if __name__ == "__main__":
    main()
