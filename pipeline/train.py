"""The `train` stage: one tracked MLflow run around `fit()`, ending with a logged, servable model."""

from __future__ import annotations

import time
from collections.abc import Sequence

import mlflow

from pipeline.config import TrainConfig
from pipeline.data.sources import has_test_set
from pipeline.tracking.resume import resumable_config
from pipeline.tracking.runs import describe_run, print_summary
from pipeline.tracking.training_run import TrainResult, discard_stray_run, training_run
from pipeline.training.loop import (
    CHANCE_P_VALUE,
    EpochCallback,
    FitState,
    WatchdogFinding,
    above_chance_p_value,
)
from pipeline.training.prepare import Prepared
from pipeline.training.progress import EpochProgress, announce_training, format_duration


def training_verdict(state: FitState, prepared: Prepared) -> str:
    """How the summary's first line ends: a run whose best model is at chance never just
    "finished"."""
    if state.problem and state.stopped_early:
        return f"stopped early, {state.problem.kind}"
    classes = len(prepared.data.class_names)
    p_value = above_chance_p_value(state.best_val_accuracy, len(prepared.splits.val), classes)
    if state.problem:
        return f"finished, but {state.problem.kind}"
    if p_value >= CHANCE_P_VALUE:
        return f"finished, but its best model is no better than chance (p={p_value:.2g})"
    return "finished"


def run_train(recipe: TrainConfig, callbacks: Sequence[EpochCallback] = ()) -> TrainResult:
    """The `train` entry point: one tracked run, ending with a logged, servable `model`."""
    if recipe.resume_run_id:
        discard_stray_run(recipe.resume_run_id)
        recipe = resumable_config(recipe.resume_run_id)
    with training_run(recipe) as run:
        prepared = run.prepare()
        announce_training(prepared, recipe, run.first_epoch)
        progress = EpochProgress(prepared.config.epochs, run.first_epoch)
        stop = prepared.config.stop_if_not_learning

        def report(finding: WatchdogFinding) -> None:
            progress.write(
                f"watchdog: {finding}"
                + (" Stopping early (-P stop_if_not_learning=false trains on)." if stop else "")
            )

        try:
            state = run.fit([progress, *callbacks], on_finding=[report])
        finally:
            progress.close()
        result = run.finish(state)
        data_dir = prepared.config.data_dir
        next_command = (
            f"mlflow run . -e evaluate --env-manager local -P model_uri={result.model_uri} "
            f"-P data_dir={data_dir}"
            if has_test_set(data_dir)
            else f"mlflow ui --backend-store-uri {mlflow.get_tracking_uri()}   "
            f"(no test split in {data_dir} to evaluate on)"
        )
        verdict = training_verdict(state, prepared)
        best = (
            f"{state.best_val_accuracy:.4f} at epoch {state.best_epoch + 1} of {state.next_epoch}"
        )
        describe_run(
            f"best val_accuracy {best}" + ("" if verdict == "finished" else f"; {verdict}")
        )
        print_summary(
            "train",
            {
                "best val_accuracy": best + (" (stopped early)" if state.stopped_early else ""),
                "time": format_duration(time.perf_counter() - run.started),
                "model": result.model_uri,
            }
            | ({"watchdog": str(state.problem)} if state.problem else {}),
            next_command,
            verdict=verdict,
        )
    return result
