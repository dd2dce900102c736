"""Small MLflow helpers shared by the stages: opening a stage run, tags, files as artifacts."""

from __future__ import annotations

import json
import os
import signal
import socket
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import psutil
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException

from pipeline.config import ConfigError
from pipeline.data.image_set import ImageSet
from pipeline.data.sources import SYNTHETIC, Splits, load_training_set, make_splits
from pipeline.errors import Interrupted, in_users_form
from pipeline.tracking.lineage import (
    CODE_TAG,
    DATA_TAG,
    DIRTY_TAG,
    code_identity,
    code_state,
    identity,
    identity_config,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DEFAULT_EXPERIMENT = "cifar10"
STAGE_TAG = "stage"  # the entry point that made a run (train, tune, tune trial, evaluate, ...)


def process_tags() -> dict[str, str]:
    """Which process owns a run, so that a later command can tell the process is gone."""
    me = psutil.Process()
    return {
        "process.host": socket.gethostname(),
        "process.pid": str(me.pid),
        "process.started": f"{me.create_time():.2f}",
    }


def owner_is_gone(tags: dict[str, str]) -> bool:
    """True when the run's process ran on this machine and no longer exists (its pid may have been
    reused since: the start time tells). Runs of other machines are never judged from here."""
    if tags.get("process.host") != socket.gethostname():
        return False
    try:
        owner = psutil.Process(int(tags["process.pid"]))
        return abs(owner.create_time() - float(tags["process.started"])) > 1
    except psutil.NoSuchProcess:
        return True
    except (KeyError, ValueError, psutil.Error):
        return False


def end_orphaned_runs(experiment_id: str, current_run_id: str) -> list[str]:
    """Mark KILLED the runs of this experiment still RUNNING whose process on this machine died
    (SIGKILL, power loss, an OOM kill): MLflow only ends a run its own process ends. A train run
    marked so can still be resumed with `resume_run_id`."""
    client = mlflow.MlflowClient()
    running = client.search_runs(
        [experiment_id],
        filter_string=f"attributes.status = 'RUNNING' and tags.`process.host` = '{socket.gethostname()}'",
    )
    ended = []
    for run in running:
        if run.info.run_id != current_run_id and owner_is_gone(run.data.tags):
            client.set_tag(
                run.info.run_id,
                "killed_reason",
                f"process {run.data.tags['process.pid']} ended without closing the run; found by "
                f"pid {os.getpid()} at {time.strftime('%Y-%m-%d %H:%M:%S')}",
            )
            client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.KILLED))
            ended.append(run.info.run_id)
    return ended


@contextmanager
def stage_run(
    stage: str,
    experiment_name: str | None,
    run_name: str | None,
    run_id: str | None = None,
    parent_run_id: str | None = None,
    log_system_metrics: bool = False,
) -> Iterator[mlflow.ActiveRun]:
    """Open (or attach to) the stage's run; a failure is tagged with its message and marks it FAILED.

    A new run is tagged with its `stage` (what `resume_run_id` checks); `run_id` reopens a run
    as it was (its name, stage and code stay on record); `parent_run_id` opens a nested run.

    Under `mlflow run` the run already exists (MLFLOW_RUN_ID) in the experiment chosen with
    `--experiment-name`, so the experiment is only set when this process creates the run: the one
    named, else MLflow's environment variables, else the project's own (`cifar10`), never "Default".
    """
    nested = parent_run_id is not None
    creates_run = not run_id and not nested and not os.environ.get("MLFLOW_RUN_ID")
    chosen_by_env = os.environ.get("MLFLOW_EXPERIMENT_NAME") or os.environ.get(
        "MLFLOW_EXPERIMENT_ID"
    )
    if creates_run and (experiment_name or not chosen_by_env):
        mlflow.set_experiment(experiment_name or DEFAULT_EXPERIMENT)
    with mlflow.start_run(
        run_id=run_id,
        run_name=None if run_id else run_name,
        nested=nested,
        parent_run_id=parent_run_id,
        log_system_metrics=log_system_metrics,
    ) as run:
        end_orphaned_runs(run.info.experiment_id, run.info.run_id)
        mlflow.set_tags(process_tags())
        if not run_id:  # a resumed run keeps its name and the code it was started with on record
            mlflow.set_tag(STAGE_TAG, stage)
            if run_name:  # `mlflow run` names its runs at random
                mlflow.set_tag("mlflow.runName", run_name)
            commit, dirty = code_state()
            mlflow.set_tags(
                {"git_commit": commit, CODE_TAG: code_identity(), DIRTY_TAG: str(bool(dirty))}
            )
        try:
            yield run
        except KeyboardInterrupt as interrupt:
            stop_at_the_next_ctrl_c()
            mlflow.set_tag("interrupted", "by the user (Ctrl-C)")
            mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
            if isinstance(interrupt, Interrupted):
                raise
            again = "its finished steps are reused" if stage == "main" else "it starts afresh"
            raise Interrupted(
                f"{stage} run {run.info.run_id} stopped by Ctrl-C and ended KILLED; run the same "
                f"command again ({again})."
            ) from None
        except BaseException as error:
            mlflow.set_tag("error", f"{type(error).__name__}: {error}"[:4000])
            raise


