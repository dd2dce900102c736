"""Seconds for 10,000 test images through the `cnn` with the evaluate stage (every plot included).

A `cnn` with its default options is trained for one epoch on synthetic data (speed does not depend
on accuracy), then `evaluate` scores a 10,000-image `test_batch` written in the official format,
going through the logged pyfunc exactly as the evaluate entry point does.

    python benchmarks/evaluate_speed.py [--images 10000]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import mlflow

from pipeline.config import EvaluateConfig, resolve_train_config
from pipeline.data.cifar_batches import BATCH_DIR, write_batch, write_meta
from pipeline.data.sources import make_synthetic
from pipeline.evaluate import run_evaluate
from pipeline.train import run_train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
        test = make_synthetic(args.images, seed=7)
        batch_dir = Path(tmp) / "data" / BATCH_DIR
        batch_dir.mkdir(parents=True)
        write_batch(batch_dir / "test_batch", test.images, test.labels)
        write_meta(batch_dir)
        config = resolve_train_config(
            {"data_dir": "synthetic", "epochs": 1, "experiment_name": "bench"}
        )
        trained = run_train(config)
        started = time.perf_counter()
        result = run_evaluate(
            EvaluateConfig(model_uri=trained.model_uri, data_dir=str(batch_dir.parent))
        )
        seconds = time.perf_counter() - started
    print(
        json.dumps(
            {
                "images": args.images,
                "model": "cnn",
                "width": config.options["width"],
                "evaluate_stage_seconds": round(seconds, 1),
                "images_per_second": round(args.images / seconds),
                "test_accuracy": round(result.metrics["test_accuracy"], 4),
            }
        )
    )


if __name__ == "__main__":
    main()
