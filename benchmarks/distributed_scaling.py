"""Training images/s of the real `train` command on 1, 2, ... processes (torch.distributed, gloo on
CPU or NCCL on CUDA), the same global batch and recipe, on the real 5,085-image subset.

Each setting is one `cifar10 train` in a fresh store; the figure is the median `images_per_second`
of its epochs after the first (global: all processes together), efficiency = images/s at N /
(N x images/s at 1). On a CPU machine the processes share its cores (each gets cores / N threads),
so N > 1 shows the cost of the collectives, not a speed-up; several GPUs show the real scaling.

    python -m benchmarks.distributed_scaling [--processes 1 2] [--model fastnet] [--epochs 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow
import numpy as np

from benchmarks.machine import machine
from pipeline.tracking.lineage import PROJECT_ROOT

SUBSET = PROJECT_ROOT.parent / "shared" / "data" / "cifar10-subset"


def one_setting(processes: int, args: argparse.Namespace, root: Path) -> dict:
    uri = f"sqlite:///{root / f'n{processes}.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "train", "--model", args.model, "--data-dir",
         args.data_dir, "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
         "--nproc-per-node", str(processes), "--experiment-name", "scaling"],
        env=env | {"MLFLOW_TRACKING_URI": uri}, cwd=root, capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    mlflow.set_tracking_uri(uri)
    run = mlflow.search_runs(experiment_names=["scaling"], output_format="list")[0]
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "images_per_second")
    rates = [m.value for m in sorted(history, key=lambda m: m.step)][1:]
    return {
        "processes": processes,
        "images_per_second": round(float(np.median(rates)), 1),
        "best_val_accuracy": round(run.data.metrics["best_val_accuracy"], 4),
        "train_seconds": round(run.data.metrics["train_seconds"], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--model", default="fastnet")
    parser.add_argument("--data-dir", default=str(SUBSET))
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--out", default="benchmarks/results/distributed_cpu.jsonl")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [one_setting(n, args, Path(tmp)) for n in args.processes]
    single = next((r for r in rows if r["processes"] == 1), None)
    for row in rows:
        if single:
            ideal = row["processes"] * single["images_per_second"]
            row["efficiency"] = round(row["images_per_second"] / ideal, 3)
        print(json.dumps(row), flush=True)
    record = {"benchmark": "distributed_scaling", **machine(), "model": args.model,
              "data": args.data_dir,
              "global_batch": args.batch_size, "epochs": args.epochs, "rows": rows}  # fmt: skip
    with open(args.out, "a") as out:
        out.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
