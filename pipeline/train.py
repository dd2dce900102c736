"""One training loop for every architecture, and the `train` stage that tracks it in MLflow."""

from __future__ import annotations

import copy
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import torch
from torch import nn
from tqdm import tqdm

from pipeline.config import TrainConfig, build_config, config_to_params, dump_yaml
from pipeline.data import ImageSet, Splits, load_training_set, make_splits
from pipeline.errors import PipelineError
from pipeline.loader import Augmentation, DeviceBatches
from pipeline.models import build_model, get_spec, is_frozen, model_options, set_frozen
from pipeline.tracking import log_dataset, log_json, log_resolved_params, scratch_dir, stage_run
from registry.serving_model import log_classifier

CHECKPOINT_ARTIFACT = "checkpoints/last.pt"
EpochCallback = Callable[[int, dict[str, float]], None]


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


def make_optimizer(model: nn.Module, config: TrainConfig, lr: float) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=config.momentum, nesterov=True, weight_decay=config.weight_decay
        )
    return torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay)


def make_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, lr: float, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    if config.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=lr, total_steps=total_steps, pct_start=config.warmup_fraction
        )
    warmup = max(1, int(config.warmup_fraction * total_steps))

    def factor(step: int) -> float:
        if config.schedule == "constant":
            return 1.0
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_one_epoch(
    model: nn.Module,
    batches: DeviceBatches,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loss_fn: nn.Module,
    epoch: int,
) -> dict[str, float]:
    """One pass over the shuffled, augmented split; statistics stay on the device until the end."""
    model.train()
    device = batches.device
    use_bf16 = device.type == "cuda"
    step_losses = torch.zeros(len(batches), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    progress = tqdm(
        batches, desc=f"epoch {epoch + 1}", leave=False, disable=not sys.stderr.isatty()
    )
    for step, (images, labels) in enumerate(progress):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(images)
            loss = loss_fn(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        step_losses[step] = loss.detach()
        correct += (logits.argmax(dim=1) == labels).sum()
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
        "train_accuracy": float(correct) / batches.num_images,
    }


@torch.no_grad()
def evaluate_batches(model: nn.Module, batches: DeviceBatches) -> dict[str, float]:
    """Plain cross-entropy and accuracy over every image of an unaugmented split."""
    model.eval()
    device = batches.device
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    for images, labels in batches:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(images).float()
        total_loss += nn.functional.cross_entropy(logits, labels, reduction="sum")
        correct += (logits.argmax(dim=1) == labels).sum()
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


def save_checkpoint(path: Path, state: FitState, model: nn.Module, optimizer, scheduler) -> None:
    """Write then rename, so a crash mid-write never leaves a broken checkpoint behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".tmp")
    torch.save(
        {
            "fit_state": {**state.__dict__},
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
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
    on_epoch_end: EpochCallback | None = None,
    checkpoint_path: Path | None = None,
    resume_from: dict[str, Any] | None = None,
) -> FitState:
    """Train `model` for `config.epochs`, log each epoch to the active MLflow run, keep the best.

    `on_epoch_end(epoch, metrics)` may raise to stop (Optuna pruning does). With `checkpoint_path`
    every epoch is checkpointed there and logged as an artifact; `resume_from` (a loaded checkpoint)
    continues from the epoch after it.
    """
    state = FitState(**resume_from["fit_state"]) if resume_from else FitState()
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    phases = training_phases(config, get_spec(architecture).unfreeze_after_freeze_epochs)
    step_model = torch.compile(model) if config.compile else model
    if resume_from:
        model.load_state_dict(resume_from["model"])
    for phase in phases:
        if state.next_epoch >= phase.end or state.stopped_early:
            continue
        set_frozen(model, architecture, is_frozen(architecture, phase.start, config.freeze_epochs))
        optimizer = make_optimizer(model, config, phase.lr)
        scheduler = make_scheduler(
            optimizer, config, phase.lr, (phase.end - phase.start) * len(train_batches)
        )
        if resume_from and state.next_epoch > phase.start:
            optimizer.load_state_dict(resume_from["optimizer"])
            scheduler.load_state_dict(resume_from["scheduler"])
        for epoch in range(state.next_epoch, phase.end):
            torch.manual_seed(config.seed * 100_003 + epoch)
            train_batches.set_epoch(epoch)
            started = time.perf_counter()
            metrics = train_one_epoch(
                step_model, train_batches, optimizer, scheduler, loss_fn, epoch
            )
            train_seconds = time.perf_counter() - started
            metrics |= evaluate_batches(step_model, val_batches)
            metrics |= {
                "learning_rate": optimizer.param_groups[0]["lr"],
                "epoch_seconds": time.perf_counter() - started,
                "images_per_second": train_batches.num_images / train_seconds,
            }
            mlflow.log_metrics(metrics, step=epoch)
            state.history.append(metrics)
            state.next_epoch = epoch + 1
            if metrics["val_accuracy"] > state.best_val_accuracy:
                state.best_val_accuracy = metrics["val_accuracy"]
                state.best_epoch = epoch
                state.best_weights = copy.deepcopy(model.state_dict())
                state.epochs_without_improvement = 0
            else:
                state.epochs_without_improvement += 1
            state.stopped_early = 0 < config.patience <= state.epochs_without_improvement
            if checkpoint_path is not None:
                save_checkpoint(checkpoint_path, state, model, optimizer, scheduler)
                mlflow.log_artifact(str(checkpoint_path), Path(CHECKPOINT_ARTIFACT).parent.name)
            if on_epoch_end is not None:
                on_epoch_end(epoch, metrics)
            if state.stopped_early:
                break
    if state.best_weights is not None:
        model.load_state_dict(state.best_weights)
    return state


@dataclass
class Prepared:
    splits: Splits
    model: nn.Module
    train_batches: DeviceBatches
    val_batches: DeviceBatches
    device: torch.device
    class_names: tuple[str, ...]
    source: str


def prepare_training(config: TrainConfig, data: ImageSet | None = None) -> Prepared:
    """Data, splits, device-resident batches and a freshly seeded model for `config`.

    `data` lets a caller that trains many times (tuning) load the training batches once.
    """
    data = data if data is not None else load_training_set(config.data_dir, config.download)
    splits = make_splits(data, config.val_fraction, config.seed, config.max_train_images)
    device = select_device()
    on_cuda = device.type == "cuda"
    torch.manual_seed(config.seed)
    model = build_model(
        config.model,
        model_options(config.model, config),
        pretrained=config.pretrained,
        weights_path=config.weights_path,
        num_classes=len(data.class_names),
    ).to(device)
    if on_cuda:
        model = model.to(memory_format=torch.channels_last)
    augmentation = Augmentation(config.crop_padding, config.flip, config.cutout)
    common = {"mean": splits.mean, "std": splits.std, "device": device, "channels_last": on_cuda}
    train_batches = DeviceBatches(
        splits.train.images,
        splits.train.labels,
        batch_size=config.batch_size,
        train=True,
        augmentation=augmentation,
        seed=config.seed,
        **common,
    )
    val_batches = DeviceBatches(
        splits.val.images, splits.val.labels, batch_size=config.eval_batch_size, **common
    )
    return Prepared(
        splits, model, train_batches, val_batches, device, data.class_names, data.source
    )


def log_training_inputs(prepared: Prepared, config: TrainConfig) -> None:
    """Params, tags, resolved config, normalization and the dataset record of a training run."""
    splits = prepared.splits
    log_resolved_params(config_to_params(config))
    mlflow.log_text(dump_yaml(config_to_params(config)), "config.yaml")
    mlflow.set_tags(
        {
            "architecture": config.model,
            "device": str(prepared.device),
            "data_source": prepared.source,
        }
    )
    log_json(
        {
            "mean": list(splits.mean),
            "std": list(splits.std),
            "class_names": list(prepared.class_names),
            "train_images": len(splits.train),
            "val_images": len(splits.val),
        },
        "stats.json",
    )
    mlflow.log_metrics({"train_images": len(splits.train), "val_images": len(splits.val)})
    log_dataset(splits.train.images, splits.train.labels, prepared.source, context="training")


def stored_config(run_id: str) -> TrainConfig:
    """The resolved config a run was started with (read back from its `config.yaml`)."""
    import yaml

    text = mlflow.artifacts.load_text(f"runs:/{run_id}/config.yaml")
    values = yaml.safe_load(text)
    return build_config(TrainConfig, values, {"resume_run_id": run_id})


def load_resume_checkpoint(run_id: str, local_path: Path) -> dict[str, Any]:
    local_path.parent.mkdir(parents=True, exist_ok=True)
    downloaded = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path=CHECKPOINT_ARTIFACT, dst_path=str(local_path.parent)
    )
    return torch.load(downloaded, map_location="cpu", weights_only=True)


@dataclass
class TrainResult:
    run_id: str
    model_uri: str
    best_val_accuracy: float
    best_epoch: int
    epochs_run: int


def run_train(config: TrainConfig, on_epoch_end: EpochCallback | None = None) -> TrainResult:
    """The `train` entry point: one tracked run, ending with a logged, servable `model`."""
    resume_id = config.resume_run_id
    if resume_id:
        config = stored_config(resume_id)
    prepared = prepare_training(config)
    started = time.perf_counter()
    with (
        stage_run(
            config.experiment_name, config.model, run_id=resume_id, log_system_metrics=True
        ) as run,
        scratch_dir() as scratch,
    ):
        checkpoint_path = scratch / CHECKPOINT_ARTIFACT
        resume_from = None
        if resume_id:
            resume_from = load_resume_checkpoint(resume_id, checkpoint_path)
            mlflow.set_tag("resumed_from_epoch", resume_from["fit_state"]["next_epoch"])
        else:
            log_training_inputs(prepared, config)
        state = fit(
            prepared.model,
            config.model,
            prepared.train_batches,
            prepared.val_batches,
            config,
            on_epoch_end=on_epoch_end,
            checkpoint_path=checkpoint_path,
            resume_from=resume_from,
        )
        final = state.history[-1]
        mlflow.log_metrics(
            {
                "best_val_accuracy": state.best_val_accuracy,
                "best_epoch": state.best_epoch,
                "epochs_run": state.next_epoch,
                "final_train_loss": final["train_loss"],
                "final_val_accuracy": final["val_accuracy"],
                "stopped_early": float(state.stopped_early),
                "train_seconds": time.perf_counter() - started,
            }
        )
        info = log_classifier(
            prepared.model.to("cpu").to(memory_format=torch.contiguous_format),
            config.model,
            model_options(config.model, config),
            prepared.splits.mean,
            prepared.splits.std,
            prepared.class_names,
            prepared.splits.val.images[0],
        )
        mlflow.set_tag("model_uri", info.model_uri)
    return TrainResult(
        run.info.run_id, info.model_uri, state.best_val_accuracy, state.best_epoch, state.next_epoch
    )
