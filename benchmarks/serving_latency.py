"""Requests per second and latency of `mlflow models serve` against in-process `model.predict`.

Trains and promotes a ResNet-18 (1 epoch on synthetic data: latency does not depend on accuracy) in
a temp registry, starts a real server, and sends 1 or 64 PNG images per request at concurrency 1 and
8 over keep-alive connections. The in-process baseline calls `predict` on the same decoded DataFrame,
so the difference is what HTTP, JSON, base64 and the scoring server add.

    python benchmarks/serving_latency.py [--requests 200]
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

from pipeline.config import PromoteConfig, resolve_train_config
from pipeline.data import load_test_set
from pipeline.train import run_train
from registry.promote import run_promote
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


def measure_http(port: int, body: bytes, requests: int, concurrency: int) -> dict:
    def worker(count: int) -> list[float]:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        latencies = []
        for _ in range(count):
            started = time.perf_counter()
            connection.request("POST", "/invocations", body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            response.read()
            assert response.status == 200
            latencies.append(time.perf_counter() - started)
        return latencies

    per_worker = max(1, requests // concurrency)
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(worker, [per_worker] * concurrency))
    return summary([x for r in results for x in r], time.perf_counter() - started)


def measure_in_process(model, frame: pd.DataFrame, requests: int) -> dict:
    latencies = []
    started = time.perf_counter()
    for _ in range(requests):
        t = time.perf_counter()
        model.predict(frame)
        latencies.append(time.perf_counter() - t)
    return summary(latencies, time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--port", type=int, default=5077)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        mlflow.set_tracking_uri(uri)
        os.chdir(tmp)
        config = resolve_train_config(
            {
                "model": "resnet18",
                "data_dir": "synthetic",
                "epochs": 1,
                "max_train_images": 64,
                "experiment_name": "bench",
            }
        )
        run_train(config)
        run_promote(PromoteConfig(experiment_name="bench"))
        model = mlflow.pyfunc.load_model(MODEL_URI)
        images = load_test_set("synthetic").images
        server = subprocess.Popen(
            [sys.executable, "-m", *serve_command(MODEL_URI, "127.0.0.1", args.port)],
            env=os.environ | {"MLFLOW_TRACKING_URI": uri},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_until_serving(f"http://127.0.0.1:{args.port}", server)
            results = []
            for batch in (1, 64):
                encoded = [encode_png(image) for image in images[:batch]]
                body = json.dumps(
                    {
                        "dataframe_split": {
                            "columns": ["image"],
                            "data": [[base64.b64encode(e).decode()] for e in encoded],
                        }
                    }
                ).encode()
                requests = args.requests if batch == 1 else max(16, args.requests // 8)
                measure_http(args.port, body, 10, 1)  # warm-up
                in_process = measure_in_process(model, pd.DataFrame({"image": encoded}), requests)
                for concurrency in (1, 8):
                    http_result = measure_http(args.port, body, requests, concurrency)
                    results.append(
                        {
                            "images_per_request": batch,
                            "concurrency": concurrency,
                            **http_result,
                            "in_process_p50_ms": in_process["p50_ms"],
                            "overhead_p50_ms": round(
                                http_result["p50_ms"] - in_process["p50_ms"], 2
                            ),
                        }
                    )
                    print(json.dumps(results[-1]), flush=True)
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