def stop_at_the_next_ctrl_c() -> None:
    """After the first Ctrl-C the run is closed in order; a second one ends the process at once."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_DFL)


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


def run_param(run: mlflow.entities.Run, key: str) -> str | None:
    """The value a run really used: `resolved.<key>` where `mlflow run` logged something else."""
    params = run.data.params
    return params.get(f"resolved.{key}", params.get(key))


def load_logged_model(model_uri: str) -> mlflow.pyfunc.PyFuncModel:
    """A logged model by URI, or one line that names the URI and how to see what exists."""
    try:
        return mlflow.pyfunc.load_model(model_uri)
    except (MlflowException, OSError) as error:
        reason = str(getattr(error, "message", error)).strip().splitlines()[0][:200]
        raise ConfigError(
            f"no model at {model_uri} ({reason}). URIs look like runs:/<run_id>/model, "
            "models:/m-<model_id> or models:/cifar10-resnet@champion; list what exists with "
            f"`mlflow ui --backend-store-uri {mlflow.get_tracking_uri()}` (a run's Artifacts tab, "
            "or Models), or `mlflow runs list --experiment-id <id>`."
        ) from None


def rebuild_splits(run: mlflow.entities.Run, data_dir: str | None = None) -> Splits:
    """The train and validation splits of a training run, rebuilt with its logged split settings
    from `data_dir` (default: the data source it logged). Whether they hold what it learned from
    is for `split_changed` to say."""
    source = data_dir or run.data.tags.get("data_source")
    data = load_training_set(source, download=False, skip_bad_images=True)
    return make_splits(
        data,
        float(run_param(run, "val_fraction")),
        int(float(run_param(run, "seed"))),
        int(float(run_param(run, "max_train_images") or 0)),
    )


def split_changed(run: mlflow.entities.Run, split: str, rebuilt: ImageSet) -> str | None:
    """None when `rebuilt` has the content digest the run logged for `split`; else what differs."""
    logged = run.data.tags.get(f"{DATA_TAG}{split}")
    if logged == rebuilt.digest:
        return None
    if logged is None:
        return (
            f"run {run.info.run_id} logged no digest of its {split} split (it was trained before "
            "this project recorded lineage), so its data cannot be checked"
        )
    return (
        f"the {split} split rebuilt from {rebuilt.source} has digest {rebuilt.digest}, but run "
        f"{run.info.run_id} logged {logged}: these are not the images it was trained on"
    )


def print_summary(
    stage: str, facts: dict[str, Any], next_command: str, verdict: str = "finished"
) -> None:
    """What a stage tells a person at its end: the run, its key numbers (all tracked), where its
    artifacts are, and the command that usually comes next."""
    run = mlflow.active_run() or mlflow.last_active_run()
    lines = [f"{stage} {verdict}: run {run.info.run_id} (experiment {run.info.experiment_id})"]
    lines += [f"  {name}: {value}" for name, value in facts.items()]
    lines += [f"  artifacts: {run.info.artifact_uri}", f"  next: {next_command}"]
    print(in_users_form("\n".join(lines)), flush=True)


def source_name(source: str) -> str:
    """How a data source reads in a run name: its last path component."""
    return Path(source).name or source


def describe_run(text: str) -> None:
    """The run's description: the first line of its page in the UI."""
    mlflow.set_tag("mlflow.note.content", text)


def log_json(values: Any, artifact_file: str) -> None:
    mlflow.log_text(json.dumps(values, indent=2), artifact_file)


def log_figure(figure: Figure, artifact_file: str) -> None:
    import matplotlib.pyplot as plt

    mlflow.log_figure(figure, artifact_file)
    plt.close(figure)


def log_dataset(data: ImageSet, context: str) -> mlflow.data.dataset.Dataset:
    """Record a split as an MLflow dataset input: named after its source, with its content digest;
    the dataset, for metrics computed on it."""
    source_uri = None if data.source == SYNTHETIC else data.source
    with warnings.catch_warnings():
        # MLflow registers its local artifact source under two schemes ("" and "file"), so every
        # local path "can be interpreted in multiple ways" by two identical classes: harmless.
        warnings.filterwarnings("ignore", "The specified dataset source", UserWarning)
        dataset = mlflow.data.from_numpy(
            data.images, targets=data.labels, source=source_uri, name=data.name, digest=data.digest
        )
    mlflow.log_input(dataset, context=context)
    return dataset


def log_lineage(data: dict[str, ImageSet], params: dict[str, Any]) -> None:
    """Record what this stage consumed (pipeline/tracking/lineage.py): tags to match on, `lineage.json` to
    read."""
    commit, dirty = code_state()
    mlflow.set_tags(identity({split: s.digest for split, s in data.items()}, params))
    log_json(
        {
            "data": {
                split: {"digest": s.digest, "images": len(s), "source": s.source}
                for split, s in data.items()
            },
            "config": identity_config(params),
            "code": {"commit": commit, "uncommitted_changes_digest": dirty},
        },
        "lineage.json",
    )


@contextmanager
def scratch_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp)
