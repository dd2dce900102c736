"""One training loop for every architecture, and the `train` stage that tracks it in MLflow."""

from __future__ import annotations

import copy
import math
import os
import pickle
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import torch
import yaml
from mlflow.exceptions import MlflowException
from torch import nn
from tqdm import tqdm

from pipeline.config import ConfigError, TrainConfig, build_config, config_to_params, dump_yaml
from pipeline.data import Splits, has_test_set, load_training_set, make_splits
from pipeline.errors import PipelineError
from pipeline.imaging import ImageSet
from pipeline.loader import Augmentation, DeviceBatches
from pipeline.models import build_model, get_spec, is_frozen, model_options, set_frozen
from pipeline.tracking import (
    log_dataset,
    log_json,
    log_resolved_params,
    print_summary,
    scratch_dir,
    stage_run,
)
from registry.serving_model import log_classifier

CHECKPOINT_FILE = "last.pt"
# An artifact upload is not atomic in every store (a local file store copies the file in place), so
# checkpoints alternate between two folders: a process killed mid-upload leaves the other one whole.
CHECKPOINT_SLOTS = ("checkpoints/a", "checkpoints/b")
LEGACY_CHECKPOINT = "checkpoints/last.pt"  # written by versions before the slots
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
        batches,
        desc=f"epoch {epoch + 1}",
        leave=False,
        position=1,
        file=sys.stderr,
        disable=not sys.stderr.isatty(),
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
    callbacks: Sequence[EpochCallback] = (),
    checkpoint_path: Path | None = None,
    resume_from: dict[str, Any] | None = None,
) -> FitState:
    """Train `model` for `config.epochs` and keep the best epoch's weights; knows nothing of MLflow.

    Each epoch's metrics go to `callbacks`. With `checkpoint_path` a checkpoint is written there
    after the last epoch and after any epoch that ends `config.checkpoint_seconds` or more after the
    previous one (0: every epoch); `resume_from` (a loaded checkpoint) continues after it.
    """
    state = FitState(**resume_from["fit_state"]) if resume_from else FitState()
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    phases = training_phases(config, get_spec(architecture).unfreeze_after_freeze_epochs)
    step_model = torch.compile(model) if config.compile else model
    if resume_from:
        model.load_state_dict(resume_from["model"])
    started = last_checkpoint = time.perf_counter()
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
            epoch_started = time.perf_counter()
            metrics = train_one_epoch(
                step_model, train_batches, optimizer, scheduler, loss_fn, epoch
            )
            train_seconds = time.perf_counter() - epoch_started
            metrics |= evaluate_batches(step_model, val_batches)
            now = time.perf_counter()
            metrics |= {
                "learning_rate": optimizer.param_groups[0]["lr"],
                "epoch_seconds": now - epoch_started,
                "images_per_second": train_batches.num_images / train_seconds,
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
            last_epoch = state.stopped_early or state.next_epoch == config.epochs
            written = None
            if checkpoint_path is not None and (
                last_epoch or now - last_checkpoint >= config.checkpoint_seconds
            ):
                save_checkpoint(checkpoint_path, state, model, optimizer, scheduler)
                written, last_checkpoint = checkpoint_path, time.perf_counter()
            for callback in callbacks:
                callback(epoch, metrics, written)
            if state.stopped_early:
                break
    if state.best_weights is not None:
        model.load_state_dict(state.best_weights)
    return state


def mlflow_epoch_logger(
    logged_epochs: frozenset[int] = frozenset(), next_slot: int = 0
) -> EpochCallback:
    """The MLflow side of an epoch: its metrics (step = epoch) and the checkpoint just written, into
    the checkpoint slot not written last (starting at `next_slot`).

    A resumed run repeats the epochs after its last checkpoint, with the same results (training is
    seeded per epoch); `logged_epochs` are not logged again, so each metric stays one series.
    """
    slot = [next_slot]

    def log_epoch(epoch: int, metrics: dict[str, float], checkpoint: Path | None) -> None:
        if epoch not in logged_epochs:
            mlflow.log_metrics(metrics, step=epoch)
        if checkpoint is not None:
            mlflow.log_artifact(str(checkpoint), CHECKPOINT_SLOTS[slot[0]])
            slot[0] = 1 - slot[0]

    return log_epoch


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
        per_epoch = metrics["elapsed_seconds"] / max(1, done - self.first)
        tqdm.write(
            f"epoch {done}/{self.total}  train_loss {metrics['train_loss']:.4f}  "
            f"val_accuracy {metrics['val_accuracy']:.4f}  {metrics['epoch_seconds']:.1f} s  "
            f"ETA {format_duration(per_epoch * (self.total - done))}",
            file=sys.stderr,
        )
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def seconds_per_image(model: nn.Module, batches: DeviceBatches) -> float:
    """A training step of a copy of `model` on up to 128 images, timed after one warm-up step:
    enough to tell minutes from hours (smaller batches cost more per image)."""
    probe = copy.deepcopy(model).train()
    images, labels = next(iter(batches))
    images, labels = images[:128], labels[:128]
    for _ in range(2):
        started = time.perf_counter()
        nn.functional.cross_entropy(probe(images), labels).backward()
    return (time.perf_counter() - started) / len(labels)


def announce_training(prepared: Prepared, config: TrainConfig, first_epoch: int) -> None:
    """The line before training: what runs where, and on a CPU how long it will take."""
    epochs = config.epochs - first_epoch
    line = (
        f"training {config.model} on {prepared.device}: {len(prepared.splits.train):,} images "
        f"({len(prepared.splits.val):,} for validation), {epochs} epoch{'s' * (epochs != 1)}"
    )
    if prepared.device.type != "cpu":
        print(f"{line}; the first epoch gives the ETA", file=sys.stderr, flush=True)
        return
    estimate = (
        seconds_per_image(prepared.model, prepared.train_batches)
        * prepared.train_batches.num_images
        * epochs
    )
    print(f"{line}, about {format_duration(estimate)}", file=sys.stderr, flush=True)
    if estimate > 3600:
        print(
            "warning: that is over an hour on the CPU. Use a GPU, -P model=cnn, or fewer "
            "-P epochs (or -P max_train_images) to try things out.",
            file=sys.stderr,
            flush=True,
        )


@dataclass
class Prepared:
    splits: Splits
    model: nn.Module
    train_batches: DeviceBatches
    val_batches: DeviceBatches
    device: torch.device
    data: ImageSet


def prepare_training(config: TrainConfig, data: ImageSet | None = None) -> Prepared:
    """Data, splits, device-resident batches and a freshly seeded model for `config`.

    `data` lets a caller that trains many times (tuning) load the training batches once.
    """
    if data is None:
        data = load_training_set(config.data_dir, config.download, config.skip_bad_images)
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
    return Prepared(splits, model, train_batches, val_batches, device, data)


def log_training_inputs(prepared: Prepared, config: TrainConfig) -> None:
    """Params, tags, resolved config, normalization and the dataset record of a training run."""
    splits = prepared.splits
    log_resolved_params(config_to_params(config))
    mlflow.log_text(dump_yaml(config_to_params(config)), "config.yaml")
    mlflow.set_tags(
        {
            "architecture": config.model,
            "device": str(prepared.device),
            "data_source": prepared.data.source,
        }
    )
    log_json(
        {
            "mean": list(splits.mean),
            "std": list(splits.std),
            "class_names": list(prepared.data.class_names),
            "train_images": len(splits.train),
            "val_images": len(splits.val),
        },
        "stats.json",
    )
    mlflow.log_metrics(
        {
            "train_images": len(splits.train),
            "val_images": len(splits.val),
            "skipped_files": len(prepared.data.problems),
        }
    )
    if prepared.data.problems:
        log_json(prepared.data.problems, "skipped_files.json")
    log_dataset(splits.train, context="training")


def stored_config(run_id: str) -> TrainConfig:
    """The resolved config a run was started with (read back from its `config.yaml`)."""
    try:
        text = mlflow.artifacts.load_text(f"runs:/{run_id}/config.yaml")
    except MlflowException as error:
        raise ConfigError(
            f"Cannot resume run {run_id}: it has no config.yaml ({error.message.splitlines()[0]}). "
            "Only a train run that logged its config can be resumed; start a new run instead "
            "(leave resume_run_id empty)."
        ) from None
    return build_config(TrainConfig, yaml.safe_load(text), {"resume_run_id": run_id})


def load_resume_checkpoint(run_id: str, scratch: Path) -> tuple[dict[str, Any] | None, int]:
    """The run's newest checkpoint that loads whole, and the slot to write next; None when it died
    before writing one. A copy cut off mid-upload is skipped (with a line saying so)."""
    client = mlflow.MlflowClient()
    present = {
        f.path
        for folder in ("checkpoints", *CHECKPOINT_SLOTS)
        for f in client.list_artifacts(run_id, folder)
    }
    candidates = [f"{folder}/{CHECKPOINT_FILE}" for folder in CHECKPOINT_SLOTS] + [
        LEGACY_CHECKPOINT
    ]
    newest, newest_slot = None, -1
    for index, artifact in enumerate(candidates):
        if artifact not in present:
            continue
        downloaded = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=artifact, dst_path=str(scratch / f"resume-{index}")
        )
        try:
            checkpoint = torch.load(downloaded, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError):
            print(
                f"run {run_id}: {artifact} is incomplete (its upload was cut off); skipping it",
                file=sys.stderr,
                flush=True,
            )
            continue
        if (
            newest is None
            or checkpoint["fit_state"]["next_epoch"] > newest["fit_state"]["next_epoch"]
        ):
            newest, newest_slot = checkpoint, index
    return newest, (1 if newest_slot == 0 else 0)


