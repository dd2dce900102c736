"""The `main` entry point: preprocess -> train -> evaluate -> promote, each as a child MLflow run.

As in MLflow's multistep example, each step runs through `mlflow.projects.run`. A step is reused
only when a finished run of it consumed exactly what it would consume now: the same content of every
data split, the same resolved config and the same code (commit and uncommitted changes), as
pipeline/tracking/lineage.py records them; otherwise its line says which of these changed. Rerunning `main`
after a failure resumes at the failed step. `force_rerun=true` runs everything again.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlflow
from mlflow.entities import Run
from mlflow.exceptions import ExecutionException, MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PROJECT_ENTRY_POINT

from pipeline.config import (
    EvaluateConfig,
    PreprocessConfig,
    PromoteConfig,
    TrainConfig,
    build_config,
    coerce,
    config_to_params,
    resolve_train_config,
)
from pipeline.data.image_set import ImageSet
from pipeline.data.sources import (
    canonical_source,
    has_test_set,
    load_test_set,
    load_training_set,
    make_splits,
)
from pipeline.errors import PipelineError, in_users_form
from pipeline.tracking.lineage import (
    CODE_TAG,
    PROJECT_ROOT,
    changed_parts,
    code_identity,
    identity,
    identity_config,
    logged_identity,
)
from pipeline.tracking.runs import print_summary, source_name, stage_run
from pipeline.training.progress import format_duration

INPUTS_TAG = "main.inputs"
PREPROCESS_KEYS = ("data_dir", "val_fraction", "seed", "download", "skip_bad_images")


@dataclass
class Step:
    """One step as `main` will run it: its parameters, and the identity (pipeline/tracking/lineage.py) a
    finished run must have recorded to be reused; None when that cannot be known here."""

    entry_point: str
    params: dict[str, Any]
    expected: dict[str, str] | None
    config: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)


def splits_or_none(read: Callable[[], dict[str, ImageSet]]) -> dict[str, str] | None:
    """Digests of the splits a step will read, or None when they cannot be read here (missing
    data, bad files): the step then runs and says why itself."""
    try:
        return {split: data.digest for split, data in read().items()}
    except PipelineError:
        return None


def with_identity(entry_point: str, params: dict[str, Any], config: Any, data) -> Step:
    resolved = config_to_params(config)
    expected = None if data is None else identity(data, resolved)
    return Step(entry_point, params, expected, resolved)


def describe_change(run: Run, step: Step) -> str:
    """What differs between the newest finished run of a step and what it would consume now."""
    parts = changed_parts(step.expected or {}, run.data.tags)
    details = []
    for part in parts:
        if part == "config":
            logged = consumed_config(run)
            changed = [
                f"{k}: {logged[k]} -> {v}"
                for k, v in identity_config(step.config).items()
                if logged.get(k) != v
            ]
            part += f" ({'; '.join(changed[:3])})" if changed else ""
        elif part == "code":
            before = run.data.tags.get(CODE_TAG, "not recorded")
            part += f" ({short_code(before)} -> {short_code(code_identity())})"
        details.append(part)
    if run.data.tags.get(INPUTS_TAG, "{}") != json.dumps(step.inputs, sort_keys=True):
        details.append(f"inputs ({json.dumps(step.inputs, sort_keys=True)})")
    return f"{', '.join(details)} changed since run {run.info.run_id}"


def consumed_config(run: Run) -> dict[str, str]:
    """The config a run recorded in its `lineage.json` (before any scaling to its data)."""
    try:
        return json.loads(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/lineage.json"))[
            "config"
        ]
    except (MlflowException, KeyError, ValueError):
        return {}


def short_code(code: str) -> str:
    commit, _, dirty = code.partition("+")
    return commit[:9] + (f" with uncommitted changes {dirty[:8]}" if dirty else "")


def find_finished(experiment_id: str, step: Step) -> tuple[Run | None, str]:
    """A finished run of the step that consumed exactly what it would now (data, config, code and
    main's inputs), or None and why not."""
    if step.expected is None:
        return None, "its data cannot be read here; the step will say why"
    runs = mlflow.MlflowClient().search_runs(
        [experiment_id],
        filter_string=(
            f"attributes.status = 'FINISHED' and "
            f"tags.`{MLFLOW_PROJECT_ENTRY_POINT}` = '{step.entry_point}'"
        ),
        order_by=["attributes.start_time DESC"],
    )
    inputs = json.dumps(step.inputs, sort_keys=True)
    for run in runs:
        if (
            logged_identity(run.data.tags) == step.expected
            and run.data.tags.get(INPUTS_TAG, "{}") == inputs
        ):
            return run, ""
    if not runs:
        return None, "no finished run of this step yet"
    return None, describe_change(runs[0], step)


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


def get_or_run(experiment_id: str, step: Step, force: bool = False) -> tuple[Run, bool]:
    """The step's finished run, reused when it consumed the same data, config and code, else a
    fresh child run. Returns (run, reused)."""
    params = {k: str(v) for k, v in step.params.items() if v not in (None, "")}
    found, why_not = find_finished(experiment_id, step) if not force else (None, "force_rerun")
    if found is not None:
        report_step(
            step.entry_point,
            f"reused {found.info.run_id} (finished before with the same data, config and code)",
        )
        return found, True
    print(
        in_users_form(f"main: {step.entry_point}: running: {why_not}"), file=sys.stderr, flush=True
    )
    client = mlflow.MlflowClient()
    try:
        submitted = mlflow.projects.run(
            str(PROJECT_ROOT),
            entry_point=step.entry_point,
            parameters=params,
            env_manager="local",
            experiment_id=experiment_id,
            synchronous=True,
        )
    except ExecutionException:
        raise StepFailedError(failure_message(client, experiment_id, step.entry_point)) from None
    client.set_tag(submitted.run_id, INPUTS_TAG, json.dumps(step.inputs, sort_keys=True))
    report_step(step.entry_point, f"ran {submitted.run_id} ({why_not})")
    return client.get_run(submitted.run_id), False


def report_step(entry_point: str, what: str) -> None:
    """What happened to a step, on the main run (tag `step.<name>`) and on the screen."""
    mlflow.set_tag(f"step.{entry_point}", what)
    print(in_users_form(f"main: {entry_point}: {what}"), file=sys.stderr, flush=True)


class StepData:
    """What main's steps read, each read once (a failed read is not kept: the preprocess step may
    download the data)."""

    def __init__(self, config: TrainConfig) -> None:
        self.config, self.source = config, config.data_dir

    @functools.cached_property
    def training_set(self) -> ImageSet:
        return load_training_set(self.source, False, self.config.skip_bad_images)

    @functools.cached_property
    def test_split(self) -> ImageSet:
        return load_test_set(self.source, False, self.config.skip_bad_images)

    def preprocess_splits(self) -> dict[str, ImageSet]:
        carved = make_splits(self.training_set, self.config.val_fraction, self.config.seed)
        test = {"test": self.test_split} if has_test_set(self.source) else {}
        return {"train": carved.train, "val": carved.val} | test

    def train_splits(self) -> dict[str, ImageSet]:
        config = self.config
        carved = make_splits(
            self.training_set, config.val_fraction, config.seed, config.max_train_images
        )
        return {"train": carved.train, "val": carved.val}


def run_main(options: dict[str, Any]) -> dict[str, str]:
    """Run or reuse every step; returns the run id of each step."""
    force = coerce(options.pop("force_rerun", False), bool, "force_rerun")
    experiment_name = options.pop("experiment_name", None)
    options["data_dir"] = canonical_source(options.get("data_dir", "data"))
    config = resolve_train_config(options)
    started = time.perf_counter()
    with stage_run(
        "main", experiment_name, f"main · {config.model} · {source_name(config.data_dir)}"
    ) as run:
        steps, train, reused, promote = run_steps(
            run.info.experiment_id, options, config, StepData(config), force
        )
        model_uri = train.data.tags["model_uri"]
        mlflow.set_tags({"train_reused": reused, "model_uri": model_uri})
        mlflow.log_text(json.dumps(steps, indent=2), "steps.json")
        decision = promote.data.tags.get("decision", "?")
        print_summary(
            "main",
            {
                "steps": ", ".join(f"{name} {run_id}" for name, run_id in steps.items()),
                "model": model_uri,
                "promotion": f"{decision}: {promote.data.tags.get('decision_reason', '')}",
                "time": format_duration(time.perf_counter() - started),
            },
            "cifar10 serve --model-uri models:/cifar10-resnet@champion --port 5001"
            if decision in ("promote", "force")
            else f"mlflow ui --backend-store-uri {mlflow.get_tracking_uri()}",
        )
    return steps


def run_steps(
    experiment_id: str,
    options: dict[str, Any],
    config: TrainConfig,
    data: StepData,
    force: bool,
) -> tuple[dict[str, str], Run, bool, Run]:
    """preprocess, train, evaluate (where the data has a test split) and promote, each run or
    reused; the run ids, the train run, whether it was reused, and the promote run."""
    steps: dict[str, str] = {}
    preprocess_params = {k: v for k, v in options.items() if k in PREPROCESS_KEYS}
    preprocess_config = build_config(PreprocessConfig, preprocess_params)
    preprocess_step = with_identity(
        "preprocess", preprocess_params, preprocess_config, splits_or_none(data.preprocess_splits)
    )
    steps["preprocess"] = get_or_run(experiment_id, preprocess_step, force)[0].info.run_id
    train_step = with_identity("train", options, config, splits_or_none(data.train_splits))
    train, reused = get_or_run(experiment_id, train_step, force)
    steps["train"] = train.info.run_id
    model_uri = train.data.tags["model_uri"]
    if has_test_set(data.source):
        evaluate_params = {"model_uri": model_uri, "data_dir": data.source,
                           "skip_bad_images": config.skip_bad_images}  # fmt: skip
        evaluate_step = with_identity(
            "evaluate",
            evaluate_params,
            build_config(EvaluateConfig, evaluate_params),
            splits_or_none(lambda: {"test": data.test_split}),
        )
        steps["evaluate"] = get_or_run(experiment_id, evaluate_step, force)[0].info.run_id
    else:
        report_step(
            "evaluate",
            f"skipped: {data.source} has no test split. Add the official test_batch (or a "
            "test/<class>/ folder beside train/) there, or evaluate on other data: mlflow run . "
            f"-e evaluate --env-manager local -P model_uri={model_uri} -P data_dir=...",
        )
    promote_step = with_identity("promote", {}, PromoteConfig(), {})
    promote_step.inputs = {"train_run_id": train.info.run_id}
    promote, _ = get_or_run(experiment_id, promote_step, force)
    steps["promote"] = promote.info.run_id
    return steps, train, reused, promote
