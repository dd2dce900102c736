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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from pipeline.config import TrainConfig
from pipeline.errors import PipelineError
from pipeline.model.architectures import class_probabilities, get_spec, is_frozen, set_frozen
from pipeline.training import distributed
from pipeline.training.loader import DeviceBatches, epoch_seed
from pipeline.training.precision import autocast, autocast_dtype
from pipeline.training.schedule import (
    Lookahead,
    Phase,
    Schedule,
    make_optimizer,
    make_scheduler,
    training_phases,
)
from pipeline.training.watchdog import WatchdogFinding, diverging, loss_window, not_learning

# Called after every epoch with (epoch, metrics, the checkpoint written this epoch or None); it may
# raise to stop training (Optuna pruning does).
EpochCallback = Callable[[int, dict[str, float], Path | None], None]


class NonFiniteLossError(PipelineError):
    """The loss became NaN or infinite; the message names where and the likely cause."""


class Pacing(Protocol):
    """What keeps a run to a time budget (pipeline/training/budget.py:Pacer): it sets the last
    phase's steps and re-lays its schedule as the clock runs."""

    def first_total(self) -> int: ...

    def epoch_begins(self) -> None: ...

    def after_step(self, schedule: Schedule, steps: int) -> None: ...

    def epoch_ends(self) -> None: ...


@dataclass
class PhaseTools:
    """One phase's optimizer, schedule and the model its steps run through."""

    phase: Phase
    last: bool
    steps_per_epoch: int
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    step_model: nn.Module
    lookahead: Lookahead | None

    @property
    def schedule(self) -> Schedule:
        return self.scheduler.lr_lambdas[0]

    def ends_with(self, epoch: int) -> bool:
        """Whether `epoch` is the phase's last (the plan's steps may end inside it)."""
        return (epoch + 1 - self.phase.start) * self.steps_per_epoch >= self.schedule.total_steps

    def planned_epochs(self) -> int:
        return self.phase.start + math.ceil(self.schedule.total_steps / self.steps_per_epoch)


def train_one_epoch(
    batches: DeviceBatches,
    tools: PhaseTools,
    loss_fn: nn.Module,
    epoch: int,
    dtype: torch.dtype | None = None,
    pacer: Pacing | None = None,
) -> tuple[dict[str, float], torch.Tensor, int]:
    """One pass over the shuffled, augmented split, or the part of it that the plan still holds
    (a time budget's last epoch); statistics stay on the device until the end. Returns the
    metrics, each step's loss (the mean over processes, on the CPU) and the images trained on."""
    tools.step_model.train()
    device, scheduler, schedule = batches.device, tools.scheduler, tools.schedule
    step_losses = torch.zeros(len(batches), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    steps = images_seen = 0
    progress = tqdm(batches, desc=f"epoch {epoch + 1}", leave=False, position=1, file=sys.stderr,
                    disable=not sys.stderr.isatty())  # fmt: skip
    if pacer is not None:
        pacer.epoch_begins()
    for images, labels in progress:
        if scheduler.last_epoch >= schedule.total_steps:
            break
        with autocast(device, dtype):
            logits = tools.step_model(images)
            loss = loss_fn(logits, labels)
        tools.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        tools.optimizer.step()
        if pacer is not None:  # before the scheduler sets the next step's rate
            pacer.after_step(schedule, scheduler.last_epoch + 1)
        scheduler.step()
        if tools.lookahead is not None:
            tools.lookahead.after_step(scheduler.last_epoch)
        step_losses[steps] = loss.detach()
        correct += (logits.argmax(dim=1) == labels).sum()
        steps, images_seen = steps + 1, images_seen + len(labels)
    progress.close()
    if pacer is not None:
        pacer.epoch_ends()
    # Every process holds the same share of each global batch: the means over processes are the
    # whole batch's, and a NaN on any process stops them all at the same step.
    world = distributed.world_size()
    step_losses = (distributed.summed(step_losses[:steps]) / world).cpu()
    correct = distributed.summed(correct)
    metrics = {
        "train_loss": float(step_losses.mean()),
        "train_accuracy": float(correct) / max(1, images_seen * world),
    }
    return metrics, step_losses, images_seen * world


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
    start_loss: float | None = None  # the mean loss of the run's first steps (the watchdog's)

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any]) -> FitState:
        problem = saved.get("problem")
        return cls(**saved | {"problem": WatchdogFinding(**problem) if problem else None})

    def to_checkpoint(self) -> dict[str, Any]:
        """Plain values only: a checkpoint is loaded with `weights_only=True`."""
        return self.__dict__ | {"problem": self.problem.__dict__ if self.problem else None}


