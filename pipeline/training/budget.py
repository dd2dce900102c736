"""Train to a time budget: how many steps of this recipe fit in the time a user has, on this
machine, measured rather than guessed, and kept to while it trains.

A probe times real training steps and validation passes (`progress.seconds_per_image`, in the
precision that will run, with TTA where it is on); the plan is the most steps (not whole epochs:
the last may be partial) whose training, validations, checkpoints and model logging end within the
budget, with a margin for the probe's noise. While the run trains, the `Pacer` reads the clock a
few times an epoch and lays the rest of the schedule over the steps that still fit, so warm-up
and decay are complete, not cut off as a wall-clock stop would cut them, even when the machine
slows down or speeds up after the probe.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

from pipeline.errors import PipelineError
from pipeline.training.distributed import current_worker, from_leader
from pipeline.training.precision import autocast_dtype
from pipeline.training.prepare import Prepared
from pipeline.training.progress import format_duration, seconds_per_image
from pipeline.training.schedule import Schedule

MARGIN = 0.85  # of the time left, planned by the probe: its noise and the epochs' own variation
TARGET = 0.95  # of the budget, where the pacer aims once it measures the steps themselves
FIXED_S = 4.0  # logging the model and its drift reference, the last checkpoint, the summary
CHECKPOINT_S = 0.3  # one resume checkpoint written and uploaded (small models, a local store)
MOST_EPOCHS_FACTOR = 10  # a budget buys at most this many times the recipe's epochs
LOOKS_PER_EPOCH = 4  # how often the pacer reads the clock
PACE_WEIGHT = 0.5  # of the latest pace against the earlier ones: a lasting change is believed
# within a few looks, a passing hiccup does not throw the plan about


class BudgetTooSmallError(PipelineError):
    """Not one epoch fits; the message gives the smallest budget that does."""


@dataclass(frozen=True)
class BudgetPlan:
    epochs: int  # the epochs the steps touch (the last may be partial)
    steps: int
    steps_per_epoch: int
    most_steps: int
    step_seconds: float  # one training step, as measured
    validation_seconds: float  # between two epochs' steps: validation, checkpoint, logging
    logging_seconds: float  # what follows the last epoch
    budget_seconds: float
    planned_seconds: float  # the whole run as planned, from its start
    description: str  # the start line's words

    @property
    def epoch_seconds(self) -> float:
        return self.step_seconds * self.steps_per_epoch + self.validation_seconds


def steps_that_fit(seconds: float, plan: BudgetPlan, steps_into_epoch: int = 0) -> int:
    """Training steps whose time, with a validation at each epoch's end and one after the last
    step, fits in `seconds`."""
    per_epoch = plan.steps_per_epoch
    spare = seconds - plan.validation_seconds * (1 + steps_into_epoch / per_epoch)
    return max(0, math.floor(spare / (plan.step_seconds + plan.validation_seconds / per_epoch)))


def plan_to_budget(
    prepared: Prepared, budget_s: float, spent_s: float, recipe_epochs: int
) -> BudgetPlan:
    """The steps of `prepared`'s recipe that fit in `budget_s`, of which `spent_s` are gone."""
    config = prepared.config
    dtype = autocast_dtype(prepared.device, config.precision)
    training, validation = seconds_per_image(prepared.model, prepared.train_batches, dtype)
    per_epoch = len(prepared.train_batches)
    val_images = len(prepared.splits.val)
    plan = BudgetPlan(
        epochs=0,
        steps=0,
        steps_per_epoch=per_epoch,
        most_steps=MOST_EPOCHS_FACTOR * recipe_epochs * per_epoch,
        step_seconds=training * prepared.train_batches.num_images / per_epoch,
        validation_seconds=(2 if config.tta else 1) * validation * val_images
        + CHECKPOINT_S * (config.checkpoint_seconds <= 0),
        logging_seconds=FIXED_S + validation * min(val_images, 2000),
        budget_seconds=budget_s,
        planned_seconds=0.0,
        description="",
    )
    fits = steps_that_fit(MARGIN * (budget_s - spent_s) - plan.logging_seconds, plan)
    if fits < per_epoch:
        smallest = (spent_s + plan.logging_seconds + plan.epoch_seconds) / MARGIN
        raise BudgetTooSmallError(
            f"time_budget {format_duration(budget_s)} cannot fit one epoch of {config.model} on "
            f"this machine (one epoch ≈ {format_duration(plan.epoch_seconds)} measured); give at "
            f"least {format_duration(math.ceil(smallest))}, or fewer images (-P max_train_images)."
        )
    steps = min(fits, plan.most_steps)
    epochs = math.ceil(steps / per_epoch)
    where = f"on this {prepared.device.type.upper()}"
    if prepared.device.type == "cpu":
        where += " (no bfloat16)" if dtype is None and config.precision == "auto" else ""
    capped = f" (capped at {MOST_EPOCHS_FACTOR}x the recipe's {recipe_epochs})" * (steps < fits)
    description = (
        f"{config.model}, {'bfloat16' if dtype else 'float32'} {where}: {epochs} "
        f"epoch{'s' * (epochs != 1)} ({steps} steps) fit in {format_duration(budget_s)} (one "
        f"epoch ≈ {format_duration(plan.epoch_seconds)} measured){capped}; the clock is read "
        f"{LOOKS_PER_EPOCH} times an epoch and the rest of the schedule laid over what still fits"
    )
    planned = spent_s + plan.logging_seconds + steps * plan.step_seconds
    planned += epochs * plan.validation_seconds
    return dataclasses.replace(
        plan, epochs=epochs, steps=steps, planned_seconds=planned, description=description
    )


