"""One training loop for every architecture: `fit()` and its parts.

It knows nothing of MLflow, the CLI or serving: each epoch's metrics go to callbacks (the train
stage's MLflow logger and progress lines, the tuner's pruning report).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from scipy.stats import binomtest
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from pipeline.config import TrainConfig
from pipeline.errors import PipelineError
from pipeline.model.architectures import class_probabilities, get_spec, is_frozen, set_frozen
from pipeline.training import distributed
from pipeline.training.loader import DeviceBatches, epoch_seed

# Called after every epoch with (epoch, metrics, the checkpoint written this epoch or None); it may
# raise to stop training (Optuna pruning does).
EpochCallback = Callable[[int, dict[str, float], Path | None], None]


class NonFiniteLossError(PipelineError):
    """The loss became NaN or infinite; the message names where and the likely cause."""


def select_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class Phase:
    """A stretch of epochs with one optimizer and schedule (fine-tuning has two)."""

    start: int
    end: int
    lr: float


def training_phases(config: TrainConfig, unfreezes: bool) -> list[Phase]:
    if unfreezes and 0 < config.freeze_epochs < config.epochs:
        return [
            Phase(0, config.freeze_epochs, config.lr),
            Phase(config.freeze_epochs, config.epochs, config.lr * config.finetune_lr_factor),
        ]
    return [Phase(0, config.epochs, config.lr)]


NORM_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)


def make_optimizer(model: nn.Module, config: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """SGD (Nesterov) or AdamW. With `bias_lr_factor` the normalization biases learn that many
    times faster with the same decay per step (airbench's bias scaler: with fixed-scale batch norm
    they are the thresholds, and they move little at the weights' rate)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups: list[dict[str, Any]] = [{"params": params}]
    if config.bias_lr_factor != 1:
        biases = {
            id(m.bias) for m in model.modules() if isinstance(m, NORM_LAYERS) and m.bias is not None
        }
        factor = config.bias_lr_factor
        groups = [
            {"params": [p for p in params if id(p) not in biases]},
            {
                "params": [p for p in params if id(p) in biases],
                "lr": lr * factor,
                "weight_decay": config.weight_decay / factor,
            },
        ]
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=lr, momentum=config.momentum, nesterov=True, weight_decay=config.weight_decay
        )
    return torch.optim.AdamW(groups, lr=lr, weight_decay=config.weight_decay)


