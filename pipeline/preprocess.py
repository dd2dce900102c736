"""The `preprocess` stage: integrity checks, split statistics and plots, all logged to MLflow."""

from __future__ import annotations

from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import mlflow
import numpy as np

from pipeline.config import PreprocessConfig, config_to_params
from pipeline.data.image_set import ImageSet
from pipeline.data.sources import (
    DataUnavailableError,
    checked,
    duplicate_counts,
    make_splits,
    read_split,
)
from pipeline.tracking.runs import (
    log_dataset,
    log_figure,
    log_json,
    log_lineage,
    log_resolved_params,
    print_summary,
    source_name,
    stage_run,
)

CHANNELS = ("red", "green", "blue")


def read_sets(config: PreprocessConfig) -> tuple[ImageSet, ImageSet | None, list[dict[str, str]]]:
    """Training and test splits as any stage reads them, and everything that could not be used."""
    train = read_split(config.data_dir, "train", config.download)
    test = read_split(config.data_dir, "test", config.download)
    problems = [
        {"split": name, **problem}
        for name, split in (("train", train), ("test", test))
        if split is not None
        for problem in split.problems
    ]
    if train is None or len(train) == 0:
        log_json(problems, "integrity.json")
        raise DataUnavailableError(
            f"{config.data_dir} has no readable training image; see integrity.json. "
            "Replace the files or pass -P data_dir=... pointing to data that has them."
        )
    return train, test, problems


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


def split_metrics(
    data: ImageSet,
    test: ImageSet | None,
    splits: dict[str, ImageSet],
    counts: dict[str, dict[str, int]],
    problems: list[dict],
) -> dict[str, float]:
    """Images per split and class, duplicates, unusable files and the label range."""
    metrics = {f"{split}_images": len(s) for split, s in splits.items()}
    metrics |= {f"{split}_count_{name}": n for split, c in counts.items() for name, n in c.items()}
    metrics |= duplicate_counts(data.images, test.images if test is not None else None)
    metrics |= {
        f"{kind}_files": sum(p["kind"] == kind for p in problems)
        for kind in ("unreadable", "empty_class", "unknown_class")
    }
    return metrics | {
        "num_classes": len(data.class_names),
        "label_min": int(data.labels.min()),
        "label_max": int(data.labels.max()),
    }


def run_preprocess(config: PreprocessConfig) -> PreprocessResult:
    """The `preprocess` entry point. Unusable files are logged first, then fail the run unless
    `skip_bad_images`."""
    with stage_run(
        "preprocess", config.experiment_name, f"preprocess · {source_name(config.data_dir)}"
    ) as run:
        log_resolved_params(config_to_params(config))
        data, test, problems = read_sets(config)
        names = data.class_names
        carved = make_splits(data, config.val_fraction, config.seed)
        train, mean, std = carved.train, carved.mean, carved.std
        splits = {"train": train, "val": carved.val} | ({"test": test} if test is not None else {})
        counts = {split: class_counts(s.labels, names) for split, s in splits.items()}
        mlflow.log_metrics(split_metrics(data, test, splits, counts, problems))
        stats = {
            "mean": list(mean),
            "std": list(std),
            "class_names": list(names),
            "counts": {split: len(s) for split, s in splits.items()},
            "class_counts": counts,
            "val_fraction": config.val_fraction,
            "seed": config.seed,
            "source": data.source,
            "digest": data.digest,
            "train_digest": train.digest,
        }
        log_json(stats, "stats.json")
        log_json(problems, "integrity.json")
        log_figure(plot_class_distribution(counts, names), "plots/class_distribution.png")
        log_figure(plot_samples(train, seed=config.seed), "plots/samples_per_class.png")
        log_figure(plot_pixel_histograms(train.images), "plots/pixel_histograms.png")
        log_dataset(train, context="preprocess")
        log_lineage(splits, config_to_params(config))
        mlflow.set_tag("data_source", data.source)
        for split in (data, test):
            if split is not None:
                checked(split, config.skip_bad_images)
        print_summary(
            "preprocess",
            {
                "images": ", ".join(f"{len(s):,} {name}" for name, s in splits.items())
                + ("" if test is not None else " (no test split)")
                + f"; {len(names)} classes",
                "mean / std": f"{[round(v, 4) for v in mean]} / {[round(v, 4) for v in std]}",
                "unusable files": f"{len(problems)} (skipped; see integrity.json)"
                if problems
                else "none",
            },
            f"mlflow run . -e train --env-manager local -P data_dir={config.data_dir}"
            + (" -P skip_bad_images=true" if problems else ""),
        )
    return PreprocessResult(run.info.run_id, stats)
