"""What the JPEG copy costs: the same images trained on as original pixels and as their JPEGs.

../shared/data/cifar10-subset holds 5,085 original CIFAR-10 training images (the first 1,017 of each
official batch); the JPEG archive holds all 50,000, numbered per class in the official order. So
per batch and class the subset's images are a run of consecutive JPEG numbers: its start is the
JPEG nearest to the run's first image, and every pair of the run is checked. The matched JPEGs'
pixels are written in the subset's own layout (same order, so `train` draws the same split), then
the real train command runs on both copies for each seed. One JSON line per run, then the paired
differences.

    python benchmarks/jpeg_penalty.py --recipe "model=fastnet" --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import mlflow
import numpy as np

from benchmarks.time_to_accuracy import emit, run_recipe
from pipeline.data.cifar_batches import (
    BATCH_DIR,
    TRAIN_BATCHES,
    read_batch,
    write_batch,
    write_meta,
)
from pipeline.data.sources import load_training_set

# Mean absolute difference (of 255) below which a JPEG is taken as the same picture: the README
# of the JPEG copy gives 3-7 levels on average; different pictures differ by 36 or more.
SAME_PICTURE = 15.0


def mean_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.int16) - b.astype(np.int16)).reshape(len(a), -1).mean(axis=1)


def write_jpeg_twin(subset_dir: Path, archive: str, target: Path) -> list[float]:
    """The subset's batches with each image replaced by its JPEG; returns each pair's difference."""
    jpegs = load_training_set(archive)
    per_class = [jpegs.images[jpegs.labels == c] for c in range(10)]
    batch_dir = target / BATCH_DIR
    batch_dir.mkdir(parents=True)
    differences: list[float] = []
    for name in TRAIN_BATCHES:
        images, labels = read_batch(subset_dir / BATCH_DIR / name)
        twin = images.copy()
        for c in range(10):
            mine = images[labels == c]
            start = int(mean_difference(per_class[c], mine[:1]).argmin())
            matched = per_class[c][start : start + len(mine)]
            pairs = mean_difference(matched, mine[: len(matched)])
            if len(matched) < len(mine) or pairs.max() > SAME_PICTURE:
                raise SystemExit(f"{name}, class {c}: the JPEG copy does not match the subset.")
            twin[labels == c] = matched
            differences += pairs.tolist()
        write_batch(batch_dir / name, twin, labels)
    write_meta(batch_dir)
    return differences


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--subset-dir", type=Path, default=Path("../shared/data/cifar10-subset"))
    parser.add_argument("--archive", default="../shared/data/cifar10-jpeg/train.tar.gz")
    parser.add_argument("--recipe", default="model=fastnet", help="train parameters, name=value")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output", type=Path, help="also append the JSON lines to this file")
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    with tempfile.TemporaryDirectory() as tmp:
        twin = Path(tmp) / "jpeg-twin"
        differences = write_jpeg_twin(args.subset_dir, args.archive, twin)
        emit({"matched_images": len(differences),
              "mean_abs_difference": round(statistics.mean(differences), 2)}, args.output)  # fmt: skip
        accuracy: dict[str, list[float]] = {"original": [], "jpeg": []}
        for seed in args.seeds:
            for copy, data_dir in (("original", args.subset_dir), ("jpeg", twin)):
                line = run_recipe(f"{args.recipe} seed={seed}", str(data_dir))
                accuracy[copy].append(line["best_val_accuracy"])
                emit({"copy": copy, "seed": seed} | line, args.output)
    paired = [o - j for o, j in zip(accuracy["original"], accuracy["jpeg"], strict=True)]
    emit({"recipe": args.recipe, "seeds": args.seeds,
          "mean_original": round(statistics.mean(accuracy["original"]), 4),
          "mean_jpeg": round(statistics.mean(accuracy["jpeg"]), 4),
          "original_minus_jpeg": [round(d, 4) for d in paired]}, args.output)  # fmt: skip


if __name__ == "__main__":
    main()
