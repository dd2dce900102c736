"""Small MLflow helpers shared by the stages: opening a stage run, tags, files as artifacts."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from matplotlib.figure import Figure

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def git_commit() -> str:
    """The project's commit, or 'unknown' outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


@contextmanager
def stage_run(
    experiment_name: str | None,
    run_name: str,
    run_id: str | None = None,
    nested: bool = False,
    log_system_metrics: bool = False,
) -> Iterator[mlflow.ActiveRun]:
    """Open (or attach to) the stage's run; a failure is tagged with its message and marks it FAILED.

    Under `mlflow run` the run already exists (MLFLOW_RUN_ID) in the experiment chosen with
    `--experiment-name`, so the experiment is only set when this process creates the run.
    """
    if experiment_name and not run_id and not nested and not os.environ.get("MLFLOW_RUN_ID"):
        mlflow.set_experiment(experiment_name)
    with mlflow.start_run(
        run_id=run_id, run_name=run_name, nested=nested, log_system_metrics=log_system_metrics
    ) as run:
        mlflow.set_tag("git_commit", git_commit())
        try:
            yield run
        except BaseException as error:
            mlflow.set_tag("error", f"{type(error).__name__}: {error}"[:4000])
            raise


def log_resolved_params(params: dict[str, Any]) -> None:
    """Log the resolved config as params, next to what `mlflow run` may already have logged.

    `mlflow run` logs each entry-point parameter as typed ("" for one left unset, "1e-3" for
    0.001) before this process starts, and a param cannot change. Where that value differs from the
    resolved one, the resolved value goes to `resolved.<name>`; everywhere else it is `<name>`.
    """
    run = mlflow.active_run()
    logged = mlflow.get_run(run.info.run_id).data.params
    values = {}
    for key, value in params.items():
        if key not in logged:
            values[key] = value
        elif logged[key] != str(value):
            values[f"resolved.{key}"] = value
    mlflow.log_params(values)


def log_json(values: Any, artifact_file: str) -> None:
    mlflow.log_text(json.dumps(values, indent=2), artifact_file)


def log_figure(figure: Figure, artifact_file: str) -> None:
    import matplotlib.pyplot as plt

    mlflow.log_figure(figure, artifact_file)
    plt.close(figure)


def log_dataset(images: Any, labels: Any, source: str, context: str) -> None:
    """Record the training split as an MLflow dataset input (digest, source, schema)."""
    source_uri = None if source == "synthetic" else str(Path(source).resolve())
    dataset = mlflow.data.from_numpy(
        images, targets=labels, source=source_uri, name="cifar10-train"
    )
    mlflow.log_input(dataset, context=context)


@contextmanager
def scratch_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp)
