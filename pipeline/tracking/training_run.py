"""One tracked training run: the one way to train once, used by `train` and by every tune trial.

It opens (or reopens, to resume) the MLflow run, prepares the data and model, logs what goes in
(params, tags, `config.yaml`, statistics, the dataset record, lineage), fits under the watchdog and
records what came out. `recipe` is what was asked (the model's recipe under the user's values);
`resolved` is what runs (the recipe scaled to the training split).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import torch

from pipeline.config import TrainConfig, config_to_params, dump_yaml, parse_duration
from pipeline.data.image_set import ImageSet
from pipeline.errors import Interrupted
from pipeline.tracking.model_logging import log_classifier
from pipeline.tracking.resume import (
    CHECKPOINT_FILE,
    delete_checkpoints,
    has_logged_config,
    load_resume_checkpoint,
    logged_epochs,
    mlflow_epoch_logger,
)
from pipeline.tracking.runs import (
    log_dataset,
    log_json,
    log_lineage,
    log_resolved_params,
    scratch_dir,
    source_name,
    stage_run,
)
from pipeline.training.budget import BudgetPlan, Pacer, fit_to_budget
from pipeline.training.distributed import current_worker, from_leader
from pipeline.training.loop import EpochCallback, FitState, fit
from pipeline.training.precision import autocast_dtype
from pipeline.training.prepare import Prepared, prepare_training
from pipeline.training.watchdog import WatchdogFinding


@dataclass
class TrainResult:
    run_id: str
    model_uri: str | None  # None where the run logs no model (a tune trial)
    best_val_accuracy: float
    best_epoch: int  # counted from 1
    epochs_run: int


def run_name_of(resolved: TrainConfig, source: str) -> str:
    """`cnn · cifar10-subset · lr 0.002 · 4 epochs`: what tells runs apart in a table."""
    epochs = f"{resolved.epochs} epoch{'s' * (resolved.epochs != 1)}"
    return f"{resolved.model} · {source_name(source)} · lr {resolved.lr:.3g} · {epochs}"


def discard_stray_run(resumed_id: str) -> None:
    """`mlflow run -P resume_run_id=...` creates a new run before this process starts; the work
    goes on in the resumed run, so the new, empty one is ended and deleted (ended first, so that
    `mlflow run` finds it terminated and leaves it be)."""
    stray = os.environ.get("MLFLOW_RUN_ID")
    if stray and stray != resumed_id:
        client = mlflow.MlflowClient()
        client.set_terminated(stray, "FINISHED")
        client.delete_run(stray)


class TrainingRun:
    """A training run from its start (or resume) to its recorded end; see the module docstring."""

    def __init__(
        self, run_id: str, recipe: TrainConfig, scratch: Path, named: bool, leads: bool = True
    ) -> None:
        self.run_id = run_id
        self.named = named  # the caller chose the run's name; else it is named after its data
        # False in a process of a distributed job other than rank 0: it prepares, resumes and fits
        # as rank 0 does (the collectives keep them in step), logs only its system metrics to
        # rank 0's run, and prints nothing.
        self.leads = leads
        self.system_metrics: Any = None
        self.recipe = recipe
        self.resuming = recipe.resume_run_id is not None
        self.scratch = scratch
        self.started = time.perf_counter()
        self.prepared: Prepared | None = None
        self.resume_from: dict[str, Any] | None = None
        self.next_slot = 0
        self.logged: frozenset[int] = frozenset()
        self.checkpointed = False
        self.logged_config = False
        self.epochs_done = 0
        self.checkpoint_epoch = 0
        self.plan: BudgetPlan | None = None

    @property
    def resolved(self) -> TrainConfig:
        return self.prepared.config

    @property
    def first_epoch(self) -> int:
        return self.resume_from["fit_state"]["next_epoch"] if self.resume_from else 0

    def prepare(self, data: ImageSet | None = None) -> Prepared:
        """Data, splits, batches and a seeded model; a new run logs its inputs, a resumed one
        loads its newest whole checkpoint (a run killed before it logged its inputs logs them
        now, as a new run would)."""
        self.prepared = prepare_training(self.recipe, data)
        if current_worker() is not None:
            self.run_id = from_leader(self.run_id)  # the run every process logs its metrics to
        if not self.leads:
            self.watch_system_metrics()
        if self.recipe.time_budget and not self.resuming:  # a resumed run keeps its plan
            self.plan = fit_to_budget(
                self.prepared,
                parse_duration(self.recipe.time_budget),
                time.perf_counter() - self.started,
            )
        if not self.leads:
            if self.resuming and has_logged_config(self.run_id):
                self.resume_from = load_resume_checkpoint(self.run_id, self.scratch)[0]
            return self.prepared
        name = mlflow.get_run(self.run_id).data.tags.get("mlflow.runName", self.run_id)
        self.logged_config = self.resuming and has_logged_config(self.run_id)
        if self.logged_config:
            self.resume_from, self.next_slot = load_resume_checkpoint(self.run_id, self.scratch)
            self.logged = logged_epochs(self.run_id)
            self.epochs_done = self.checkpoint_epoch = self.first_epoch
        else:
            self.log_inputs()
            if not self.named:
                name = run_name_of(self.resolved, self.prepared.data.source)
                mlflow.set_tag("mlflow.runName", name)
        if self.resuming:
            mlflow.set_tag("resumed_from_epoch", self.first_epoch)
            print(
                f"resuming run {self.run_id} ({name}) after epoch {self.first_epoch} of "
                f"{self.resolved.epochs}"
                if self.resume_from
                else f"run {self.run_id} ({name}) has no checkpoint yet: training it again from "
                f"epoch 1 with its {'logged config' if self.logged_config else 'parameters'}",
                file=sys.stderr,
                flush=True,
            )
        return self.prepared

    def log_inputs(self) -> None:
        """Params, tags, `config.yaml`, normalization and the dataset record of the run.

        Where the recipe was scaled to the data, `<name>` keeps the recipe's value and
        `resolved.<name>` is what ran; `config.yaml` is what ran (a resume continues with it), and
        the lineage is the recipe's (what `main` compares before it knows the data's size)."""
        prepared, recipe = self.prepared, self.recipe
        splits = prepared.splits
        used, given = config_to_params(self.resolved), config_to_params(recipe)
        logged = mlflow.get_run(self.run_id).data.params
        mlflow.log_params(
            {k: given[k] for k in recipe.from_recipe if k not in logged and used[k] != given[k]}
        )
        log_resolved_params(used)
        mlflow.log_text(dump_yaml(used), "config.yaml")
        mlflow.set_tags(
            {
                "architecture": recipe.model,
                "device": str(prepared.device),
                "precision": "bf16"
                if autocast_dtype(prepared.device, self.resolved.precision)
                else "fp32",
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
        if self.plan is not None:
            mlflow.set_tag("time_budget_plan", self.plan.description)
            mlflow.log_metrics(
                {
                    "time_budget_seconds": parse_duration(recipe.time_budget),
                    "planned_seconds": self.plan.planned_seconds,
                    "planned_epoch_seconds": self.plan.epoch_seconds,
                }
            )
        log_dataset(splits.train, context="training")
        log_dataset(splits.val, context="validation")
        log_lineage({"train": splits.train, "val": splits.val}, given)

    def fit(
        self,
        callbacks: Sequence[EpochCallback] = (),
        on_finding: Sequence[Callable[[WatchdogFinding], None]] = (),
        checkpoints: bool = True,
    ) -> FitState:
        """`fit()` with each epoch logged (and checkpointed, with `checkpoints`); a watchdog
        finding is tagged on the run, then handed to each of `on_finding` (which may raise to
        stop)."""
        prepared = self.prepared
        self.checkpointed = checkpoints and self.leads
        pacer = Pacer(self.plan, self.started) if self.plan else None
        if not self.leads:
            return fit(prepared.model, prepared.train_batches, prepared.val_batches,
                       prepared.config, resume_from=self.resume_from, pacer=pacer)  # fmt: skip

        def record(finding: WatchdogFinding) -> None:
            mlflow.set_tags({"watchdog": finding.kind, "watchdog_message": str(finding)[:4000]})
            for handler in on_finding:
                handler(finding)

        return fit(
            prepared.model,
            prepared.train_batches,
            prepared.val_batches,
            prepared.config,
            callbacks=[
                mlflow_epoch_logger(self.logged, self.next_slot),
                self.note_epoch,
                *callbacks,
            ],
            checkpoint_path=self.scratch / CHECKPOINT_FILE if self.checkpointed else None,
            resume_from=self.resume_from,
            on_problem=record,
            pacer=pacer,
        )

    def watch_system_metrics(self) -> None:
        """A follower's CPU, memory and GPU, logged to rank 0's run as `system/rank<N>/...`."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self.system_metrics = SystemMetricsMonitor(
            self.run_id, node_id=f"rank{os.environ.get('RANK', '?')}"
        )
        self.system_metrics.start()

    def note_epoch(self, epoch: int, metrics: dict[str, float], checkpoint: Path | None) -> None:
        self.epochs_done = epoch + 1
        if checkpoint is not None:
            self.checkpoint_epoch = epoch + 1

    def interrupted(self) -> str:
        """What a person reads after Ctrl-C: where it stopped, what is kept, how to continue."""
        epochs = self.resolved.epochs if self.prepared else self.recipe.epochs
        where = (
            f"in epoch {self.epochs_done + 1} of {epochs}" if self.prepared else "while preparing"
        )
        kept = (
            f"the checkpoint after epoch {self.checkpoint_epoch}"
            if self.checkpoint_epoch
            else "no checkpoint yet (resuming starts at epoch 1 with the same config)"
        )
        return (
            f"train run {self.run_id} stopped by Ctrl-C {where}; kept: {kept}. Continue with: "
            f"cifar10 train --resume-run-id {self.run_id}   (or mlflow run . -e train "
            f"--env-manager local -P resume_run_id={self.run_id})"
        )

    def finish(self, state: FitState, log_model: bool = True) -> TrainResult:
        """The run's outcome: its summary metrics, the logged model (with `log_model`) and its
        resume checkpoints deleted; an `error` tag from an earlier, interrupted attempt goes."""
        if not self.leads:
            return TrainResult(
                "", None, state.best_val_accuracy, state.best_epoch + 1, state.next_epoch
            )
        prepared = self.prepared
        model_uri, model_id = None, None
        if log_model:
            info = log_classifier(
                prepared.model.to("cpu").to(memory_format=torch.contiguous_format),
                self.recipe.model,
                self.recipe.options,
                prepared.splits.mean,
                prepared.splits.std,
                prepared.data.class_names,
                prepared.splits.val.images[0],
                prepared.splits.train.images,
                prepared.splits.val.images,
                prepared.splits.val.labels,
                tta=self.resolved.tta,
            )
            model_uri, model_id = info.model_uri, info.model_id
        final = state.history[-1] if state.history else {}
        mlflow.log_metrics(
            {
                "best_val_accuracy": state.best_val_accuracy,
                "best_epoch": state.best_epoch + 1,
                "epochs_run": state.next_epoch,
                "final_train_loss": final.get("train_loss", float("nan")),
                "final_val_accuracy": final.get("val_accuracy", float("nan")),
                "stopped_early": float(state.stopped_early),
                "train_seconds": time.perf_counter() - self.started,
            },
            model_id=model_id,  # linked to the logged model: its page in the UI shows them
        )
        if log_model:
            mlflow.set_tag("model_uri", model_uri)
        if self.checkpointed:
            mlflow.set_tag(
                "checkpoints",
                "kept" if self.recipe.keep_checkpoints else delete_checkpoints(self.run_id),
            )
        earlier = mlflow.get_run(self.run_id).data.tags
        for tag in ("error", "interrupted"):  # of an attempt this run has now outlived
            if tag in earlier:
                mlflow.MlflowClient().delete_tag(self.run_id, tag)
        return TrainResult(
            self.run_id,
            model_uri,
            state.best_val_accuracy,
            state.best_epoch + 1,
            state.next_epoch,
        )


