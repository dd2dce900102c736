"""The watchdog: a run that is not going to become useful by spending its remaining epochs.

It reads every step's loss, not only each epoch's mean: a run whose loss climbs or turns
non-finite within an epoch is the same diverging run on every CPU kind, precision and thread
count, whichever of the two its kernels happen to show first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from scipy.stats import binomtest

WATCH_AFTER_EPOCHS = 3  # at chance this long: not learning
DIVERGED_FACTOR = 1.5  # a stretch of steps whose mean loss is this many times the first steps'
CHANCE_P_VALUE = 0.01


@dataclass(frozen=True)
class WatchdogFinding:
    """What the watchdog found: its kind (a tag value) and what a person reads (cause and fix)."""

    kind: str  # "diverging" or "not learning"
    message: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


def loss_window(steps_per_epoch: int) -> int:
    """Steps averaged before a rise counts: a quarter of an epoch, at least 4 (or the epoch)."""
    return min(steps_per_epoch, max(4, steps_per_epoch // 4))


def diverging(
    losses: torch.Tensor, start_loss: float, epoch: int, lr: float
) -> WatchdogFinding | None:
    """A window of steps whose mean rose past DIVERGED_FACTOR times `start_loss` (the run's
    first window), or a non-finite step loss, whichever comes first; `losses`: this epoch's step
    losses, on the CPU."""
    if len(losses) == 0:
        return None
    fix = (
        f"Likely cause: the learning rate ({lr:.3g}) is too high for this model and batch size. "
        f"Fix: lower it, e.g. -P lr={lr / 10:.3g}."
    )
    window = loss_window(len(losses))
    means = losses.unfold(0, window, 1).mean(dim=1)  # a window with a NaN never counts as risen
    risen = (means > DIVERGED_FACTOR * start_loss).nonzero()
    broken = (~torch.isfinite(losses)).nonzero()
    rise_ends = int(risen[0]) + window if len(risen) else len(losses) + 1
    breaks_at = int(broken[0]) + 1 if len(broken) else len(losses) + 1
    if rise_ends < breaks_at:
        return WatchdogFinding(
            "diverging",
            f"the training loss rose from {start_loss:.3f} (its first steps) to "
            f"{float(means[rise_ends - window]):.3f} (epoch {epoch + 1}, steps "
            f"{rise_ends - window + 1}-{rise_ends}). {fix}",
        )
    if breaks_at <= len(losses):
        return WatchdogFinding(
            "diverging",
            f"the training loss became {float(losses[breaks_at - 1])} at epoch {epoch + 1}, step "
            f"{breaks_at} (from {start_loss:.3f} in its first steps). {fix}",
        )
    return None


def above_chance_p_value(accuracy: float, images: int, classes: int) -> float:
    """One-sided binomial test of `accuracy` on `images` against guessing among `classes`."""
    correct = round(accuracy * images)
    return float(binomtest(correct, images, 1 / classes, alternative="greater").pvalue)


def not_learning(
    history: list[dict[str, float]], val_images: int, classes: int, lr: float
) -> WatchdogFinding | None:
    """A run whose best validation accuracy is still indistinguishable from chance after
    WATCH_AFTER_EPOCHS epochs, with its likely causes and fixes; None otherwise."""
    epoch = len(history)
    if epoch < WATCH_AFTER_EPOCHS:
        return None
    best = max(m["val_accuracy"] for m in history)
    p_value = above_chance_p_value(best, val_images, classes)
    if p_value < CHANCE_P_VALUE:
        return None
    return WatchdogFinding(
        "not learning",
        f"after {epoch} epochs the best validation accuracy is {best:.4f}, "
        f"no better than chance ({1 / classes:.3f} for {classes} classes; p={p_value:.2g} "
        f"on {val_images} images). Likely causes: a learning rate too high or too low for "
        f"this data (lr {lr:.3g}), too few epochs, or labels that do not match the images. "
        f"Fix: try -P lr={lr / 10:.3g} (or a larger one), more -P epochs, or check the "
        "labels (cifar10 preprocess).",
    )
