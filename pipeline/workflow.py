"""The `main` entry point: preprocess -> train -> evaluate -> promote, each as a child MLflow run.

As in MLflow's multistep example, each step runs through `mlflow.projects.run`, and a step whose
entry point, parameters, code version and inputs match a finished run is reused instead of rerun, so
rerunning `main` after a failure resumes at the failed step. `force_rerun=true` runs everything again.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import mlflow
from mlflow.entities import Run
from mlflow.exceptions import ExecutionException
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_PROJECT_ENTRY_POINT

from pipeline.config import coerce, resolve_train_config
from pipeline.data import canonical_source, has_test_set
from pipeline.errors import PipelineError
from pipeline.tracking import PROJECT_ROOT, git_commit, print_summary, stage_run

INPUTS_TAG = "main.inputs"
PREPROCESS_KEYS = ("data_dir", "val_fraction", "seed", "download", "skip_bad_images")


def find_finished(
    experiment_id: str, entry_point: str, params: dict[str, str], inputs: dict[str, str]
) -> Run | None:
    """A finished run of `entry_point` at this commit with exactly these params and inputs."""
    runs = mlflow.MlflowClient().search_runs(
        [experiment_id],
        filter_string=(
            f"attributes.status = 'FINISHED' and tags.`{MLFLOW_PROJECT_ENTRY_POINT}` = '{entry_point}'"
        ),
        order_by=["attributes.start_time DESC"],
    )
    commit = git_commit()
    for run in runs:
        if run.data.tags.get(MLFLOW_GIT_COMMIT, commit) != commit:
            continue
        if run.data.tags.get(INPUTS_TAG, "{}") != json.dumps(inputs, sort_keys=True):
            continue
        if all(run.data.params.get(k) == v for k, v in params.items()):
            return run
    return None


class StepFailedError(PipelineError):
    """A step of `main` failed; the message carries the step's own error."""


def failure_message(client: mlflow.MlflowClient, experiment_id: str, entry_point: str) -> str:
    """Where the step's failure is; its error itself was printed by the step and is its `error`
    tag, so it is not repeated here."""
    failed = client.search_runs(
        [experiment_id],
        filter_string=(
            f"attributes.status = 'FAILED' and tags.`{MLFLOW_PROJECT_ENTRY_POINT}` = '{entry_point}'"
        ),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    where = f" (run {failed[0].info.run_id}, tag `error`)" if failed else ""
    return (
        f"step {entry_point} failed{where}: its error is printed above. Fix it and rerun main: "
        "the finished steps are reused and it resumes at this one."
    )


def get_or_run(
    experiment_id: str,
    entry_point: str,
    params: dict[str, Any],
    inputs: dict[str, str] | None = None,
    force: bool = False,
) -> tuple[Run, bool]:
    """The step's finished run, reused when it matches, else a fresh child run. Returns (run, reused)."""
    params = {k: str(v) for k, v in params.items() if v not in (None, "")}
    inputs = inputs or {}
    if not force and (found := find_finished(experiment_id, entry_point, params, inputs)):
        report_step(
            entry_point,
            f"reused {found.info.run_id} (finished before with the same "
            "parameters, code and inputs)",
        )
        return found, True
    print(f"main: {entry_point}: running ...", file=sys.stderr, flush=True)
    client = mlflow.MlflowClient()
    try:
        submitted = mlflow.projects.run(
            str(PROJECT_ROOT),
            entry_point=entry_point,
            parameters=params,
            env_manager="local",
            experiment_id=experiment_id,
            synchronous=True,
        )
    except ExecutionException:
        raise StepFailedError(failure_message(client, experiment_id, entry_point)) from None
    client.set_tag(submitted.run_id, INPUTS_TAG, json.dumps(inputs, sort_keys=True))
    report_step(entry_point, f"ran {submitted.run_id}")
    return client.get_run(submitted.run_id), False


def report_step(entry_point: str, what: str) -> None:
    """What happened to a step, on the main run (tag `step.<name>`) and on the screen."""
    mlflow.set_tag(f"step.{entry_point}", what)
    print(f"main: {entry_point}: {what}", file=sys.stderr, flush=True)


def run_main(options: dict[str, Any]) -> dict[str, str]:
    """Run or reuse every step; returns the run id of each step."""
    force = coerce(options.pop("force_rerun", False), bool, "force_rerun")
    experiment_name = options.pop("experiment_name", None)
    options["data_dir"] = canonical_source(options.get("data_dir", "data"))
    config = resolve_train_config(options)
    steps: dict[str, str] = {}
    with stage_run(experiment_name, "main") as run:
        experiment_id = run.info.experiment_id
        preprocess_params = {k: v for k, v in options.items() if k in PREPROCESS_KEYS}
        preprocess, _ = get_or_run(experiment_id, "preprocess", preprocess_params, force=force)
        steps["preprocess"] = preprocess.info.run_id
        train, reused = get_or_run(experiment_id, "train", options, force=force)
        steps["train"] = train.info.run_id
        model_uri = train.data.tags["model_uri"]
        if has_test_set(config.data_dir):
            evaluate, _ = get_or_run(
                experiment_id,
                "evaluate",
                {
                    "model_uri": model_uri,
                    "data_dir": config.data_dir,
                    "skip_bad_images": config.skip_bad_images,
                },
                force=force,
            )
            steps["evaluate"] = evaluate.info.run_id
        else:
            report_step(
                "evaluate",
                f"skipped: {config.data_dir} has no test split. Add the official test_batch (or a "
                "test/<class>/ folder beside train/) there, or evaluate on other data: mlflow run . "
                f"-e evaluate --env-manager local -P model_uri={model_uri} -P data_dir=...",
            )
        promote, _ = get_or_run(
            experiment_id, "promote", {}, inputs={"train_run_id": train.info.run_id}, force=force
        )
        steps["promote"] = promote.info.run_id
        mlflow.set_tags({"train_reused": reused, "model_uri": model_uri})
        mlflow.log_text(json.dumps(steps, indent=2), "steps.json")
        decision = promote.data.tags.get("decision", "?")
        print_summary(
            "main",
            {
                "steps": ", ".join(f"{name} {run_id}" for name, run_id in steps.items()),
                "model": model_uri,
                "promote": f"{decision}: {promote.data.tags.get('decision_reason', '')}",
            },
            "cifar10 serve --model-uri models:/cifar10-resnet@champion --port 5001"
            if decision in ("promote", "force")
            else f"mlflow ui --backend-store-uri {mlflow.get_tracking_uri()}",
        )
    return steps