@contextmanager
def training_run(
    recipe: TrainConfig,
    stage: str = "train",
    run_name: str | None = None,
    parent_run_id: str | None = None,
) -> Iterator[TrainingRun]:
    """Open the run for `recipe` (reopen it where `recipe.resume_run_id` is set: check first with
    `resumable_config`); a failure inside is tagged and ends it FAILED, as any stage run. In a
    process of a distributed job other than rank 0 no run is opened: rank 0's is followed."""
    worker = current_worker()
    if worker is not None and not worker.leads:
        with scratch_dir() as scratch:
            following = TrainingRun("", recipe, scratch, named=False, leads=False)
            try:
                yield following
            finally:
                if following.system_metrics is not None:
                    following.system_metrics.finish()
        return
    with (
        stage_run(
            stage,
            recipe.experiment_name,
            run_name or recipe.model,
            run_id=recipe.resume_run_id,
            parent_run_id=parent_run_id,
            log_system_metrics=parent_run_id is None,
        ) as run,
        scratch_dir() as scratch,
    ):
        training = TrainingRun(run.info.run_id, recipe, scratch, named=run_name is not None)
        try:
            yield training
        except KeyboardInterrupt as interrupt:
            if isinstance(interrupt, Interrupted):
                raise
            raise Interrupted(training.interrupted()) from None
