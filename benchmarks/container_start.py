"""How big the serving image is and how fast a container of it answers from cold.

Trains a `resnet18` for one epoch on synthetic data in a temp registry (start-up does not depend on
accuracy, only on what is loaded), bakes it into the image with deploy/container/build.sh, then
`--starts` times: `podman run` (read-only root, token file, loopback port) until the first `/ping`
and the first scored image, then SIGTERM until the container has exited.

    python -m benchmarks.container_start [--starts 5] [--out benchmarks/results/container_cpu.jsonl]
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
import requests

from benchmarks.machine import machine
from pipeline.model.imaging import encode_png

ROOT = Path(__file__).resolve().parents[1]
TAG = "localhost/cifar10-serve:bench"
TOKEN = "benchmark-token"
ENV = os.environ | {"CONTAINERS_CONF": str(ROOT / "deploy" / "container" / "containers.conf")}


def podman(*args: str) -> str:
    return subprocess.run(
        ["podman", *args], capture_output=True, text=True, check=True, env=ENV
    ).stdout.strip()


def baked_image(root: Path) -> str:
    import mlflow

    from pipeline.config import resolve_train_config
    from pipeline.train import run_train

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    mlflow.create_experiment("container-bench", artifact_location=str(root / "artifacts"))
    config = resolve_train_config(
        {"model": "resnet18", "data_dir": "synthetic", "epochs": 1, "max_train_images": 64,
         "experiment_name": "container-bench"}
    )  # fmt: skip
    model = mlflow.artifacts.download_artifacts(
        artifact_uri=run_train(config).model_uri, dst_path=str(root / "model")
    )
    subprocess.run(
        ["bash", str(ROOT / "deploy" / "container" / "build.sh"), "--model", model, "--tag", TAG],
        check=True, env=ENV | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
    )  # fmt: skip
    return model


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def one_start(token_file: Path, body: dict) -> dict:
    port = free_port()
    name = f"cifar10-bench-{port}"
    started = time.monotonic()
    podman(
        "run", "--detach", "--name", name, "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL",
        "--publish", f"127.0.0.1:{port}:5001",
        "--volume", f"{token_file}:/run/secrets/cifar10/token:ro", TAG,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                if requests.get(f"{base}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                if time.monotonic() - started > 180:
                    raise TimeoutError(
                        f"{name} did not answer /ping within 180 s: " + podman("logs", name)
                    ) from None
                time.sleep(0.05)
        ping_s = time.monotonic() - started
        answer = requests.post(
            f"{base}/invocations", json=body, headers={"Authorization": f"Bearer {TOKEN}"}
        )
        answer.raise_for_status()
        answer_s = time.monotonic() - started
        stopping = time.monotonic()
        podman("kill", "--signal", "TERM", name)
        exit_code = podman("wait", name)
        stop_s = time.monotonic() - stopping
    finally:
        subprocess.run(["podman", "rm", "--force", name], capture_output=True, env=ENV)
    return {"ping_s": ping_s, "first_answer_s": answer_s, "sigterm_to_exit_s": stop_s,
            "exit_code": int(exit_code)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/container_cpu.jsonl")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        baked_image(root)
        token_file = root / "token"
        token_file.write_text(TOKEN)
        token_file.chmod(0o644)
        pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
        png = base64.b64encode(encode_png(pixels)).decode()
        body = {"dataframe_split": {"columns": ["image"], "data": [[png]]}}
        starts = [one_start(token_file, body) for _ in range(args.starts)]
    layers = json.loads(podman("history", "--format", "json", TAG))
    record = {
        "benchmark": "container_start",
        **machine(),
        "podman": podman("--version"),
        "image": TAG,
        "model": "resnet18",
        "image_gb": round(int(podman("image", "inspect", "--format", "{{.Size}}", TAG)) / 1e9, 2),
        "largest_layers_gb": sorted(
            (round(layer["size"] / 1e9, 2) for layer in layers), reverse=True
        )[:3],
        "starts": args.starts,
        **{
            f"{key}_median": round(float(np.median([s[key] for s in starts])), 2)
            for key in ("ping_s", "first_answer_s", "sigterm_to_exit_s")
        },
        "max_first_answer_s": round(max(s["first_answer_s"] for s in starts), 2),
        "exit_codes": sorted({s["exit_code"] for s in starts}),
    }
    print(json.dumps(record, indent=2))
    with open(args.out, "a") as out:
        out.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