def logged_epochs(run_id: str) -> frozenset[int]:
    history = mlflow.MlflowClient().get_metric_history(run_id, "val_accuracy")
    return frozenset(m.step for m in history)


@dataclass
class TrainResult:
    run_id: str
    model_uri: str
    best_val_accuracy: float
    best_epoch: int
    epochs_run: int


def run_train(config: TrainConfig, callbacks: Sequence[EpochCallback] = ()) -> TrainResult:
    """The `train` entry point: one tracked run, ending with a logged, servable `model`."""
    resume_id = config.resume_run_id
    if resume_id:
        config = stored_config(resume_id)
    started = time.perf_counter()
    with (
        stage_run(
            config.experiment_name, config.model, run_id=resume_id, log_system_metrics=True
        ) as run,
        scratch_dir() as scratch,
    ):
        prepared = prepare_training(config)
        checkpoint_path = scratch / CHECKPOINT_FILE
        resume_from, done, next_slot = None, frozenset(), 0
        if resume_id:
            resume_from, next_slot = load_resume_checkpoint(resume_id, scratch)
            done = logged_epochs(resume_id)
            if resume_from is None:
                print(
                    f"run {resume_id} has no checkpoint yet: training it again from epoch 1 with "
                    "its logged config",
                    file=sys.stderr,
                    flush=True,
                )
            mlflow.set_tag(
                "resumed_from_epoch", resume_from["fit_state"]["next_epoch"] if resume_from else 0
            )
        else:
            log_training_inputs(prepared, config)
        first_epoch = resume_from["fit_state"]["next_epoch"] if resume_from else 0
        announce_training(prepared, config, first_epoch)
        progress = EpochProgress(config.epochs, first_epoch)
        try:
            state = fit(
                prepared.model,
                config.model,
                prepared.train_batches,
                prepared.val_batches,
                config,
                callbacks=[mlflow_epoch_logger(done, next_slot), progress, *callbacks],
                checkpoint_path=checkpoint_path,
                resume_from=resume_from,
            )
        finally:
            progress.close()
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
            prepared.data.class_names,
            prepared.splits.val.images[0],
        )
        mlflow.set_tag("model_uri", info.model_uri)
        next_command = (
            f"mlflow run . -e evaluate --env-manager local -P model_uri={info.model_uri} "
            f"-P data_dir={config.data_dir}"
            if has_test_set(config.data_dir)
            else f"mlflow ui --backend-store-uri {mlflow.get_tracking_uri()}   "
            f"(no test split in {config.data_dir} to evaluate on)"
        )
        print_summary(
            "train",
            {
                "best val_accuracy": f"{state.best_val_accuracy:.4f} at epoch "
                f"{state.best_epoch + 1} of {state.next_epoch}"
                + (" (stopped early)" if state.stopped_early else ""),
                "time": format_duration(time.perf_counter() - started),
                "model": info.model_uri,
            },
            next_command,
        )
    return TrainResult(
        run.info.run_id, info.model_uri, state.best_val_accuracy, state.best_epoch, state.next_epoch
    )
