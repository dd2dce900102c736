"""What an explanation costs, and what the v2 protocol adds, for one image.

Trains `resnet18` and `fastnet` for one epoch on synthetic data in a temp registry (latency does not
depend on accuracy), then measures:

1. in process, through the logged pyfunc's own `predict`: one PNG plain against one PNG with
   `params={"explain": true}` (Grad-CAM for the predicted class), p50 / p95 over `--repeats` calls,
   alternating so that the machine's drift hits both alike;
2. the v2 translation in process (request parsing and answer encoding, without the model), in µs;
3. over HTTP against the hardened server (fastnet, micro-batching on, token): `/invocations` and
   `/v2/models/<name>/infer` with the same image, alternating blocks; overhead = median over pairs
   of (v2 p50 - invocations p50).

    python -m benchmarks.explain_latency [--repeats 200] [--pairs 20] [--out results.jsonl]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests

from benchmarks.machine import machine
from pipeline.model.imaging import encode_png
from pipeline.tracking.lineage import PROJECT_ROOT
from registry.server import TOKEN_ENV, hardened_command, wait_until_serving

TOKEN = "benchmark-token"


def train_tiny(model: str, root: Path) -> str:
    import mlflow

    from pipeline.config import resolve_train_config
    from pipeline.train import run_train

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    if mlflow.get_experiment_by_name("explain-bench") is None:
        mlflow.create_experiment("explain-bench", artifact_location=str(root / "artifacts"))
    config = resolve_train_config(
        {"model": model, "data_dir": "synthetic", "epochs": 1, "max_train_images": 256,
         "experiment_name": "explain-bench"}
    )  # fmt: skip
    return run_train(config).model_uri


def percentiles(seconds: list[float]) -> dict:
    return {
        "p50_ms": round(float(np.percentile(seconds, 50)) * 1000, 2),
        "p95_ms": round(float(np.percentile(seconds, 95)) * 1000, 2),
    }


def in_process(model_uri: str, repeats: int) -> dict:
    import mlflow
    import pandas as pd

    model = mlflow.pyfunc.load_model(model_uri)
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    frame = pd.DataFrame({"image": [encode_png(image)]})
    times: dict[str, list[float]] = {"predict": [], "explain": []}
    for _ in range(5):
        model.predict(frame, params={"explain": True})
    for _ in range(repeats):
        for kind, params in (("predict", {}), ("explain", {"explain": True})):
            start = time.perf_counter()
            model.predict(frame, params=params)
            times[kind].append(time.perf_counter() - start)
    return {kind: percentiles(values) for kind, values in times.items()}


def v2_translation_us(repeats: int = 2000) -> float:
    from registry import protocols

    png = encode_png(np.zeros((32, 32, 3), np.uint8))
    body = json.dumps(
        {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                     "data": [base64.b64encode(png).decode()]}]}
    ).encode()  # fmt: skip
    result = [{"label": 3, "class_name": "cat", "probabilities": [0.1] * 10}]
    start = time.perf_counter()
    for _ in range(repeats):
        request = protocols.parse_v2_infer(body, None)
        protocols.v2_infer_response(request, result, "m", "1")
    return round((time.perf_counter() - start) / repeats * 1e6, 1)


def over_http(model_uri: str, tracking_uri: str, pairs: int, block: int = 10) -> dict:
    port = 5391
    env = os.environ | {"MLFLOW_TRACKING_URI": tracking_uri, TOKEN_ENV: TOKEN}
    process = subprocess.Popen(
        [sys.executable, "-m", *hardened_command(model_uri, port, "--served-name", "bench")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=PROJECT_ROOT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(base, process)
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {TOKEN}"
        image = base64.b64encode(encode_png(np.full((32, 32, 3), 90, np.uint8))).decode()
        calls = {
            "invocations": (f"{base}/invocations",
                            {"dataframe_split": {"columns": ["image"], "data": [[image]]}}),
            "v2": (f"{base}/v2/models/bench/infer",
                   {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                "data": [image]}]}),
            "v1_explain": (f"{base}/v1/models/bench:explain", {"instances": [image]}),
        }  # fmt: skip
        samples: dict[str, list[float]] = {name: [] for name in calls}
        differences = []
        for _ in range(3):
            for url, body in calls.values():
                session.post(url, json=body).raise_for_status()
        for _ in range(pairs):
            medians = {}
            for name, (url, body) in calls.items():
                block_times = []
                for _ in range(block):
                    start = time.perf_counter()
                    session.post(url, json=body).raise_for_status()
                    block_times.append(time.perf_counter() - start)
                samples[name] += block_times
                medians[name] = float(np.median(block_times))
            differences.append(medians["v2"] - medians["invocations"])
        return {name: percentiles(values) for name, values in samples.items()} | {
            "v2_minus_invocations_p50_ms": round(float(np.median(differences)) * 1000, 2),
            "v2_minus_invocations_iqr_ms": [
                round(float(np.percentile(differences, q)) * 1000, 2) for q in (25, 75)
            ],
        }
    finally:
        process.terminate()
        process.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--out", default="benchmarks/results/explain_cpu.jsonl")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        uris = {model: train_tiny(model, root) for model in ("resnet18", "fastnet")}
        record = {
            **machine(),
            "in_process": {model: in_process(uri, args.repeats) for model, uri in uris.items()},
            "v2_translation_us": v2_translation_us(),
            "http_fastnet": over_http(uris["fastnet"], f"sqlite:///{root / 'mlflow.db'}",
                                      args.pairs),
        }  # fmt: skip
    print(json.dumps(record, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as out:
        out.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
