"""Accuracy against training-set size with each model's default recipe, scaled or not.

Each case is one real `train` (run_train, tracked to a throw-away SQLite store) on real images:
- `three`: a 3-class folder of the first 300 JPEGs per class (airplane, frog, truck) of the shared
  archive (270 train / 30 validation per class);
- `subset`: the 5,085-image real subset in the official pickle format (4,576 / 509);
- `full`: all 50,000 JPEGs (45,000 / 5,000).
A case is `data:model:epochs[:name=value,...]`; explicit values are never scaled, so
`three:cnn:5:batch_size=256,lr=0.004` is the recipe as written (unscaled).

    python benchmarks/recipe_scaling.py three:cnn:5 three:cnn:5:batch_size=256,lr=0.004 ...
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import mlflow

from pipeline.config import resolve_train_config
from pipeline.train import run_train
from tests.conftest import REAL_JPEG_ARCHIVE, REAL_SUBSET, write_jpeg_folder


def data_dir(name: str, scratch: Path) -> str:
    if name == "three":
        folder = scratch / "three"
        if not folder.exists():
            write_jpeg_folder(folder, ("airplane", "frog", "truck"), 300)
        return str(folder)
    return str(REAL_SUBSET if name == "subset" else REAL_JPEG_ARCHIVE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("cases", nargs="+", help="data:model:epochs[:name=value,...]")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        mlflow.set_tracking_uri(f"sqlite:///{scratch}/mlflow.db")
        for case in args.cases:
            data, model, epochs, *rest = case.split(":")
            overrides = dict(item.split("=", 1) for item in rest[0].split(",")) if rest else {}
            config = resolve_train_config(
                {"model": model, "data_dir": data_dir(data, scratch), "epochs": epochs,
                 "experiment_name": "recipes"} | overrides
            )  # fmt: skip
            started = time.perf_counter()
            result = run_train(config)
            run = mlflow.get_run(result.run_id)
            history = mlflow.MlflowClient().get_metric_history(result.run_id, "val_accuracy")
            print(
                json.dumps(
                    {
                        "case": case,
                        "train_images": int(run.data.metrics["train_images"]),
                        "batch_size": int(float(run.data.params.get("resolved.batch_size")
                                                or run.data.params["batch_size"])),
                        "lr": float(run.data.params.get("resolved.lr") or run.data.params["lr"]),
                        "val_accuracy": [round(m.value, 4) for m in sorted(history, key=lambda m: m.step)],
                        "best_val_accuracy": round(result.best_val_accuracy, 4),
                        "epochs_run": result.epochs_run,
                        "watchdog": run.data.tags.get("watchdog", ""),
                        "seconds": round(time.perf_counter() - started),
                    }
                ),
                flush=True,
            )  # fmt: skip


if __name__ == "__main__":
    main()