# What "auto" means when set (fp32 or bf16): the test suite runs once with fp32, as on a CPU
# without bfloat16 (AVX2 only), so that both kinds of machine stay covered.
AUTO_PRECISION_ENV = "CIFAR10_AUTO_PRECISION"


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The reduced precision to compute in, None for float32. "auto" takes bfloat16 where the
    device computes it natively (CUDA; a CPU with AVX512-BF16 or AMX, where fastnet trains ~1.7x
    faster: benchmarks/RESULTS.md) and float32 elsewhere (emulated bfloat16 is slower)."""
    if precision == "auto":
        precision = os.environ.get(AUTO_PRECISION_ENV, "auto")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    native = (
        getattr(torch.cpu, name, lambda: False)()
        for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    )
    return torch.bfloat16 if device.type == "cpu" and any(native) else None


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    if dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def make_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, lr: float, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    if config.schedule == "onecycle" and total_steps >= 4:
        # OneCycleLR divides by its warm-up length in steps, so it needs at least two of them
        # (one epoch of 81 images at batch 16 is 5 steps: 20% of it is one step). It would also
        # cycle the momentum between 0.85 and 0.95 over the configured one (and AdamW's beta1):
        # the momentum a recipe or a search space sets is the one that runs.
        pct_start = max(config.warmup_fraction, 2 / total_steps)
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=[group["lr"] for group in optimizer.param_groups],
            total_steps=total_steps,
            pct_start=pct_start,
            cycle_momentum=False,
        )
    warmup = max(1, int(config.warmup_fraction * total_steps))

    def factor(step: int) -> float:
        if config.schedule == "constant" or total_steps < 4:
            return 1.0
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Lookahead:
    """Lookahead weights as airbench uses them: every `every` steps (and at the last) the running
    average takes a step towards the weights and the weights are set to it. Its decay grows with
    the cube of progress to 0.95**every, so early training is untouched and the low-learning-rate
    end is averaged over many steps. airbench counts it among its speed-ups; on fastnet's CPU recipe
    it made no measurable difference (benchmarks/RESULTS.md), so no recipe turns it on."""

    def __init__(
        self,
        model: nn.Module,
        every: int,
        total_steps: int,
        average: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.every = every
        self.total_steps = total_steps
        # The model's own tensors (its state dict shares their storage), parameters and running
        # statistics alike: training updates them in place.
        self.weights = {
            name: value for name, value in model.state_dict().items() if value.is_floating_point()
        }
        self.average = {  # a checkpoint's average was loaded onto the CPU
            name: (average[name] if average else value).to(value.device, copy=True)
            for name, value in self.weights.items()
        }

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """`step`: steps taken in this phase so far (the scheduler's count, restored on resume)."""
        if step % self.every and step != self.total_steps:
            return
        decay = 0.95**self.every * (step / self.total_steps) ** 3
        for name, weights in self.weights.items():
            self.average[name].lerp_(weights, 1 - decay)
            weights.copy_(self.average[name])


def train_one_epoch(
    model: nn.Module,
    batches: DeviceBatches,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loss_fn: nn.Module,
    epoch: int,
    dtype: torch.dtype | None = None,
    lookahead: Lookahead | None = None,
) -> dict[str, float]:
    """One pass over the shuffled, augmented split; statistics stay on the device until the end."""
    model.train()
    device = batches.device
    step_losses = torch.zeros(len(batches), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    progress = tqdm(
        batches,
        desc=f"epoch {epoch + 1}",
        leave=False,
        position=1,
        file=sys.stderr,
        disable=not sys.stderr.isatty(),
    )
    for step, (images, labels) in enumerate(progress):
        with autocast(device, dtype):
            logits = model(images)
            loss = loss_fn(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if lookahead is not None:
            lookahead.after_step(scheduler.last_epoch)
        step_losses[step] = loss.detach()
        correct += (logits.argmax(dim=1) == labels).sum()
    # Every process holds the same share of each global batch: the means over processes are the
    # whole batch's, and a NaN on any process stops them all at the same step.
    world = distributed.world_size()
    step_losses = distributed.summed(step_losses) / world
    correct = distributed.summed(correct)
    finite = torch.isfinite(step_losses)
    if not bool(finite.all()):
        bad_step = int((~finite).nonzero()[0])
        raise NonFiniteLossError(
            f"Loss became {float(step_losses[bad_step])} at epoch {epoch + 1}, step {bad_step + 1}. "
            f"Likely cause: the learning rate ({optimizer.param_groups[0]['lr']:.3g}) is too high "
            "for this model and batch size, or the input is not normalized; lower lr and rerun."
        )
    return {
        "train_loss": float(step_losses.mean()),
        "train_accuracy": float(correct) / (batches.num_images * world),
    }


@torch.no_grad()
def evaluate_batches(
    model: nn.Module, batches: DeviceBatches, tta: bool = False, dtype: torch.dtype | None = None
) -> dict[str, float]:
    """Cross-entropy and accuracy over every image of an unaugmented split, of the probabilities
    the served model gives (`class_probabilities`, with flip TTA when asked)."""
    model.eval()
    device = batches.device
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    for images, labels in batches:
        with autocast(device, dtype):
            probabilities = class_probabilities(model, images, tta)
        log_probabilities = probabilities.clamp_min(1e-12).log()
        total_loss += nn.functional.nll_loss(log_probabilities, labels, reduction="sum")
        correct += (probabilities.argmax(dim=1) == labels).sum()
    n = len(batches.labels)
    return {"val_loss": float(total_loss) / n, "val_accuracy": float(correct) / n}


@dataclass(frozen=True)
class WatchdogFinding:
    """What the watchdog found: its kind (a tag value) and what a person reads (cause and fix)."""

    kind: str  # "diverging" or "not learning"
    message: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


@dataclass
class FitState:
    """Everything that a checkpoint must hold for a resumed run to end where an unbroken one does."""

    next_epoch: int = 0
    best_val_accuracy: float = -1.0
    best_epoch: int = -1
    epochs_without_improvement: int = 0
    best_weights: dict[str, torch.Tensor] | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False
    problem: WatchdogFinding | None = None  # what the watchdog found, once

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any]) -> FitState:
        problem = saved.get("problem")
        return cls(**saved | {"problem": WatchdogFinding(**problem) if problem else None})

    def to_checkpoint(self) -> dict[str, Any]:
        """Plain values only: a checkpoint is loaded with `weights_only=True`."""
        return self.__dict__ | {"problem": self.problem.__dict__ if self.problem else None}


# The watchdog: a run whose validation accuracy is still indistinguishable from chance after
# WATCH_AFTER_EPOCHS epochs, or whose training loss has risen to DIVERGED_FACTOR times its first
# epoch's, is not going to become useful by spending its remaining epochs.
WATCH_AFTER_EPOCHS = 3
DIVERGED_FACTOR = 1.5
CHANCE_P_VALUE = 0.01


def above_chance_p_value(accuracy: float, images: int, classes: int) -> float:
    """One-sided binomial test of `accuracy` on `images` against guessing among `classes`."""
    correct = round(accuracy * images)
    return float(binomtest(correct, images, 1 / classes, alternative="greater").pvalue)


def learning_problem(
    history: list[dict[str, float]], val_images: int, classes: int, lr: float
) -> WatchdogFinding | None:
    """What is wrong with a run that learns nothing, its likely cause and the fix; None if nothing."""
    epoch = len(history)
    first, last = history[0]["train_loss"], history[-1]["train_loss"]
    if epoch >= 2 and last > DIVERGED_FACTOR * first:
        return WatchdogFinding(
            "diverging",
            f"the training loss rose from {first:.3f} (epoch 1) to {last:.3f} (epoch "
            f"{epoch}). Likely cause: the learning rate ({lr:.3g}) is too high for this model and "
            f"batch size. Fix: lower it, e.g. -P lr={lr / 10:.3g}.",
        )
    best = max(m["val_accuracy"] for m in history)
    if epoch >= WATCH_AFTER_EPOCHS:
        p_value = above_chance_p_value(best, val_images, classes)
        if p_value >= CHANCE_P_VALUE:
            return WatchdogFinding(
                "not learning",
                f"after {epoch} epochs the best validation accuracy is {best:.4f}, "
                f"no better than chance ({1 / classes:.3f} for {classes} classes; p={p_value:.2g} "
                f"on {val_images} images). Likely causes: a learning rate too high or too low for "
                f"this data (lr {lr:.3g}), too few epochs, or labels that do not match the images. "
                f"Fix: try -P lr={lr / 10:.3g} (or a larger one), more -P epochs, or check the "
                "labels (cifar10 preprocess).",
            )
    return None


def save_checkpoint(
    path: Path,
    state: FitState,
    model: nn.Module,
    optimizer,
    scheduler,
    lookahead: Lookahead | None = None,
) -> None:
    """Write then rename, so a crash mid-write never leaves a broken checkpoint behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".tmp")
    torch.save(
        {
            "fit_state": state.to_checkpoint(),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "lookahead": lookahead.average if lookahead else None,
        },
        partial,
    )
    os.replace(partial, path)


def fit(
    model: nn.Module,
    architecture: str,
    train_batches: DeviceBatches,
    val_batches: DeviceBatches,
    config: TrainConfig,
    callbacks: Sequence[EpochCallback] = (),
    checkpoint_path: Path | None = None,
    resume_from: dict[str, Any] | None = None,
    on_problem: Callable[[WatchdogFinding], None] | None = None,
) -> FitState:
    """Train `model` for `config.epochs` and keep the best epoch's weights; knows nothing of MLflow.

    Each epoch's metrics go to `callbacks`. With `checkpoint_path` a checkpoint is written there
    after the last epoch and after any epoch that ends `config.checkpoint_seconds` or more after the
    previous one (0: every epoch); `resume_from` (a loaded checkpoint) continues after it.
    The watchdog (`learning_problem`) reports once to `on_problem` (which may raise to stop, as
    tuning's pruning does) and, with `config.stop_if_not_learning`, ends training early.
    """
    state = FitState.from_checkpoint(resume_from["fit_state"]) if resume_from else FitState()
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    phases = training_phases(config, get_spec(architecture).unfreeze_after_freeze_epochs)
    step_model = torch.compile(model) if config.compile else model
    if resume_from:
        model.load_state_dict(resume_from["model"])
    classes = int(torch.unique(val_batches.labels).numel())
    dtype = autocast_dtype(train_batches.device, config.precision)
    started = last_checkpoint = time.perf_counter()
    for phase in phases:
        if state.next_epoch >= phase.end or state.stopped_early:
            continue
        set_frozen(model, architecture, is_frozen(architecture, phase.start, config.freeze_epochs))
        optimizer = make_optimizer(model, config, phase.lr)
        total_steps = (phase.end - phase.start) * len(train_batches)
        scheduler = make_scheduler(optimizer, config, phase.lr, total_steps)
        average = None
        if resume_from and state.next_epoch > phase.start:
            optimizer.load_state_dict(resume_from["optimizer"])
            scheduler.load_state_dict(resume_from["scheduler"])
            average = resume_from.get("lookahead")
        lookahead = None
        if config.lookahead_steps:
            lookahead = Lookahead(model, config.lookahead_steps, total_steps, average)
        if distributed.world_size() > 1:
            # Wrapped per phase: which parameters train (freezing) is fixed when DDP wraps them;
            # every process starts from rank 0's weights and buffers.
            wrapped = DistributedDataParallel(model)
            step_model = torch.compile(wrapped) if config.compile else wrapped
        for epoch in range(state.next_epoch, phase.end):
            torch.manual_seed(epoch_seed(config.seed, epoch))
            train_batches.set_epoch(epoch)
            epoch_started = time.perf_counter()
            metrics = train_one_epoch(
                step_model, train_batches, optimizer, scheduler, loss_fn, epoch, dtype, lookahead
            )
            train_seconds = time.perf_counter() - epoch_started
            # Every process scores the whole validation split with the same weights: the same
            # numbers everywhere, so the best epoch and early stopping agree without a message.
            evaluator = model if distributed.world_size() > 1 else step_model
            metrics |= evaluate_batches(evaluator, val_batches, config.tta, dtype)
            now = time.perf_counter()
            metrics |= {
                "learning_rate": optimizer.param_groups[0]["lr"],
                "epoch_seconds": now - epoch_started,
                "images_per_second": train_batches.num_images
                * distributed.world_size()
                / train_seconds,
                "elapsed_seconds": now - started,
            }
            state.history.append(metrics)
            state.next_epoch = epoch + 1
            if metrics["val_accuracy"] > state.best_val_accuracy:
                state.best_val_accuracy = metrics["val_accuracy"]
                state.best_epoch = epoch
                state.best_weights = {k: v.clone() for k, v in model.state_dict().items()}
                state.epochs_without_improvement = 0
            else:
                state.epochs_without_improvement += 1
            state.stopped_early = 0 < config.patience <= state.epochs_without_improvement
            found = None
            if state.problem is None:
                found = state.problem = learning_problem(
                    state.history, len(val_batches.labels), max(2, classes), config.lr
                )
                state.stopped_early |= found is not None and config.stop_if_not_learning
            last_epoch = state.stopped_early or state.next_epoch == config.epochs
            written = None
            if checkpoint_path is not None and (
                last_epoch or now - last_checkpoint >= config.checkpoint_seconds
            ):
                save_checkpoint(checkpoint_path, state, model, optimizer, scheduler, lookahead)
                written, last_checkpoint = checkpoint_path, time.perf_counter()
            for callback in callbacks:
                callback(epoch, metrics, written)
            if found is not None and on_problem is not None:
                on_problem(found)
            if state.stopped_early:
                break
    if state.best_weights is not None:
        model.load_state_dict(state.best_weights)
    return state