def save_checkpoint(
    path: Path, state: FitState, model: nn.Module, tools: PhaseTools | None = None
) -> None:
    """Write then rename, so a crash mid-write never leaves a broken checkpoint behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".tmp")
    torch.save(
        {
            "fit_state": state.to_checkpoint(),
            "model": model.state_dict(),
            "optimizer": tools.optimizer.state_dict() if tools else None,
            "scheduler": tools.scheduler.state_dict() if tools else None,
            "lookahead": tools.lookahead.average if tools and tools.lookahead else None,
        },
        partial,
    )
    os.replace(partial, path)


class Fitting:
    """One call of `fit()`: its fixed parts, and the phases and epochs it runs through."""

    def __init__(
        self,
        model: nn.Module,
        train_batches: DeviceBatches,
        val_batches: DeviceBatches,
        config: TrainConfig,
        callbacks: Sequence[EpochCallback],
        checkpoint_path: Path | None,
        resume_from: dict[str, Any] | None,
        on_problem: Callable[[WatchdogFinding], None] | None,
        pacer: Pacing | None,
    ) -> None:
        self.model, self.config = model, config
        self.train_batches, self.val_batches = train_batches, val_batches
        self.callbacks, self.checkpoint_path, self.resume_from = (
            callbacks,
            checkpoint_path,
            resume_from,
        )
        self.on_problem, self.pacer = on_problem, pacer
        saved = self.resume_from["fit_state"] if self.resume_from else None
        self.state = FitState.from_checkpoint(saved) if saved else FitState()
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        self.dtype = autocast_dtype(train_batches.device, config.precision)
        self.classes = max(2, int(torch.unique(val_batches.labels).numel()))
        self.compiled = torch.compile(model) if config.compile else model
        self.started = self.last_checkpoint = time.perf_counter()

    def run(self) -> FitState:
        if self.resume_from:
            self.model.load_state_dict(self.resume_from["model"])
        unfreezes = get_spec(self.config.model).unfreeze_after_freeze_epochs
        phases = training_phases(self.config, unfreezes)
        for index, phase in enumerate(phases):
            last = index == len(phases) - 1
            if self.state.stopped_early or (not last and self.state.next_epoch >= phase.end):
                continue
            tools = self.start_phase(phase, last)
            epoch = self.state.next_epoch
            while not self.state.stopped_early and not (
                (epoch - phase.start) * tools.steps_per_epoch >= tools.schedule.total_steps
            ):
                self.run_epoch(epoch, tools)
                epoch += 1
        if self.state.best_weights is not None:
            self.model.load_state_dict(self.state.best_weights)
        return self.state

    def start_phase(self, phase: Phase, last: bool) -> PhaseTools:
        model, config, state = self.model, self.config, self.state
        set_frozen(model, config.model, is_frozen(config.model, phase.start, config.freeze_epochs))
        optimizer = make_optimizer(model, config, phase.lr)
        steps_per_epoch = len(self.train_batches)
        resuming = self.resume_from is not None and state.next_epoch > phase.start
        total = (phase.end - phase.start) * steps_per_epoch
        if last and self.pacer is not None and not resuming:
            total = self.pacer.first_total()
        scheduler = make_scheduler(optimizer, config, total)
        average = None
        if resuming:
            optimizer.load_state_dict(self.resume_from["optimizer"])
            scheduler.load_state_dict(self.resume_from["scheduler"])
            average = self.resume_from.get("lookahead")
        schedule = scheduler.lr_lambdas[0]
        lookahead = None
        if config.lookahead_steps:
            lookahead = Lookahead(model, config.lookahead_steps, schedule, average)
        step_model = self.compiled
        if distributed.world_size() > 1:
            # Wrapped per phase: which parameters train (freezing) is fixed when DDP wraps them;
            # every process starts from rank 0's weights and buffers.
            wrapped = DistributedDataParallel(model)
            step_model = torch.compile(wrapped) if config.compile else wrapped
        return PhaseTools(phase, last, steps_per_epoch, optimizer, scheduler, step_model, lookahead)

    def run_epoch(self, epoch: int, tools: PhaseTools) -> None:
        """Train, watch the steps' losses, validate, then record the epoch."""
        config, state = self.config, self.state
        torch.manual_seed(epoch_seed(config.seed, epoch))
        self.train_batches.set_epoch(epoch)
        began = time.perf_counter()
        pacer = self.pacer if tools.last else None
        metrics, losses, images = train_one_epoch(
            self.train_batches, tools, self.loss_fn, epoch, self.dtype, pacer
        )
        train_seconds = time.perf_counter() - began
        if state.start_loss is None:
            state.start_loss = float(losses[: loss_window(tools.steps_per_epoch)].mean())
        found = diverging(losses, state.start_loss, epoch, config.lr)
        if found is not None and not math.isfinite(metrics["train_loss"]):
            self.stop_diverged(found)  # whatever was found before: these weights are lost
            return
        found = None if state.problem else found
        # Every process scores the whole validation split with the same weights: the same
        # numbers everywhere, so the best epoch and early stopping agree without a message.
        evaluator = self.model if distributed.world_size() > 1 else tools.step_model
        metrics |= evaluate_batches(evaluator, self.val_batches, config.tta, self.dtype)
        now = time.perf_counter()
        if pacer is not None:
            metrics["planned_epochs"] = tools.planned_epochs()
        metrics |= {
            "learning_rate": tools.optimizer.param_groups[0]["lr"],
            "epoch_seconds": now - began,
            "images_per_second": images / train_seconds,
            "elapsed_seconds": now - self.started,
        }
        self.record(epoch, metrics, found, tools)

    def stop_diverged(self, found: WatchdogFinding) -> None:
        """A non-finite loss: the weights are lost, so the run ends on its best epoch, or fails
        when it has none yet."""
        if self.state.best_weights is None:
            raise NonFiniteLossError(f"watchdog: {found}")
        self.state.problem, self.state.stopped_early = found, True
        if self.on_problem is not None:
            self.on_problem(found)

    def record(
        self,
        epoch: int,
        metrics: dict[str, float],
        found: WatchdogFinding | None,
        tools: PhaseTools,
    ) -> None:
        """The epoch's bookkeeping: best weights, early stopping, the watchdog, the checkpoint
        and the callbacks."""
        config, state = self.config, self.state
        state.history.append(metrics)
        state.next_epoch = epoch + 1
        if metrics["val_accuracy"] > state.best_val_accuracy:
            state.best_val_accuracy, state.best_epoch = metrics["val_accuracy"], epoch
            state.best_weights = {k: v.clone() for k, v in self.model.state_dict().items()}
            state.epochs_without_improvement = 0
        else:
            state.epochs_without_improvement += 1
        state.stopped_early = 0 < config.patience <= state.epochs_without_improvement
        if state.problem is None:
            found = found or not_learning(
                state.history, len(self.val_batches.labels), self.classes, config.lr
            )
            state.problem = found
            state.stopped_early |= found is not None and config.stop_if_not_learning
        else:
            found = None
        written, now = None, time.perf_counter()
        final = state.stopped_early or (tools.last and tools.ends_with(epoch))
        if self.checkpoint_path is not None and (
            final or now - self.last_checkpoint >= config.checkpoint_seconds
        ):
            save_checkpoint(self.checkpoint_path, state, self.model, tools)
            written, self.last_checkpoint = self.checkpoint_path, time.perf_counter()
        for callback in self.callbacks:
            callback(epoch, metrics, written)
        if found is not None and self.on_problem is not None:
            self.on_problem(found)


def fit(
    model: nn.Module,
    train_batches: DeviceBatches,
    val_batches: DeviceBatches,
    config: TrainConfig,
    callbacks: Sequence[EpochCallback] = (),
    checkpoint_path: Path | None = None,
    resume_from: dict[str, Any] | None = None,
    on_problem: Callable[[WatchdogFinding], None] | None = None,
    pacer: Pacing | None = None,
) -> FitState:
    """Train `model` for `config.epochs` (or the steps `pacer` lays out for a time budget) and
    keep the best epoch's weights; knows nothing of MLflow.

    Each epoch's metrics go to `callbacks`. With `checkpoint_path` a checkpoint is written there
    after the last epoch and after any epoch that ends `config.checkpoint_seconds` or more after the
    previous one (0: every epoch); `resume_from` (a loaded checkpoint) continues after it.
    The watchdog (pipeline/training/watchdog.py) reports once to `on_problem` (which may raise to
    stop, as tuning's pruning does) and, with `config.stop_if_not_learning`, ends training early;
    a non-finite loss always ends it.
    """
    fitting = Fitting(
        model, train_batches, val_batches, config, callbacks, checkpoint_path, resume_from,
        on_problem, pacer,
    )  # fmt: skip
    return fitting.run()
