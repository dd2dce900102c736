"""Requests per second and latency of `mlflow models serve` against in-process `model.predict`.

Trains and promotes a ResNet-18 (1 epoch on synthetic data: latency does not depend on accuracy) in
a temp registry, in child processes, starts a real server, and sends 1 or 64 PNG images per request
at concurrency 1 and 8 over keep-alive connections. The in-process baseline calls `predict` on the same images as a
DataFrame of bytes, so the difference is what HTTP, JSON, base64 and the scoring server add.

The overhead is measured in pairs: blocks of in-process calls and blocks of HTTP requests alternate,
and the overhead is the median over pairs of (HTTP p50 - in-process p50). On a shared 2-core VM the
speed of the machine drifts by tens of percent within minutes, which unpaired runs mistake for
overhead. A model that does no work, served the same way, gives the floor of the serving stack.

    python benchmarks/serving_latency.py [--requests 200] [--pairs 20]
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
import time
from concurrent.futures import ThreadPoolExecutor

import mlflow
import numpy as np
import pandas as pd

from pipeline.data import load_test_set
from pipeline.tracking import PROJECT_ROOT
from registry.server import serve_command, wait_until_serving
from registry.serving_model import encode_png

MODEL_URI = "models:/cifar10-resnet@champion"


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
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def call() -> None:
        connection.request("POST", "/invocations", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        assert response.status == 200

    return call


def measure_http(port: int, body: bytes, requests: int, concurrency: int) -> dict:
    def worker(count: int) -> list[float]:
        return time_calls(http_caller(port, body), count)

    per_worker = max(1, requests // concurrency)
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(worker, [per_worker] * concurrency))
    return summary([x for r in results for x in r], time.perf_counter() - started)


def block_p50_ms(call, count: int) -> float:
    return percentile(time_calls(call, count), 50) * 1000


def paired_overhead(model, frame: pd.DataFrame, port: int, body: bytes, pairs: int, size: int):
    """Alternate blocks of in-process and HTTP calls; return both p50s and the overhead per pair."""
    over_http = http_caller(port, body)

    def in_process() -> None:
        model.predict(frame)

    http_p50, local_p50 = [], []
    for pair in range(pairs):
        order = (in_process, over_http) if pair % 2 else (over_http, in_process)
        for call in order:
            (local_p50 if call is in_process else http_p50).append(block_p50_ms(call, size))
    overhead = np.array(http_p50) - np.array(local_p50)
    return {
        "http_p50_ms": round(float(np.median(http_p50)), 2),
        "in_process_p50_ms": round(float(np.median(local_p50)), 2),
        "overhead_p50_ms": round(float(np.median(overhead)), 2),
        "overhead_iqr_ms": [round(float(np.percentile(overhead, q)), 2) for q in (25, 75)],
    }


class NoWork(mlflow.pyfunc.PythonModel):
    """Answers every request with one fixed row: what remains is the serving stack itself."""

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        return pd.DataFrame(
            {"label": [0], "class_name": ["airplane"], "probabilities": [[0.1] * 10]}
        )


def start_server(model_uri: str, port: int, tracking_uri: str) -> subprocess.Popen:
    server = subprocess.Popen(
        [sys.executable, "-m", *serve_command(model_uri, "127.0.0.1", port)],
        env=os.environ | {"MLFLOW_TRACKING_URI": tracking_uri},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_until_serving(f"http://127.0.0.1:{port}", server)
    return server


def stop(server: subprocess.Popen) -> None:
    server.terminate()
    server.wait(timeout=30)


def request_body(encoded: list[bytes]) -> bytes:
    rows = [[base64.b64encode(e).decode()] for e in encoded]
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": rows}}).encode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--port", type=int, default=5077)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        mlflow.set_tracking_uri(uri)
        os.chdir(tmp)
        # Train and promote in child processes: torch work on this process's main thread would
        # give it a second OpenMP team and slow the in-process baseline (see the served model).
        for stage in (
            ["train", "--model", "resnet18", "--data-dir", "synthetic", "--epochs", "1"]
            + ["--max-train-images", "64"],
            ["promote"],
        ):
            subprocess.run(
                [sys.executable, "-m", "pipeline.cli", *stage, "--experiment-name", "bench"],
                env=os.environ | {"MLFLOW_TRACKING_URI": uri},
                cwd=PROJECT_ROOT,
                check=True,
                capture_output=True,
            )
        model = mlflow.pyfunc.load_model(MODEL_URI)
        images = load_test_set("synthetic").images
        with mlflow.start_run(run_name="no-work"):
            floor_uri = mlflow.pyfunc.log_model(name="model", python_model=NoWork()).model_uri
        floor_server = start_server(floor_uri, args.port + 1, uri)
        try:
            floor_body = request_body([encode_png(images[0])])
            floor = block_p50_ms(http_caller(args.port + 1, floor_body), args.requests)
        finally:
            stop(floor_server)
        print(json.dumps({"no_work_model_http_p50_ms": round(floor, 2)}), flush=True)
        server = start_server(MODEL_URI, args.port, uri)
        try:
            for batch in (1, 64):
                encoded = [encode_png(image) for image in images[:batch]]
                body = request_body(encoded)
                requests = args.requests if batch == 1 else max(16, args.requests // 8)
                measure_http(args.port, body, 10, 1)  # warm-up
                frame = pd.DataFrame({"image": encoded})
                block = 10 if batch == 1 else 2
                paired = paired_overhead(model, frame, args.port, body, args.pairs, block)
                for concurrency in (1, 8):
                    result = {
                        "images_per_request": batch,
                        "concurrency": concurrency,
                        **measure_http(args.port, body, requests, concurrency),
                    }
                    if concurrency == 1:
                        result |= paired
                    print(json.dumps(result), flush=True)
        finally:
            stop(server)


if __name__ == "__main__":
    main()
