"""What a train run keeps in MLflow so that it can be resumed, and reading it back: per-epoch
metrics, checkpoints in two alternating slots, and the logged config."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path
from typing import Any

import mlflow
import torch
import yaml
from mlflow.exceptions import MlflowException

from pipeline.config import ConfigError, TrainConfig, train_config_from
from pipeline.training.loop import EpochCallback

CHECKPOINT_FILE = "last.pt"

# An artifact upload is not atomic in every store (a local file store copies the file in place), so
# checkpoints alternate between two folders: a process killed mid-upload leaves the other one whole.
CHECKPOINT_SLOTS = ("checkpoints/a", "checkpoints/b")

LEGACY_CHECKPOINT = "checkpoints/last.pt"  # written by versions before the slots


def mlflow_epoch_logger(
    logged_epochs: frozenset[int] = frozenset(), next_slot: int = 0
) -> EpochCallback:
    """The MLflow side of an epoch: its metrics (step = the epoch's number, counted from 1 as the
    console counts) and the checkpoint just written, into the checkpoint slot not written last
    (starting at `next_slot`).

    A resumed run repeats the epochs after its last checkpoint, with the same results (training is
    seeded per epoch); `logged_epochs` are not logged again, so each metric stays one series.
    """
    slot = [next_slot]

    def log_epoch(epoch: int, metrics: dict[str, float], checkpoint: Path | None) -> None:
        if epoch + 1 not in logged_epochs:
            mlflow.log_metrics(metrics, step=epoch + 1)
        if checkpoint is not None:
            mlflow.log_artifact(str(checkpoint), CHECKPOINT_SLOTS[slot[0]])
            slot[0] = 1 - slot[0]

    return log_epoch


def delete_checkpoints(run_id: str) -> str:
    """Drop a finished run's resume checkpoints (the logged model keeps the best weights); a failed
    or killed run never gets here, so it can still be resumed. Returns what became of them."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    run = mlflow.get_run(run_id)
    try:
        get_artifact_repository(run.info.artifact_uri).delete_artifacts("checkpoints")
    except Exception as error:  # any store's refusal: the run is finished, only disk is at stake
        print(
            f"run {run_id}: its checkpoints could not be deleted ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}); they stay under checkpoints/",
            file=sys.stderr,
            flush=True,
        )
        return "kept (deletion failed)"
    return "deleted"


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
    values = yaml.safe_load(text)
    return train_config_from(
        values.get("model", TrainConfig.model), values, {"resume_run_id": run_id}
    )


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
    if newest is None:
        print(
            f"run {run_id} has no checkpoint yet: training it again from epoch 1 with its logged "
            "config",
            file=sys.stderr,
            flush=True,
        )
    return newest, (1 if newest_slot == 0 else 0)


def logged_epochs(run_id: str) -> frozenset[int]:
    """The numbers (from 1) of the epochs whose metrics the run already logged."""
    history = mlflow.MlflowClient().get_metric_history(run_id, "val_accuracy")
    return frozenset(m.step for m in history)
