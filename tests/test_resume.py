"""What `resume_run_id` may continue, with real processes: a run that died resumes (from its
first second on), a finished or live run is refused and left as it was, Ctrl-C is one line."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from pipeline.config import ConfigError
from pipeline.tracking.runs import stage_run
from pipeline.train import run_train
from tests.test_train import (
    MLFLOW_RUN,
    mlflow_run_env,
    tiny_config,
    train_command,
)

ROOT = Path(__file__).resolve().parents[1]
QUICK = {"model": "cnn", "data_dir": "synthetic", "width": 8, "max_train_images": 128, "seed": 0}


def record_of(run_id: str) -> dict:
    """Everything a person or a comparison sees of a run."""
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    histories = {
        key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
        for key in run.data.metrics
    }
    artifacts, folders = [], [""]
    while folders:
        for item in client.list_artifacts(run_id, folders.pop() or None):
            (folders if item.is_dir else artifacts).append(item.path)
    models = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'"
    )
    return {
        "status": run.info.status,
        "end_time": run.info.end_time,
        "params": run.data.params,
        "metrics": histories,
        "tags": run.data.tags,
        "artifacts": sorted(artifacts),
        "logged_models": len(models),
    }


def cli(*arguments: str, **popen) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *arguments],
        capture_output=True,
        text=True,
        timeout=300,
        **popen,
    )


def test_a_finished_run_is_refused_in_one_line_and_its_record_is_unchanged(tracking):
    finished = run_train(tiny_config(tracking, epochs=2, **QUICK))
    before = record_of(finished.run_id)
    refused = cli("train", f"--resume-run-id={finished.run_id}")
    assert refused.returncode == 2, refused.stderr[-2000:]
    lines = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in refused.stderr
    assert f"Cannot resume run {finished.run_id}: it finished (best val_accuracy" in lines[0]
    assert finished.model_uri in lines[0] and "start a new run" in lines[0]
    assert record_of(finished.run_id) == before

    # Through `mlflow run`: the same refusal, and the run `mlflow run` made for it is gone.
    experiment_id = mlflow.get_experiment_by_name(tracking).experiment_id
    listed = mlflow.search_runs([experiment_id])
    through_mlflow = subprocess.run(
        [*MLFLOW_RUN, "-e", "train", "--experiment-name", tracking,
         "-P", f"resume_run_id={finished.run_id}"],
        capture_output=True, text=True, timeout=300, env=mlflow_run_env(),
    )  # fmt: skip
    assert through_mlflow.returncode != 0
    assert f"Cannot resume run {finished.run_id}: it finished" in through_mlflow.stderr
    assert len(mlflow.search_runs([experiment_id])) == len(listed)
    assert record_of(finished.run_id) == before


@pytest.mark.slow
def test_a_live_run_is_not_joined_and_finishes_normally(tracking):
    live = subprocess.Popen(
        train_command(tracking, **QUICK | {"epochs": 150, "stop_if_not_learning": False}),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    run_id = None
    while run_id is None and time.monotonic() < deadline and live.poll() is None:
        runs = mlflow.search_runs(experiment_names=[tracking])
        if len(runs) and "tags.process.pid" in runs and runs["tags.process.pid"].notna().any():
            run_id = runs["run_id"][0]
        time.sleep(0.2)
    assert run_id, "the train process never opened its run"
    refused = cli("train", f"--resume-run-id={run_id}")
    assert refused.returncode == 2
    assert (
        f"Cannot resume run {run_id}: it is still running in process {live.pid} on"
        in refused.stderr
    ), refused.stderr[-2000:]
    assert live.wait(timeout=600) == 0, live.stderr.read()[-3000:]
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED" and "resumed_from_epoch" not in run.data.tags


def test_each_id_that_is_not_a_train_run_gets_its_line(tracking):
    with pytest.raises(ConfigError, match="Cannot resume 0123abc: no run with that id in sqlite"):
        run_train(tiny_config(tracking, resume_run_id="0123abc"))
    kinds = {
        "tune": "is a tune run; resume_run_id continues a train run only. To redo it, run tune "
        "again with -P study_name=",
        "evaluate": "is an evaluate run; resume_run_id continues a train run only. To redo it, "
        "run evaluate again with the same model_uri",
        "predict": "is a predict run",
        "promote": "is a promote run",
        "main": "run main again: it reuses every finished step",
    }
    for stage, said in kinds.items():
        with stage_run(stage, tracking, f"a {stage} run") as run:
            pass
        mlflow.MlflowClient().set_terminated(run.info.run_id, "FAILED")
        with pytest.raises(ConfigError, match=f"Cannot resume run {run.info.run_id} "):
            try:
                run_train(tiny_config(tracking, resume_run_id=run.info.run_id))
            except ConfigError as error:
                assert said in str(error), str(error)
                raise
    with stage_run("tune", tracking, "tune · study") as parent:
        pass
    with stage_run("tune trial", tracking, "trial 3", parent_run_id=parent.info.run_id) as t:
        mlflow.set_tags({"optuna_trial": 3, "optuna_study": "cnn-tune"})
    with pytest.raises(ConfigError, match="is trial 3 of tune study cnn-tune: a trial is not"):
        run_train(tiny_config(tracking, resume_run_id=t.info.run_id))


def test_ctrl_c_during_an_epoch_is_one_line_with_the_resume_command(tracking, tmp_path):
    log = tmp_path / "train.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            train_command(tracking, **QUICK | {"epochs": 30, "checkpoint_seconds": 0}),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 180
    while "epoch 2/30" not in log.read_text() and time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()[-3000:]
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 130
    printed = log.read_text()
    assert "Traceback" not in printed and "KeyboardInterrupt" not in printed, printed[-3000:]
    said = [line for line in printed.splitlines() if line.startswith("interrupted:")]
    assert len(said) == 1, printed[-3000:]
    run_id = mlflow.search_runs(experiment_names=[tracking])["run_id"][0]
    assert f"train run {run_id} stopped by Ctrl-C in epoch" in said[0]
    assert "kept: the checkpoint after epoch" in said[0]
    assert f"cifar10 train --resume-run-id {run_id}" in said[0]
    run = mlflow.get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags["interrupted"] == "by the user (Ctrl-C)"

    resumed = subprocess.run(
        train_command(tracking, resume_run_id=run_id), capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming run {run_id} (cnn · synthetic · lr" in resumed.stderr
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED" and "interrupted" not in run.data.tags
    assert run.data.tags["mlflow.runName"].startswith("cnn · synthetic · lr ")