def fit_to_budget(prepared: Prepared, budget_s: float, spent_s: float) -> BudgetPlan:
    """Plan `prepared`'s steps to `budget_s`. In a torch.distributed job every process probes its
    own share and all follow rank 0's plan (or its refusal): processes that planned different
    steps would wait for each other's collectives until the timeout."""
    try:
        outcome: BudgetPlan | BudgetTooSmallError = plan_to_budget(
            prepared, budget_s, spent_s, prepared.config.epochs
        )
    except BudgetTooSmallError as refusal:
        outcome = refusal
    if current_worker() is not None:
        outcome = from_leader(outcome)
    if isinstance(outcome, BudgetTooSmallError):
        raise outcome
    prepared.config = dataclasses.replace(prepared.config, epochs=outcome.epochs)
    return outcome


class Pacer:
    """Holds a budgeted run to its budget while it trains (`fit(pacer=...)`): a few times an
    epoch it times the steps since its last look (validations left out), weighs that pace with
    the earlier ones (a machine that slowed down, say another process took a core, is believed
    within a few looks) and lays the rest of the schedule over the steps that still fit before
    TARGET of the budget, fewer or more than planned, so the run ends inside its budget with its
    schedule complete, and uses it. In a torch.distributed job rank 0's clock decides for every
    process."""

    def __init__(self, plan: BudgetPlan, started: float) -> None:
        self.plan = plan
        self.deadline = started + TARGET * plan.budget_seconds - plan.logging_seconds
        self.every = max(1, plan.steps_per_epoch // LOOKS_PER_EPOCH)
        self.shared = current_worker() is not None
        self.mark_time, self.mark_steps, self.between_since = time.perf_counter(), 0, 0.0
        self.ended_at: float | None = None

    def first_total(self) -> int:
        """The last phase's steps, as they fit now (earlier phases have taken their time)."""
        return self.steps_from(0)

    def after_step(self, schedule: Schedule, steps: int) -> None:
        if steps % self.every == 0:
            total = self.steps_from(steps)
            if total != schedule.total_steps:
                schedule.relay(steps, total)

    def epoch_ends(self) -> None:
        self.ended_at = time.perf_counter()

    def epoch_begins(self) -> None:
        """Everything between two epochs' steps (validation, checkpoint, logging) is timed
        apart from the steps, so neither pace takes up the other's time."""
        if self.ended_at is None:
            return
        between = time.perf_counter() - self.ended_at
        self.between_since += between
        smoothed = PACE_WEIGHT * between + (1 - PACE_WEIGHT) * self.plan.validation_seconds
        self.plan = dataclasses.replace(self.plan, validation_seconds=smoothed)
        self.ended_at = None

    def steps_from(self, steps: int) -> int:
        """The phase's total steps, from the pace measured since the last look."""
        now = time.perf_counter()
        if steps > self.mark_steps:
            pace = (now - self.mark_time - self.between_since) / (steps - self.mark_steps)
            smoothed = PACE_WEIGHT * pace + (1 - PACE_WEIGHT) * self.plan.step_seconds
            self.plan = dataclasses.replace(self.plan, step_seconds=smoothed)
        self.mark_time, self.mark_steps, self.between_since = now, steps, 0.0
        into = steps % self.plan.steps_per_epoch
        total = min(
            steps + steps_that_fit(self.deadline - now, self.plan, into), self.plan.most_steps
        )
        return from_leader(total) if self.shared else total
