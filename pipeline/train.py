"""The `train` stage: one tracked MLflow run around `fit()`, ending with a logged, servable model.

With nproc_per_node x nnodes > 1 the stage launches itself under torch.distributed
(pipeline/tracking/launch.py): `python -m pipeline.train` is what each process runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence

import mlflow

from pipeline.config import TrainConfig
from pipeline.data.sources import has_test_set
from pipeline.errors import PipelineError
from pipeline.tracking.launch import JOB_ENV, JOB_TAG, RECIPE_ENV, launch_training
from pipeline.tracking.resume import resumable_config
from pipeline.tracking.runs import describe_run, print_summary
from pipeline.tracking.training_run import TrainResult, discard_stray_run, training_run
from pipeline.training.distributed import current_worker
from pipeline.training.loop import EpochCallback, FitState
from pipeline.training.prepare import Prepared
from pipeline.training.progress import EpochProgress, announce_training, format_duration
from pipeline.training.watchdog import CHANCE_P_VALUE, WatchdogFinding, above_chance_p_value

LAUNCH_FIELDS = ("nproc_per_node", "nnodes", "node_rank", "rdzv_endpoint", "collective_timeout_s")


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
    """The `train` entry point: one tracked run, ending with a logged, servable `model`. A resumed
    run continues with its own config, on as many processes as this command asks for."""
    if recipe.resume_run_id:
        discard_stray_run(recipe.resume_run_id)
        layout = {name: getattr(recipe, name) for name in LAUNCH_FIELDS}
        recipe = dataclasses.replace(resumable_config(recipe.resume_run_id), **layout)
    if recipe.world_size > 1:
        return launch_training(recipe)
    return train_here(recipe, callbacks)


def train_here(recipe: TrainConfig, callbacks: Sequence[EpochCallback] = ()) -> TrainResult:
    """This process's part: the whole run alone, or as one process of a distributed job (rank 0
    logs and prints, the others follow it silently)."""
    worker = current_worker()
    with training_run(recipe) as run:
        if worker is not None and run.leads:
            mlflow.set_tags({JOB_TAG: os.environ.get(JOB_ENV, ""),
                             "distributed.world_size": worker.world_size})  # fmt: skip
        prepared = run.prepare()
        if not run.leads:
            return run.finish(run.fit())
        announce_training(prepared, recipe, run.first_epoch, run.plan and run.plan.description)
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


def run_worker() -> None:
    """What each process of a distributed job runs (`python -m pipeline.train`): the recipe the
    launcher resolved, from the environment. A problem is one line, as from the CLI."""
    recipe = TrainConfig(**json.loads(os.environ[RECIPE_ENV]))
    os.environ.setdefault("MLFLOW_SYSTEM_METRICS_NODE_ID", f"rank{os.environ.get('RANK', '0')}")
    try:
        train_here(recipe)
    except PipelineError as error:
        print(f"error (rank {os.environ.get('RANK', '?')}): {error}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    run_worker()
