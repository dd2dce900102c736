"""What a train run keeps in MLflow so that it can be resumed, and reading it back: per-epoch
metrics, checkpoints in two alternating slots, and the logged config."""

from __future__ import annotations

import pickle
import shlex
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import mlflow
import torch
import yaml
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from pipeline.config import ConfigError, TrainConfig, resolve_train_config, train_config_from
from pipeline.model.architectures import option_owners
from pipeline.tracking.runs import STAGE_TAG, owner_is_gone
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


NEW_RUN_ADVICE = "start a new run instead (leave resume_run_id empty)"


def has_logged_config(run_id: str) -> bool:
    """Whether the run got as far as logging `config.yaml` (what a new run logs first)."""
    return "config.yaml" in {f.path for f in mlflow.MlflowClient().list_artifacts(run_id)}


def stored_config(run: Run) -> TrainConfig | None:
    """The resolved config a run was started with (its `config.yaml`), None where it has none."""
    if not has_logged_config(run.info.run_id):
        return None
    values = yaml.safe_load(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/config.yaml"))
    return train_config_from(
        values.get("model", TrainConfig.model), values, {"resume_run_id": run.info.run_id}
    )


def as_given(logged: str) -> str:
    """A parameter as the user gave it: `mlflow run` logs each shell-quoted (`''` for unset)."""
    try:
        parts = shlex.split(logged)
    except ValueError:  # not shell-quoted after all
        return logged
    if not parts:
        return ""
    return parts[0] if len(parts) == 1 else logged


def entry_point_config(run: Run) -> TrainConfig | None:
    """The config a run killed before it logged `config.yaml` would have run: its entry-point
    parameters (as `mlflow run` logged them) resolved as the CLI resolves them."""
    known = set(TrainConfig.__dataclass_fields__) | set(option_owners())
    values = {k: as_given(v) for k, v in run.data.params.items() if k in known}
    given = {k: v for k, v in values.items() if v != ""}
    given.pop("resume_run_id", None)
    if not given:
        return None
    return resolve_train_config(given)


def what_resumes(run: Run) -> str | None:
    """Why a run that is not a train run cannot be resumed, and what continues its kind of work;
    None for a train run."""
    tags, run_id = run.data.tags, run.info.run_id
    if "optuna_trial" in tags:
        return (
            f"run {run_id} is trial {tags['optuna_trial']} of tune study "
            f"{tags.get('optuna_study', '?')}: a trial is not resumed on its own; run tune again "
            "with the same study_name and storage and Optuna retries it."
        )
    kind = tags.get(STAGE_TAG) or tags.get("mlflow.project.entryPoint")
    if kind in (None, "train"):
        return None
    instead = {
        "tune": f"run tune again with -P study_name={run.data.params.get('study_name', '<its study>')} "
        "(and the same storage): the study continues where it stopped",
        "main": "run main again: it reuses every finished step",
        "evaluate": "run evaluate again with the same model_uri",
        "predict": "run predict again with the same input and output",
        "promote": "run promote again",
        "preprocess": "run preprocess again",
    }.get(kind, "run its entry point again")
    article = "an" if kind[0] in "aeiou" else "a"
    return (
        f"run {run_id} is {article} {kind} run; resume_run_id continues a train run only. To redo "
        f"it, {instead}."
    )


def resumable_config(run_id: str) -> TrainConfig:
    """The config to continue run `run_id` with, or one line that says why it must not be: it is
    no run, not a train run, finished (its record is never rewritten), or alive in another
    process (two writers on one run)."""
    try:
        run = mlflow.get_run(run_id)
    except MlflowException:
        raise ConfigError(
            f"Cannot resume {run_id}: no run with that id in {mlflow.get_tracking_uri()}. Copy "
            "the id from the run's page (`mlflow ui`) or `mlflow runs list --experiment-id <id>`."
        ) from None
    if (reason := what_resumes(run)) is not None:
        raise ConfigError(f"Cannot resume {reason}")
    status, tags = run.info.status, run.data.tags
    if status == "FINISHED":
        best = run.data.metrics.get("best_val_accuracy")
        epoch = run.data.metrics.get("best_epoch")
        result = (
            f"best val_accuracy {best:.4f} at epoch {int(epoch)}" if best is not None else "done"
        )
        raise ConfigError(
            f"Cannot resume run {run_id}: it finished ({result}; model "
            f"{tags.get('model_uri', 'none logged')}) and a finished run is never rewritten. "
            f"To train again, {NEW_RUN_ADVICE}; `main` reuses finished work by itself."
        )
    if status == "RUNNING" and "process.pid" in tags and not owner_is_gone(tags):
        raise ConfigError(
            f"Cannot resume run {run_id}: it is still running in process {tags['process.pid']} "
            f"on {tags.get('process.host', '?')}. Wait for it, or stop that process first (a "
            "run whose process is gone is resumed)."
        )
    config = stored_config(run) or entry_point_config(run)
    if config is None:
        raise ConfigError(
            f"Cannot resume run {run_id}: it has no config.yaml and no train parameters, so it "
            f"holds nothing to resume from; {NEW_RUN_ADVICE}."
        )
    return replace(config, resume_run_id=run_id)


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
    """The numbers (from 1) of the epochs whose metrics the run already logged."""
    history = mlflow.MlflowClient().get_metric_history(run_id, "val_accuracy")
    return frozenset(m.step for m in history)
