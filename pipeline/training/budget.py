"""Train to a time budget: how many epochs of this recipe fit in the time a user has, on this
machine, measured rather than guessed.

A probe times real training steps and validation passes (`progress.seconds_per_image`, in the
precision that will run, with TTA where it is on); the plan is the most epochs whose training,
validation, checkpoints and model logging end within the budget, with a margin for the noise of a
shared machine. The schedule is then built for those epochs, so warm-up and decay are complete,
not cut off as a wall-clock stop would cut them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from pipeline.errors import PipelineError
from pipeline.training.distributed import current_worker, from_leader
from pipeline.training.loop import autocast_dtype
from pipeline.training.prepare import Prepared
from pipeline.training.progress import format_duration, seconds_per_image

MARGIN = 0.85  # of the time left, planned: the probe's noise and the epochs' own variation
FIXED_S = 4.0  # logging the model and its drift reference, the last checkpoint, the summary
CHECKPOINT_S = 0.3  # one resume checkpoint written and uploaded (small models, a local store)
MOST_EPOCHS_FACTOR = 10  # a budget buys at most this many times the recipe's epochs


class BudgetTooSmallError(PipelineError):
    """Not one epoch fits; the message gives the smallest budget that does."""


@dataclass(frozen=True)
class BudgetPlan:
    epochs: int
    epoch_seconds: float  # one epoch, training and validation, as measured
    planned_seconds: float  # the whole run as planned, from its start
    description: str  # the start line's words


def plan_to_budget(
    prepared: Prepared, budget_s: float, spent_s: float, recipe_epochs: int
) -> BudgetPlan:
    """The epochs of `prepared`'s recipe that fit in `budget_s`, of which `spent_s` are gone."""
    config = prepared.config
    dtype = autocast_dtype(prepared.device, config.precision)
    training, validation = seconds_per_image(prepared.model, prepared.train_batches, dtype)
    passes = 2 if config.tta else 1
    val_images = len(prepared.splits.val)
    epoch_s = (
        training * prepared.train_batches.num_images
        + passes * validation * val_images
        + CHECKPOINT_S * (config.checkpoint_seconds <= 0)
    )
    logging_s = FIXED_S + validation * min(val_images, 2000)
    fits = math.floor((MARGIN * (budget_s - spent_s) - logging_s) / epoch_s)
    if fits < 1:
        smallest = (spent_s + logging_s + epoch_s) / MARGIN
        raise BudgetTooSmallError(
            f"time_budget {format_duration(budget_s)} cannot fit one epoch of {config.model} on "
            f"this machine (one epoch ≈ {format_duration(epoch_s)} measured); give at least "
            f"{format_duration(math.ceil(smallest))}, or fewer images (-P max_train_images)."
        )
    epochs = min(fits, MOST_EPOCHS_FACTOR * recipe_epochs)
    where = f"on this {prepared.device.type.upper()}"
    if prepared.device.type == "cpu":
        where += " (no bfloat16)" if dtype is None and config.precision == "auto" else ""
    precision = "bfloat16" if dtype else "float32"
    capped = (
        f" (capped at {MOST_EPOCHS_FACTOR}x the recipe's {recipe_epochs})" if epochs < fits else ""
    )
    description = (
        f"{config.model}, {precision} {where}: {epochs} epoch{'s' * (epochs != 1)} fit in "
        f"{format_duration(budget_s)} (one epoch ≈ {format_duration(epoch_s)} measured){capped}"
    )
    planned = spent_s + logging_s + epochs * epoch_s
    return BudgetPlan(epochs, epoch_s, planned, description)


def fit_to_budget(prepared: Prepared, budget_s: float, spent_s: float) -> BudgetPlan:
    """Plan `prepared`'s epochs to `budget_s` and train that many. In a torch.distributed job
    every process probes its own share and all follow rank 0's plan (or its refusal): processes
    that planned different epochs would wait for each other's collectives until the timeout."""
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
