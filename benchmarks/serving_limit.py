"""How close the hardened server comes to the model's own limit, for each model, side by side.

The limit: the logged pyfunc's `predict` in this process on batches of base64 PNGs (the best of
several batch sizes, the same torch threads and precision the server uses), measured before and
after the served runs (the mean is the limit; both are recorded). Served: the hardened server as
shipped (`cifar10 serve`, default settings, one run per `--workers` count) with one PNG per request
from `wrk` (a C load generator: the client must cost the shared cores as little as possible),
keep-alive connections, on /invocations and on the v2 route, at each concurrency. Ratio = served
images/s / limit.

Needs Debian's `wrk` (`apt-get install wrk`).

    python -m benchmarks.serving_limit [--models resnet18 fastnet] [--seconds 10] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from benchmarks.machine import machine
from benchmarks.monitoring_cost import free_port
from benchmarks.soak import promote_a_champion
from pipeline.data.sources import load_test_set
from pipeline.model.imaging import encode_png
from pipeline.tracking.lineage import PROJECT_ROOT
from registry.server import TOKEN_ENV, hardened_command, wait_until_serving

TOKEN = "limit-token"
BATCHES = (1, 8, 32, 64, 128, 256)
UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def pictures(count: int) -> list[str]:
    images = load_test_set("synthetic").images[:count]
    return [base64.b64encode(encode_png(image)).decode() for image in images]


def in_process_limit(model_uri: str, seconds: float = 3.0) -> dict:
    """Images/s of the pyfunc's predict for each batch size; the best is the limit."""
    import mlflow
    import pandas as pd

    model = mlflow.pyfunc.load_model(model_uri)
    encoded = pictures(max(BATCHES))
    rates = {}
    for size in BATCHES:
        frame = pd.DataFrame({"image": encoded[:size]})
        model.predict(frame)
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            model.predict(frame)
            done += size
        rates[size] = round(done / (time.perf_counter() - started), 1)
    model.unwrap_python_model().close()
    best = max(rates, key=rates.get)
    return {"images_per_s": rates[best], "best_batch": best, "by_batch": rates}


def wrk_script(route: str, picture: str, folder: Path) -> Path:
    body = (
        {"dataframe_split": {"columns": ["image"], "data": [[picture]]}}
        if route == "/invocations"
        else {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [picture]}]}
    )
    script = folder / f"{route.strip('/').replace('/', '_')}.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {TOKEN}"\n'
        f"wrk.body = {json.dumps(json.dumps(body))}\n"
    )
    return script


def milliseconds(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()
    return round(float(value) * UNITS[unit], 2)


def run_wrk(url: str, script: Path, concurrency: int, seconds: float) -> dict:
    command = ["wrk", f"-t{min(2, concurrency)}", f"-c{concurrency}", f"-d{seconds:g}s",
               "--latency", "-s", str(script), url]  # fmt: skip
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    latency = dict(re.findall(r"^\s+(50|99)%\s+(\S+)\s*$", output, re.M))
    if len(latency) != 2:
        raise RuntimeError(f"wrk printed no latency distribution:\n{output}")
    failed = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors = re.search(r"Socket errors: (.*)$", output, re.M)
    return {
        "images_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1)),
        "p50_ms": milliseconds(latency["50"]),
        "p99_ms": milliseconds(latency["99"]),
        "failed": int(failed.group(1)) if failed else 0,
        "socket_errors": errors.group(1) if errors else None,
    }


def served(
    model_uri: str, env: dict, args: argparse.Namespace, folder: Path, workers: int
) -> list[dict]:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", *hardened_command(model_uri, port, "--workers", str(workers))],
        env=env | {TOKEN_ENV: TOKEN}, cwd=PROJECT_ROOT,
        stdout=(folder / "server.log").open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    picture = pictures(1)[0]
    rows = []
    try:
        wait_until_serving(base, server)
        card = urllib.request.Request(f"{base}/model-card",
                                      headers={"Authorization": f"Bearer {TOKEN}"})  # fmt: skip
        name = json.load(urllib.request.urlopen(card, timeout=30))["name"]
        for route in ("/invocations", f"/v2/models/{name}/infer"):
            script = wrk_script(route, picture, folder)
            run_wrk(base + route, script, 8, 2)  # warm-up: threads, arenas, first batches
            for concurrency in args.concurrency:
                time.sleep(3)  # the last run's abandoned requests are answered, not counted here
                result = run_wrk(base + route, script, concurrency, args.seconds)
                rows.append(
                    {"workers": workers, "route": route, "concurrency": concurrency, **result}
                )
                print(json.dumps(rows[-1]), file=sys.stderr)
    finally:
        server.terminate()
        server.wait(timeout=60)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "fastnet"])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32, 64])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument(
        "--workers", nargs="+", type=int, default=[1], help="serve's worker processes, each a run"
    )
    parser.add_argument("--out", default="benchmarks/results/serving_limit_cpu.jsonl")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("serving_limit needs the wrk load generator: apt-get install wrk")
    import torch

    for model in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            uri = f"sqlite:///{folder / 'mlflow.db'}"
            env = os.environ | {"MLFLOW_TRACKING_URI": uri}
            model_uri = promote_a_champion(model, env)
            os.environ["MLFLOW_TRACKING_URI"] = uri
            before = in_process_limit(model_uri)
            rows = [row for n in args.workers for row in served(model_uri, env, args, folder, n)]
            after = in_process_limit(model_uri)
        limit = round((before["images_per_s"] + after["images_per_s"]) / 2, 1)
        record = {
            "benchmark": "serving_limit",
            **machine(),
            "model": f"{model} (1 epoch, synthetic), fp32, {torch.get_num_threads()} torch threads",
            "limit_images_per_s": limit,
            "limit_before": before,
            "limit_after": after,
            "served": [row | {"ratio": round(row["images_per_s"] / limit, 3)} for row in rows],
        }
        with open(args.out, "a") as out:
            out.write(json.dumps(record) + "\n")
        print(json.dumps(record, indent=2))
        best = max(r["images_per_s"] for r in rows)
        print(f"{model}: limit {limit} images/s; best served {best} ({best / limit:.0%})")


if __name__ == "__main__":
    main()
