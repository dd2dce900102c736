"""What a person reads: each stage run as a real process with its output redirected to a file."""

import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from tests.conftest import write_cifar_dir


def run_cli(tmp_path: Path, *args: str, check: bool = True) -> str:
    """The stage's whole output (stdout and stderr, as a log file would hold it). The environment
    is a user's: without the MLFLOW_EXPERIMENT_ID that `mlflow.set_experiment` puts in ours."""
    log = tmp_path / "out.log"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_EXPERIMENT_ID"}
    with log.open("w") as out:
        code = subprocess.call(
            [sys.executable, "-m", "pipeline.cli", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    text = log.read_text()
    assert code == 0 or not check, text
    return text


def test_redirected_train_prints_a_plan_one_line_per_epoch_and_a_summary(tracking, tmp_path):
    output = run_cli(
        tmp_path,
        *("train", "--model", "cnn", "--data-dir", "synthetic", "--epochs", "3", "--width", "8"),
        *("--max-train-images", "256", "--experiment-name", tracking),
    )
    assert re.search(r"training cnn on \w+: 256 images \(300 for validation\), 3 epochs", output)
    epochs = re.findall(
        r"^epoch (\d)/3  train_loss [\d.]+  val_accuracy [\d.]+  .*ETA", output, re.M
    )
    assert epochs == ["1", "2", "3"]
    run = mlflow.search_runs(experiment_names=[tracking]).iloc[0]
    assert f"train finished: run {run.run_id}" in output
    assert "model: models:/" in output  # MLflow 3 gives a logged model its own id
    assert "next: mlflow run . -e evaluate --env-manager local -P model_uri=models:/" in output
    assert "Warning" not in output and "warning" not in output.lower()


def test_cpu_estimate_over_an_hour_warns_with_what_to_do(tracking, tmp_path):
    output = run_cli(
        tmp_path,
        *("train", "--model", "resnet18", "--data-dir", "synthetic", "--epochs", "20000"),
        *("--max-train-images", "64", "--batch-size", "32", "--experiment-name", tracking),
        *("--patience", "1", "--lr", "1e-12", "--schedule", "constant"),
    )
    assert "warning: that is over an hour on the CPU. Use a GPU, -P model=cnn" in output


def test_main_names_the_skipped_evaluate_and_how_to_add_a_test_split(tracking, tmp_path):
    data = write_cifar_dir(tmp_path / "cifar", per_batch=100, batches=2, test_images=0)
    output = run_cli(
        tmp_path,
        *("main", "--data-dir", str(data), "--model", "cnn", "--epochs", "1", "--width", "8"),
        *("--experiment-name", tracking),
    )
    assert "main: preprocess: ran" in output and "main: train: ran" in output
    assert "main: evaluate: skipped: " in output and "has no test split" in output
    assert "Add the official test_batch" in output
    assert "main finished: run" in output
    again = run_cli(
        tmp_path,
        *("main", "--data-dir", str(data), "--model", "cnn", "--epochs", "1", "--width", "8"),
        *("--experiment-name", tracking),
    )
    assert "main: train: reused" in again and "same data, config and code" in again


def test_a_failure_is_printed_once_with_its_fix_and_tags_the_run(tracking, tmp_path):
    output = run_cli(
        tmp_path,
        *("evaluate", "--model-uri", "runs:/0123456789abcdef/model"),
        *("--data-dir", str(tmp_path / "nowhere"), "--download", "false"),
        *("--experiment-name", tracking),
        check=False,
    )
    # the model is checked first: a wrong URI is one line, not MLflow's 35-line traceback
    problem = "no model at runs:/0123456789abcdef/model (Run with id=0123456789abcdef not found)"
    assert output.count(problem) == 1 and "Traceback" not in output
    assert "mlflow ui --backend-store-uri" in output
    run = mlflow.search_runs(experiment_names=[tracking]).iloc[0]
    assert run["status"] == "FAILED" and problem in run["tags.error"]


@pytest.mark.parametrize("stage", ["preprocess", "train"])
def test_runs_go_to_the_project_experiment_unless_one_is_chosen(tracking, tmp_path, stage):
    run_cli(
        tmp_path,
        *(stage, "--data-dir", "synthetic"),
        *(
            ("--epochs", "1", "--width", "8", "--max-train-images", "64")
            if stage == "train"
            else ()
        ),
    )
    experiment = mlflow.get_experiment_by_name("cifar10")
    assert experiment is not None
    assert len(mlflow.search_runs([experiment.experiment_id])) >= 1
