"""What a person reads: each stage run as a real process with its output redirected to a file."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from pipeline.cli import CONFIGS, MAIN_OPTIONS, option_help, stage_options
from pipeline.errors import FORM_VARIABLE, in_users_form
from tests.conftest import write_cifar_dir, write_image_tree


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
    assert re.search(
        r"training cnn on \w+( in bfloat16)?: 256 images \(300 for validation\), 3 epochs", output
    )
    epochs = re.findall(
        r"^epoch (\d)/3  train_loss [\d.]+  val_accuracy [\d.]+  .*ETA", output, re.M
    )
    assert epochs == ["1", "2", "3"]
    run = mlflow.search_runs(experiment_names=[tracking]).iloc[0]
    assert f"train finished: run {run.run_id}" in output
    assert "model: models:/" in output  # MLflow 3 gives a logged model its own id
    assert "next: cifar10 evaluate --model-uri=models:/" in output  # the form the user typed
    assert "Warning" not in output and "warning" not in output.lower()
    # the run table tells runs apart, and the description carries the key number
    assert re.fullmatch(r"cnn · synthetic · lr [\d.e-]+ · 3 epochs", run["tags.mlflow.runName"])
    assert run["tags.mlflow.note.content"].startswith("best val_accuracy ")
    # one numbering of epochs: the console's, best_epoch's and the charts' steps
    best = int(re.search(r"best val_accuracy: [\d.]+ at epoch (\d) of 3", output).group(1))
    assert run["metrics.best_epoch"] == best
    steps = [m.step for m in mlflow.MlflowClient().get_metric_history(run.run_id, "val_accuracy")]
    assert sorted(steps) == [1, 2, 3]


def test_cpu_estimate_over_an_hour_warns_with_what_to_do(tracking, tmp_path):
    """The warning comes before the first epoch; the run is stopped with Ctrl-C once it is out."""
    log = tmp_path / "out.log"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_EXPERIMENT_ID"}
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli",
             *("train", "--model", "resnet18", "--data-dir", "synthetic", "--epochs", "20000"),
             *("--max-train-images", "64", "--batch-size", "32", "--experiment-name", tracking)],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    deadline = time.monotonic() + 120
    while "warning: that is over an hour" not in log.read_text() and process.poll() is None:
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 130
    output = log.read_text()
    assert "warning: that is over an hour on the CPU. Use a GPU, --model=cnn" in output
    assert "Traceback" not in output


@pytest.mark.slow
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
    # main's own lines and its steps' (run by `mlflow run`) name options as the user typed them
    assert "or evaluate on other data: cifar10 evaluate --model-uri=models:/" in output
    assert " -P " not in output
    assert "main finished: run" in output
    assert "  promotion: none: no candidate" in output and "promote: promote" not in output
    assert re.search(r"^  time: \d+m\d\ds$", output, re.M)
    # promote counts training runs only (evaluate runs name a model too)
    assert "found 1 finished training run(s) of ['cnn']" in output
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


def test_help_describes_every_option_with_its_default(tmp_path):
    output = " ".join(run_cli(tmp_path, "train", "--help").split())  # as wrapped for any width
    assert "--max-train-images VALUE" in output and "validation is never capped" in output
    assert "(cnn's recipe: 256; each model's in experiments/<model>.yaml)" in output
    for stage in [*CONFIGS, "main"]:
        names = MAIN_OPTIONS if stage == "main" else stage_options(stage)
        undescribed = {name for name in names if not option_help(name)}
        assert not undescribed, f"{stage}: options without a description"
    assert "(required)" in run_cli(tmp_path, "predict", "--help")


def test_a_misspelt_option_gets_the_nearest_name(tmp_path):
    output = run_cli(tmp_path, "train", "--modle", "cnn", "--epohcs", "3", check=False)
    assert output.strip() == (
        "error: train does not take --modle (did you mean --model?), --epohcs (did you mean "
        "--epochs?). `cifar10 train --help` lists its options (with mlflow run: -P name=value, "
        "the same names)."
    )


def test_hints_read_in_the_clis_form_only_where_the_cli_started(monkeypatch):
    hint = ("give -P lr=0.1, or fewer images (-P max_train_images): mlflow run . -e train "
            "--env-manager local -P config=x.yaml (with mlflow run: -P name=value)")  # fmt: skip
    monkeypatch.setenv(FORM_VARIABLE, "cli")
    assert in_users_form(hint) == (
        "give --lr=0.1, or fewer images (--max-train-images): cifar10 train --config=x.yaml "
        "(with mlflow run: -P name=value)"
    )
    monkeypatch.setenv(FORM_VARIABLE, "mlflow")
    assert in_users_form(hint) == hint


def test_a_hint_names_options_the_way_the_user_typed_them(tracking, tmp_path):
    """The same refusal from `cifar10 train --data-dir` and from `mlflow run -P data_dir=`."""
    missing = tmp_path / "nowhere"
    typed = run_cli(tmp_path, "train", "--data-dir", str(missing), check=False)
    assert "(or --download=true) downloads" in typed and "-P " not in typed
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_EXPERIMENT_ID"}
    project = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(root), "-e", "train", "--env-manager", "local",
         "--experiment-name", tracking, "-P", f"data_dir={missing}"],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert project.returncode != 0
    assert "(or -P download=true) downloads" in project.stderr, project.stderr[-2000:]


def test_what_happens_to_the_data_is_one_line_each(tracking, tmp_path):
    tree = write_image_tree(tmp_path / "pets", per_class=20)
    (tree / "train" / "dog" / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    train = ("train", "--data-dir", str(tree), "--epochs", "1", "--width", "8")
    options = ("--skip-bad-images", "true", "--experiment-name", tracking)
    first = run_cli(tmp_path, *train, *options)
    assert re.search(
        rf"^data: decoded 61 files of {tree / 'train'} in [\d.]+ s; cached", first, re.M
    )
    assert "data: skipped 1 unusable: dog/truncated.jpg (unreadable" in first
    assert "the run lists them in skipped_files.json" in first
    again = run_cli(tmp_path, *train, *options)
    assert f"data: read 60 decoded images of {tree / 'train'} from the cache" in again
    assert "data: decoded" not in again


def test_a_torch_and_torchvision_that_do_not_belong_together_are_named_with_the_fix():
    from pipeline.cli import torch_pair_problem

    assert torch_pair_problem("2.14.1", "0.29.1") is None
    assert torch_pair_problem("2.14.1+cpu", "0.29.1+cpu") is None
    assert torch_pair_problem("2.4.0+cu121", "0.19.0") is None
    cpu_beside_cuda = torch_pair_problem("2.13.0+cpu", "0.28.0")
    assert "torch 2.13.0+cpu and torchvision 0.28.0 do not belong together" in cpu_beside_cuda
    assert cpu_beside_cuda.endswith(
        "pip install --force-reinstall torch==2.13.0 torchvision==0.28.* "
        "--index-url https://download.pytorch.org/whl/cpu"
    )
    assert "torchvision==0.28.*" in torch_pair_problem("2.13.0", "0.29.1")


def test_help_opens_with_what_the_tool_does_without_importing_torch(tmp_path):
    overview = run_cli(tmp_path, "--help")
    assert overview.startswith("usage: cifar10") and "served model, every" in overview
    assert all(stage in overview for stage in [*CONFIGS, "main"])
    assert "The only place that reads arguments" not in overview
    probe = subprocess.run(
        [sys.executable, "-c", "import sys; from pipeline.cli import main\n"
         "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
         "print('torch' in sys.modules)"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert probe.stdout.strip().endswith("False")
