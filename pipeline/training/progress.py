"""What a person reads while a model trains: the start line with a CPU estimate, one line per
epoch (readable on a terminal and in a log file alike), and durations."""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from pipeline.config import TrainConfig
from pipeline.data.cifar_batches import CLASS_NAMES
from pipeline.errors import in_users_form
from pipeline.training.loader import DeviceBatches
from pipeline.training.precision import autocast, autocast_dtype
from pipeline.training.prepare import Prepared
from pipeline.training.recipes import MIN_STEPS_PER_EPOCH


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class EpochProgress:
    """An epoch bar with the total and an ETA on a terminal, and one plain line per epoch that reads
    the same in a redirected log (CI, nohup, a cluster job)."""

    def __init__(self, total_epochs: int, first_epoch: int = 0) -> None:
        self.total, self.first = total_epochs, first_epoch
        self.bar = tqdm(
            total=total_epochs,
            initial=first_epoch,
            unit="epoch",
            file=sys.stderr,
            disable=not sys.stderr.isatty(),
        )

    def __call__(self, epoch: int, metrics: dict[str, float], checkpoint: Path | None) -> None:
        done = epoch + 1
        if "planned_epochs" in metrics:  # a time budget's pacer re-laid the plan
            self.total = self.bar.total = int(metrics["planned_epochs"])
        per_epoch = metrics["elapsed_seconds"] / max(1, done - self.first)
        self.write(
            f"epoch {done}/{self.total}  train_loss {metrics['train_loss']:.4f}  "
            f"val_accuracy {metrics['val_accuracy']:.4f}  {metrics['epoch_seconds']:.1f} s  "
            f"ETA {format_duration(per_epoch * (self.total - done))}",
        )
        self.bar.update(1)

    def write(self, line: str) -> None:
        """A line above the bar on a terminal, a plain line in a log."""
        tqdm.write(in_users_form(line), file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


def seconds_per_image(
    model: nn.Module, batches: DeviceBatches, dtype: torch.dtype | None = None
) -> tuple[float, float]:
    """Training steps and validation forward passes of a copy of `model` on one real batch (up to
    256 images), the median of three after two warm-ups: the first steps build the CPU's kernels
    and run several times slower, and one timing on a busy machine is noise. Returns (training,
    validation) seconds per image."""
    probe = copy.deepcopy(model).train()
    images, labels = next(iter(batches))
    images, labels = images[:256], labels[:256]

    def train_step() -> None:
        with autocast(batches.device, dtype):
            loss = nn.functional.cross_entropy(probe(images), labels)
        loss.backward()

    def forward() -> None:
        with torch.no_grad(), autocast(batches.device, dtype):
            probe(images)

    def median_seconds(step) -> float:
        times = []
        for repeat in range(5):
            started = time.perf_counter()
            step()
            if batches.device.type == "cuda":
                torch.cuda.synchronize(batches.device)
            if repeat >= 2:
                times.append(time.perf_counter() - started)
        return sorted(times)[1] / len(labels)

    training = median_seconds(train_step)
    probe.eval()
    return training, median_seconds(forward)


def recipe_note(config: TrainConfig, recipe: TrainConfig, train_images: int) -> str:
    """Batch size and learning rate, and where they come from when scaled to the data."""
    if (config.batch_size, config.lr) == (recipe.batch_size, recipe.lr):
        return f"batch {config.batch_size}, lr {config.lr:.3g}"
    return (
        f"batch {config.batch_size}, lr {config.lr:.3g} (the recipe's {recipe.batch_size} and "
        f"{recipe.lr:.3g} scaled to {train_images:,} images: at least {MIN_STEPS_PER_EPOCH} steps "
        "an epoch)"
    )


def mirror_note(config: TrainConfig, class_names: tuple[str, ...]) -> str | None:
    """On a user's own classes, say that images are mirrored: on digits or text a mirror can
    change the class (CIFAR-10's classes are mirror-safe)."""
    mirrored = [
        name for name, on in (("flip augmentation", config.flip), ("flip TTA", config.tta)) if on
    ]
    if not mirrored or set(class_names) <= set(CLASS_NAMES):
        return None
    return (
        f"note: training mirrors your images ({' and '.join(mirrored)}); if a mirrored image can "
        "belong to another class (digits, letters, arrows), pass -P flip=false -P tta=false"
    )


def announce_training(
    prepared: Prepared, recipe: TrainConfig, first_epoch: int, plan: str | None = None
) -> None:
    """The line before training: what runs where, with which batch and learning rate, and on a CPU
    how long it will take (training and validation); with a time budget, its `plan`."""
    config = prepared.config
    dtype = autocast_dtype(prepared.device, config.precision)
    epochs = config.epochs - first_epoch
    train_images, val_images = len(prepared.splits.train), len(prepared.splits.val)
    line = (
        f"training {config.model} on {prepared.device}"
        f"{' in bfloat16' if dtype else ''}: {train_images:,} images "
        f"({val_images:,} for validation), {epochs} epoch{'s' * (epochs != 1)}, "
        f"{recipe_note(config, recipe, train_images)}"
    )
    if note := mirror_note(config, prepared.data.class_names):
        print(in_users_form(note), file=sys.stderr, flush=True)
    if plan:
        print(f"{line}; time budget: {plan}", file=sys.stderr, flush=True)
        return
    if prepared.device.type != "cpu":
        print(f"{line}; the first epoch gives the ETA", file=sys.stderr, flush=True)
        return
    training, validation = seconds_per_image(prepared.model, prepared.train_batches, dtype)
    passes = 2 if config.tta else 1
    estimate = epochs * (
        training * prepared.train_batches.num_images + passes * validation * val_images
    )
    print(f"{line}; about {format_duration(estimate)}", file=sys.stderr, flush=True)
    if estimate > 3600:
        print(
            in_users_form(
                "warning: that is over an hour on the CPU. Use a GPU, -P model=cnn, or fewer "
                "-P epochs=... (or -P max_train_images=...) to try things out."
            ),
            file=sys.stderr,
            flush=True,
        )
