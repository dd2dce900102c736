"""The `preprocess` stage: integrity checks, split statistics and plots, all logged to MLflow."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import mlflow
import numpy as np

from pipeline.config import PreprocessConfig, config_to_params
from pipeline.data import (
    META_FILE,
    SYNTHETIC,
    SYNTHETIC_TEST_SIZE,
    SYNTHETIC_TRAIN_SIZE,
    TEST_BATCH,
    TRAIN_BATCHES,
    DataIntegrityError,
    DataUnavailableError,
    ImageSet,
    channel_stats,
    duplicate_counts,
    locate_batches,
    make_synthetic,
    read_batch,
    read_class_names,
    stratified_split,
)
from pipeline.tracking import log_dataset, log_figure, log_json, log_resolved_params, stage_run

CHANNELS = ("red", "green", "blue")


def inspect_batches(batch_dir: Path) -> tuple[list[dict], ImageSet, ImageSet | None]:
    """Read every expected batch file, recording for each whether it is present and sound."""
    report = []
    parts: dict[str, list] = {"train": [], "test": []}
    for name in (*TRAIN_BATCHES, TEST_BATCH):
        path = batch_dir / name
        entry = {"file": name, "status": "missing"}
        if path.is_file():
            try:
                images, labels = read_batch(path)
            except DataIntegrityError as error:
                entry |= {"status": "unreadable", "error": str(error)}
            else:
                entry |= {
                    "status": "ok",
                    "images": len(labels),
                    "shape": list(images.shape[1:]),
                    "dtype": str(images.dtype),
                    "label_min": int(labels.min()) if len(labels) else None,
                    "label_max": int(labels.max()) if len(labels) else None,
                }
                parts["test" if name == TEST_BATCH else "train"].append((images, labels))
        report.append(entry)
    report.append(
        {"file": META_FILE, "status": "ok" if (batch_dir / META_FILE).is_file() else "missing"}
    )
    names = read_class_names(batch_dir)
    sets = {
        key: ImageSet(
            np.concatenate([p[0] for p in value]),
            np.concatenate([p[1] for p in value]),
            names,
            str(batch_dir.resolve()),
        )
        for key, value in parts.items()
        if value
    }
    if "train" not in sets:
        raise DataUnavailableError(
            f"{batch_dir} has no readable training batch (data_batch_1..5); see integrity.json. "
            "Replace the files or pass -P data_dir=... pointing to a directory that has them."
        )
    return report, sets["train"], sets.get("test")


def synthetic_sets() -> tuple[list[dict], ImageSet, ImageSet]:
    train, test = make_synthetic(SYNTHETIC_TRAIN_SIZE, 0), make_synthetic(SYNTHETIC_TEST_SIZE, 1)
    report = [{"file": SYNTHETIC, "status": "ok", "images": len(train) + len(test)}]
    return report, train, test


def class_counts(labels: np.ndarray, names: tuple[str, ...]) -> dict[str, int]:
    counts = np.bincount(labels, minlength=len(names))
    return {name: int(count) for name, count in zip(names, counts, strict=True)}


def plot_class_distribution(counts: dict[str, dict[str, int]], names: tuple[str, ...]):
    figure, axis = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(counts)
    for i, (split, per_class) in enumerate(counts.items()):
        x = np.arange(len(names)) + i * width
        axis.bar(x, [per_class[n] for n in names], width=width, label=split)
    axis.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=30)
    axis.set_ylabel("images")
    axis.set_title("Images per class and split")
    axis.legend()
    figure.tight_layout()
    return figure


def plot_samples(data: ImageSet, per_class: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    names = data.class_names
    figure, axes = plt.subplots(len(names), per_class, figsize=(per_class, len(names) * 1.05))
    for row, name in enumerate(names):
        index = np.flatnonzero(data.labels == row)
        chosen = rng.choice(index, size=min(per_class, len(index)), replace=False)
        for col in range(per_class):
            axis = axes[row, col]
            axis.axis("off")
            if col < len(chosen):
                axis.imshow(data.images[chosen[col]])
        axes[row, 0].set_title(name, fontsize=8, loc="left")
    figure.tight_layout()
    return figure


def plot_pixel_histograms(images: np.ndarray):
    figure, axis = plt.subplots(figsize=(8, 4))
    for channel, name in enumerate(CHANNELS):
        counts = np.bincount(images[..., channel].ravel(), minlength=256)
        axis.plot(np.arange(256), counts / counts.sum(), color=name, label=name)
    axis.set_xlabel("pixel value")
    axis.set_ylabel("fraction of pixels")
    axis.set_title("Per-channel pixel histograms (training split)")
    axis.legend()
    figure.tight_layout()
    return figure


@dataclass
class PreprocessResult:
    run_id: str
    stats: dict


def run_preprocess(config: PreprocessConfig) -> PreprocessResult:
    """The `preprocess` entry point. Unreadable files are logged first, then fail the run."""
    with stage_run(config.experiment_name, "preprocess") as run:
        log_resolved_params(config_to_params(config))
        if config.data_dir == SYNTHETIC:
            report, data, test = synthetic_sets()
        else:
            report, data, test = inspect_batches(locate_batches(config.data_dir, config.download))
        names = data.class_names
        train_index, val_index = stratified_split(data.labels, config.val_fraction, config.seed)
        train, val = data.subset(train_index), data.subset(val_index)
        mean, std = channel_stats(train.images)
        splits = {"train": train, "val": val} | ({"test": test} if test is not None else {})
        counts = {split: class_counts(s.labels, names) for split, s in splits.items()}
        unreadable = [e["file"] for e in report if e["status"] == "unreadable"]
        metrics = {f"{split}_images": len(s) for split, s in splits.items()}
        metrics |= {
            f"{split}_count_{name}": n for split, c in counts.items() for name, n in c.items()
        }
        metrics |= duplicate_counts(data.images, test.images if test is not None else None)
        metrics |= {
            "unreadable_files": len(unreadable),
            "missing_batches": sum(e["status"] == "missing" for e in report),
            "label_min": int(data.labels.min()),
            "label_max": int(data.labels.max()),
        }
        mlflow.log_metrics(metrics)
        stats = {
            "mean": list(mean),
            "std": list(std),
            "class_names": list(names),
            "counts": {split: len(s) for split, s in splits.items()},
            "class_counts": counts,
            "val_fraction": config.val_fraction,
            "seed": config.seed,
            "source": data.source,
        }
        log_json(stats, "stats.json")
        log_json(report, "integrity.json")
        log_figure(plot_class_distribution(counts, names), "plots/class_distribution.png")
        log_figure(plot_samples(train, seed=config.seed), "plots/samples_per_class.png")
        log_figure(plot_pixel_histograms(train.images), "plots/pixel_histograms.png")
        log_dataset(train.images, train.labels, data.source, context="preprocess")
        mlflow.set_tag("data_source", data.source)
        if unreadable:
            raise DataIntegrityError(
                f"Unreadable batch files: {unreadable} (details in integrity.json). "
                "Replace them with official batch files or remove them and rerun."
            )
    return PreprocessResult(run.info.run_id, stats)
