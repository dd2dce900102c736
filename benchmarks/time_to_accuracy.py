"""Time to 93%, 94% and 95% validation accuracy: the real `train` command, per recipe.

Each recipe runs `python -m pipeline.cli train` as users do (MLflow tracking, checkpoints, model
logging), then the script reads back what the run tracked: for every epoch the seconds since
training started (`elapsed_seconds`: after data loading and model building) and `val_accuracy`. It
prints one JSON line per recipe with the first epoch and time at which each threshold was reached,
the whole command's wall time, and where the time of an average epoch went (training pass,
validation, everything else: logging and checkpoints).

    python benchmarks/time_to_accuracy.py --data-dir ../shared/data/cifar10-jpeg/train.tar.gz \\
        --recipe "model=resnet18" --recipe "model=resnet18 epochs=15 cutout=0" --recipe "model=cnn"

A recipe is `name=value` train parameters over experiments/<model>.yaml.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow

THRESHOLDS = (0.93, 0.94, 0.95)
EXPERIMENT = "time-to-accuracy"


def run_recipe(recipe: str, data_dir: str) -> dict:
    options = dict(item.split("=", 1) for item in recipe.split())
    command = [sys.executable, "-m", "pipeline.cli", "train", "--data-dir", data_dir]
    command += ["--experiment-name", EXPERIMENT]
    for name, value in options.items():
        command += [f"--{name.replace('_', '-')}", value]
    started = time.perf_counter()
    returncode = subprocess.call(command)
    wall = time.perf_counter() - started
    if returncode != 0:  # refused or failed: train said why; there is no history to summarize
        return {"recipe": recipe, "rc": returncode, "command_seconds": round(wall, 1)}
    run = mlflow.search_runs(
        experiment_names=[EXPERIMENT], order_by=["attributes.start_time DESC"], output_format="list"
    )[0]
    return {"recipe": recipe, "rc": returncode, "command_seconds": round(wall, 1)} | summarize(run)


def first_epoch_at(accuracy: list[float], threshold: float) -> int | None:
    """The index of the first epoch whose validation accuracy reached `threshold`, if any."""
    return next((i for i, value in enumerate(accuracy) if value >= threshold), None)


def summarize(run: mlflow.entities.Run) -> dict:
    client = mlflow.MlflowClient()
    history = {
        key: [
            m.value
            for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        ]
        for key in ("val_accuracy", "elapsed_seconds", "epoch_seconds", "images_per_second")
    }
    accuracy, elapsed = history["val_accuracy"], history["elapsed_seconds"]
    reached = {}
    for threshold in THRESHOLDS:
        epoch = first_epoch_at(accuracy, threshold)
        reached[f"seconds_to_{threshold:.2f}"] = None if epoch is None else round(elapsed[epoch], 1)
        reached[f"epoch_to_{threshold:.2f}"] = None if epoch is None else epoch + 1
    train_images = run.data.metrics["train_images"]
    train_pass = [train_images / ips for ips in history["images_per_second"]]
    epochs = len(accuracy)
    gaps = [b - a for a, b in zip([0.0, *elapsed[:-1]], elapsed, strict=True)]
    return {
        "run_id": run.info.run_id,
        "model": run.data.params.get("resolved.model", run.data.params.get("model")),
        "device": run.data.tags.get("device"),
        "epochs": epochs,
        "best_val_accuracy": round(run.data.metrics["best_val_accuracy"], 4),
        "final_val_accuracy": round(accuracy[-1], 4),
        "train_seconds": round(elapsed[-1], 1),
        **reached,
        "epoch_train_pass_s": round(sum(train_pass) / epochs, 3),
        "epoch_validation_s": round(
            sum(e - t for e, t in zip(history["epoch_seconds"], train_pass, strict=True)) / epochs,
            3,
        ),
        "epoch_other_s": round(
            sum(g - e for g, e in zip(gaps, history["epoch_seconds"], strict=True)) / epochs, 3
        ),
        "val_accuracy_per_epoch": [round(a, 4) for a in accuracy],
        "elapsed_per_epoch": [round(e, 2) for e in elapsed],
    }


def emit(result: dict, output: Path | None) -> None:
    """One JSON line on stdout, and appended to `output` when given."""
    line = json.dumps(result)
    print(line, flush=True)
    if output:
        with output.open("a") as f:
            f.write(line + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--recipe", action="append", required=True)
    parser.add_argument("--output", type=Path, help="also append the JSON lines to this file")
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    for recipe in args.recipe:
        emit(run_recipe(recipe, args.data_dir), args.output)


if __name__ == "__main__":
    main()
