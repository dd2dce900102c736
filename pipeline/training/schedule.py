"""The optimizer, its phases and its learning-rate schedule, and Lookahead weights.

The schedule's shape (one-cycle, cosine with warm-up, constant) is drawn over the planned steps,
and the steps taken move along it: a time budget can re-lay the rest of the plan over fewer or
more steps mid-run (`Schedule.relay`) and the schedule still ends complete, its decay whole. A
`Schedule` holds plain numbers only, so `LambdaLR`'s state dict saves it with the checkpoint and a
resumed run continues on the same plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeline.config import TrainConfig


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


ONE_CYCLE_START, ONE_CYCLE_END = 1 / 25, 1 / 25e4  # OneCycleLR's div_factor and final_div_factor


def cosine_between(start: float, end: float, fraction: float) -> float:
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * fraction))


class Schedule:
    """The factor of the learning rate at each step: `LambdaLR` calls it with the steps taken.

    The shape is drawn over the `planned` steps, exactly as `OneCycleLR` (one-cycle) or a linear
    warm-up and cosine decay would draw it; `relay` then changes how fast the steps taken move
    along it, so the rest of the shape fits into fewer or more steps and still ends complete."""

    def __init__(self, kind: str, warmup_fraction: float, total_steps: int) -> None:
        self.kind = kind if total_steps >= 4 else "constant"  # too short for a shape
        self.warmup_fraction = warmup_fraction
        self.planned = self.total_steps = total_steps
        self.anchor_step, self.anchor_position = 0, 0.0

    def position(self, steps: int) -> float:
        """Where `steps` steps taken are on the planned shape (0 to `planned`)."""
        span = self.total_steps - self.anchor_step
        if span <= 0:
            return float(self.planned)
        moved = (steps - self.anchor_step) * (self.planned - self.anchor_position) / span
        return min(float(self.planned), self.anchor_position + moved)

    def progress(self, steps: int) -> float:
        """The fraction of the plan done after `steps` steps."""
        return self.position(steps) / max(1, self.planned)

    def relay(self, steps: int, total_steps: int) -> None:
        """Lay what is left of the shape over `total_steps - steps` more steps."""
        self.anchor_position = self.position(steps)
        self.anchor_step, self.total_steps = steps, max(steps, total_steps)

    def __call__(self, steps: int) -> float:
        at, planned = self.position(steps), self.planned
        if self.kind == "constant":
            return 1.0
        if self.kind == "onecycle":  # OneCycleLR's two phases, at least two warm-up steps
            peak = max(self.warmup_fraction, 2 / planned) * planned - 1
            if at <= peak:
                return cosine_between(ONE_CYCLE_START, 1.0, at / peak)
            return cosine_between(1.0, ONE_CYCLE_END, min(1.0, (at - peak) / (planned - 1 - peak)))
        warmup = max(1, int(self.warmup_fraction * planned))
        if at < warmup:
            return (at + 1) / warmup
        return cosine_between(1.0, 0.0, min(1.0, (at - warmup) / max(1, planned - warmup)))


def make_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The recipe's schedule over `total_steps`: its `Schedule` is `scheduler.lr_lambdas[0]`.
    Momentum is never cycled: the one a recipe or a search space sets is the one that runs."""
    schedule = Schedule(config.schedule, config.warmup_fraction, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


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
        schedule: Schedule,
        average: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.every = every
        self.schedule = schedule
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
        progress = self.schedule.progress(step)
        if step % self.every and progress < 1:
            return
        decay = 0.95**self.every * progress**3
        for name, weights in self.weights.items():
            self.average[name].lerp_(weights, 1 - decay)
            weights.copy_(self.average[name])
