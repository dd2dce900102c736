"""What watching the model costs a request: the hardened server with drift and the inference log off,
with the drift window on (the default), and with the window and the log on, same model, all three up.

Trains and promotes a ResNet-18 (1 epoch on synthetic data, as benchmarks/serving_latency.py) in a
temp registry, starts the three servers, then sends 1-PNG requests in blocks of 10 to each in
turn (`--pairs` rounds, the order rotating), so the machine's drift over minutes hits all three
alike; a setting's cost is the median over rounds of (its block p50 - the bare server's). Also, in
process: the per-image cost of the statistics and of queueing a log row, and one /metrics drift
test of a full 200-image window.

    python -m benchmarks.monitoring_cost [--pairs 30]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.machine import machine
from benchmarks.serving_latency import MODEL_URI as CHAMPION
from benchmarks.serving_latency import (
    TOKEN,
    block_p50_ms,
    http_caller,
    stop,
    train_and_promote,
)
from pipeline.data.sources import load_test_set
from pipeline.model.classifier import IMAGE_COLUMN, Observation
from pipeline.model.drift import DriftWindow, Reference, image_features
from pipeline.model.imaging import encode_png
from pipeline.tracking.lineage import PROJECT_ROOT
from registry.inference_log import InferenceLog, InferenceLogSettings
from registry.metrics import DriftCollector, ServerMetrics
from registry.server import TOKEN_ENV, hardened_command, wait_until_serving

SETTINGS = {
    "bare": ["--drift-window", "0"],
    "drift window": [],
    "drift window + inference log": ["--inference-log", "{log}"],
}


def start(options: list[str], port: int, tracking_uri: str, log: Path) -> subprocess.Popen:
    server = subprocess.Popen(
        [sys.executable, "-m", *hardened_command(CHAMPION, port, *options)],
        env=os.environ | {"MLFLOW_TRACKING_URI": tracking_uri, TOKEN_ENV: TOKEN},
        cwd=PROJECT_ROOT,
        stdout=log.open("a"),
        stderr=subprocess.STDOUT,
    )
    wait_until_serving(f"http://127.0.0.1:{port}", server)
    return server


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def in_process_costs(images: np.ndarray, root: Path) -> dict:
    one = images[:1]
    started = time.perf_counter()
    for _ in range(2000):
        image_features(one)
    features_us = (time.perf_counter() - started) / 2000 * 1e6
    probabilities = np.full((1, 10), 0.1)
    seen = Observation(
        pd.DataFrame({IMAGE_COLUMN: [base64.b64encode(encode_png(images[0])).decode()]}),
        pd.DataFrame(
            {"label": [0], "class_name": ["airplane"], "probabilities": probabilities.tolist()}
        ),  # fmt: skip
        one,
        [encode_png(images[0])],
        image_features(one),
        probabilities.max(1),
        0.01,
    )
    metrics = ServerMetrics()
    log = InferenceLog(InferenceLogSettings(str(root / "log-in-process"), queue_rows=100_000),
                       "cifar10-resnet", "1", lambda row: "bench", metrics.inference_log)  # fmt: skip
    started = time.perf_counter()
    for _ in range(5000):
        log.observe(seen)
    observe_us = (time.perf_counter() - started) / 5000 * 1e6
    log.close(timeout=60)
    reference = Reference.from_images(images, 1000, probabilities=np.full((500, 10), 0.1))
    window = DriftWindow(reference)
    window.add(image_features(images[:200]), np.full(200, 0.1))
    collector = DriftCollector(window)
    started = time.perf_counter()
    for _ in range(100):
        list(collector.collect())
    scrape_ms = (time.perf_counter() - started) / 100 * 1e3
    return {
        "image_statistics_per_image_us": round(features_us, 1),
        "inference_log_row_queued_us": round(observe_us, 1),
        "drift_test_per_scrape_ms": round(scrape_ms, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=30)
    parser.add_argument("--out", default="benchmarks/results/monitoring_cpu.jsonl")
    args = parser.parse_args()
    images = load_test_set("synthetic", None, False).images
    body = json.dumps(
        {"dataframe_split": {"columns": ["image"],
                             "data": [[base64.b64encode(encode_png(images[0])).decode()]]}}
    ).encode()  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
        train_and_promote(tracking_uri)
        servers, callers = {}, {}
        try:
            for name, options in SETTINGS.items():
                port = free_port()
                options = [o.replace("{log}", str(root / "log")) for o in options]
                servers[name] = start(options, port, tracking_uri, root / "servers.log")
                callers[name] = http_caller(port, body)
            for call in callers.values():  # warm up every server
                block_p50_ms(call, 20)
            p50s: dict[str, list[float]] = {name: [] for name in SETTINGS}
            names = list(SETTINGS)
            for round_ in range(args.pairs):
                for name in names[round_ % 3 :] + names[: round_ % 3]:
                    p50s[name].append(block_p50_ms(callers[name], 10))
        finally:
            for server in servers.values():
                stop(server)
        logged = sum(len(pd.read_parquet(f)) for f in (root / "log").glob("inference-*.parquet"))
        costs = in_process_costs(images, root)
    bare = np.array(p50s["bare"])
    record = {
        "benchmark": "monitoring_cost",
        **machine(),
        "model": "resnet18 (1 epoch, synthetic)",
        "requests_per_setting": 10 * args.pairs,
        "p50_ms": {name: round(float(np.median(v)), 2) for name, v in p50s.items()},
        "extra_p50_ms_over_bare": {
            name: round(float(np.median(np.array(v) - bare)), 3)
            for name, v in p50s.items()
            if name != "bare"
        },
        "extra_iqr_ms": {
            name: [round(float(np.percentile(np.array(v) - bare, q)), 3) for q in (25, 75)]
            for name, v in p50s.items()
            if name != "bare"
        },
        "rows_logged": logged,
        **costs,
    }
    with open(args.out, "a") as out:
        out.write(json.dumps(record) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
