"""Does the default `cnn` really learn? Train on the real subset, test on images it never saw.

The real subset has no test batch, so a stratified 10% of it (seeded) is written out as `test_batch`
and the other 90% as training batches; `train` then carves its usual 10% validation split from those.
Prints one JSON line: wall-clock seconds of the whole train stage (MLflow included) and test scores.

    python benchmarks/cnn_subset_accuracy.py [--set width=64 ...]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import mlflow

from pipeline.config import EvaluateConfig, resolve_train_config
from pipeline.data.cifar_batches import BATCH_DIR, write_batch
from pipeline.data.sources import load_training_set, stratified_split
from pipeline.evaluate import run_evaluate
from pipeline.train import run_train

SUBSET = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-subset"


def write_held_out_copy(subset: Path, root: Path, seed: int) -> Path:
    data = load_training_set(subset, download=False)
    train_index, test_index = stratified_split(data.labels, 0.1, seed)
    batch_dir = root / BATCH_DIR
    batch_dir.mkdir(parents=True)
    write_batch(batch_dir / "data_batch_1", data.images[train_index], data.labels[train_index])
    write_batch(batch_dir / "test_batch", data.images[test_index], data.labels[test_index])
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--subset", type=Path, default=SUBSET)
    parser.add_argument("--set", nargs="*", default=[], help="train overrides, name=value")
    parser.add_argument("--model", default="cnn")
    args = parser.parse_args()
    overrides = dict(item.split("=", 1) for item in args.set)
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
        data_dir = write_held_out_copy(args.subset, Path(tmp) / "data", seed=1234)
        config = resolve_train_config(
            {"model": args.model, "data_dir": str(data_dir), "experiment_name": "bench"} | overrides
        )
        started = time.perf_counter()
        trained = run_train(config)
        train_wall = time.perf_counter() - started
        evaluated = run_evaluate(
            EvaluateConfig(model_uri=trained.model_uri, data_dir=str(data_dir), gradcam_per_class=0)
        )
        run = mlflow.get_run(trained.run_id)
        print(
            json.dumps(
                {
                    "model": args.model,
                    "overrides": overrides,
                    "train_images": run.data.metrics["train_images"],
                    "test_images": mlflow.get_run(evaluated.run_id).data.metrics["test_images"],
                    "epochs": config.epochs,
                    "train_stage_seconds": round(train_wall, 1),
                    "best_val_accuracy": round(trained.best_val_accuracy, 4),
                    "test_accuracy": round(evaluated.metrics["test_accuracy"], 4),
                    "test_f1_macro": round(evaluated.metrics["test_f1_macro"], 4),
                }
            )
        )


if __name__ == "__main__":
    main()
