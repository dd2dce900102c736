import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from torchvision import models as tv_models

from pipeline.workflow import StepFailedError, run_main
from tests.conftest import write_image_tree

ROOT = Path(__file__).resolve().parents[1]

# A ResNet that beats chance in seconds (0.94 on synthetic), so the promote step earns a champion.
TINY_MAIN = {
    "data_dir": "synthetic",
    "model": "resnet18_pretrained",
    "pretrained": "false",
    "epochs": "2",
    "max_train_images": "512",
    "batch_size": "64",
}


def failed_step_error(experiment: str, entry_point: str) -> str:
    failed = mlflow.search_runs(
        experiment_names=[experiment],
        filter_string=f"status = 'FAILED' and tags.`mlflow.project.entryPoint` = '{entry_point}'",
    )
    return failed["tags.error"].iloc[0]


@pytest.mark.accuracy
@pytest.mark.slow
def test_main_runs_every_step_once_then_reuses_them(tracking):
    first = run_main({**TINY_MAIN, "experiment_name": tracking})
    assert set(first) == {"preprocess", "train", "evaluate", "promote"}
    runs = mlflow.search_runs(experiment_names=[tracking])
    main_run = runs[runs["tags.mlflow.runName"].str.startswith("main · ")].iloc[0]
    children = runs[runs["tags.mlflow.parentRunId"] == main_run["run_id"]]
    assert set(children["run_id"]) == set(first.values())
    assert (children["status"] == "FINISHED").all()
    train = mlflow.get_run(first["train"])
    evaluate = mlflow.get_run(first["evaluate"])
    assert evaluate.data.params["model_uri"] == train.data.tags["model_uri"]
    assert "test_accuracy" in evaluate.data.metrics
    promote = mlflow.get_run(first["promote"])
    assert promote.data.tags["decision"] == "promote"
    # promote ran through `mlflow run`, whose default architectures once lost resnet18_pretrained
    champion = mlflow.MlflowClient().get_model_version_by_alias("cifar10-resnet", "champion")
    assert champion.tags["architecture"] == "resnet18_pretrained"
    # the version carries the lineage, and is linked to the run's logged model
    assert champion.tags["dataset_val_digest"] == train.data.tags["lineage.data.val"]
    assert champion.tags["code"] == train.data.tags["lineage.code"]
    assert "model: resnet18_pretrained" in champion.tags["config"]
    assert champion.source == train.data.tags["model_uri"]  # models:/m-<logged model id>
    logged_model = mlflow.get_logged_model(train.data.tags["model_uri"].removeprefix("models:/"))
    linked = json.loads(logged_model.tags["mlflow.modelVersions"])
    assert {"name": "cifar10-resnet", "version": champion.version} in linked

    second = run_main({**TINY_MAIN, "experiment_name": tracking})
    assert second == first
    train_runs = mlflow.search_runs(
        experiment_names=[tracking], filter_string="tags.`mlflow.project.entryPoint` = 'train'"
    )
    assert len(train_runs) == 1

    forced = run_main({**TINY_MAIN, "experiment_name": tracking, "force_rerun": "true"})
    assert forced["train"] != first["train"]


def test_main_without_data_fails_at_preprocess_with_the_clear_error(tracking, tmp_path):
    options = {**TINY_MAIN, "data_dir": str(tmp_path / "empty"), "download": "false"}
    with pytest.raises(StepFailedError, match="step preprocess failed.*printed above"):
        run_main({**options, "experiment_name": tracking})
    error = failed_step_error(tracking, "preprocess")
    assert "does not exist" in error and "-P data_dir=" in error
    entry_points = mlflow.search_runs(experiment_names=[tracking])["tags.mlflow.project.entryPoint"]
    assert "train" not in set(entry_points.dropna())


@pytest.mark.slow
def test_rerunning_main_after_a_failed_step_resumes_at_that_step(tracking, tmp_path):
    weights = tmp_path / "resnet18-f37072fd.pth"
    options = {
        **TINY_MAIN,
        "model": "resnet18_pretrained",
        "pretrained": "true",
        "weights_path": str(weights),
        "experiment_name": tracking,
    }
    with pytest.raises(StepFailedError, match="step train failed"):
        run_main(dict(options))
    assert "weights_path" in failed_step_error(tracking, "train")
    first_preprocess = mlflow.search_runs(
        experiment_names=[tracking],
        filter_string="tags.`mlflow.project.entryPoint` = 'preprocess'",
    )
    assert len(first_preprocess) == 1

    torch.save(tv_models.resnet18().state_dict(), weights)  # the user puts the file there
    steps = run_main(dict(options))
    assert steps["preprocess"] == first_preprocess.run_id[0]
    assert mlflow.get_run(steps["train"]).info.status == "FINISHED"
    promote = mlflow.get_run(steps["promote"])  # the registry is shared: promote or keep
    assert promote.info.status == "FINISHED" and "decision" in promote.data.tags


@pytest.mark.slow
def test_a_killed_main_leaves_no_step_running_once_main_runs_again(tracking, tmp_path):
    """main and its step are SIGKILLed together (their process group) while train runs; the next
    main finds both runs' processes gone, ends them KILLED, and runs the workflow to the end."""
    options = [f"--{k.replace('_', '-')}={v}" for k, v in TINY_MAIN.items()]
    main = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "main", f"--experiment-name={tracking}", *options],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        train = mlflow.search_runs(
            experiment_names=[tracking],
            filter_string="tags.`mlflow.project.entryPoint` = 'train' and tags.`process.pid` != ''",
        )
        if len(train):
            break
        time.sleep(0.5)
    os.killpg(main.pid, signal.SIGKILL)
    main.wait()
    killed = set(
        mlflow.search_runs(experiment_names=[tracking], filter_string="status = 'RUNNING'").run_id
    )
    assert train.run_id[0] in killed and len(killed) == 2  # main and its train step
    steps = run_main({**TINY_MAIN, "experiment_name": tracking})
    for run_id in killed:
        run = mlflow.get_run(run_id)
        assert (
            run.info.status == "KILLED"
            and "ended without closing" in run.data.tags["killed_reason"]
        )
    runs = mlflow.search_runs(experiment_names=[tracking])
    assert (runs["status"] != "RUNNING").all()
    assert mlflow.get_run(steps["train"]).info.status == "FINISHED"


def project_copy(dest: Path) -> Path:
    """This project's files (tracked and untracked, not ignored) as a fresh git commit in `dest`,
    to edit without touching the real checkout."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode()  # fmt: skip
    for name in filter(None, listed.split("\0")):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "copy"]):
        subprocess.run([*git, *command], cwd=dest, check=True, capture_output=True)
    return dest


def main_process(project: Path, tracking_uri: str, data: Path) -> str:
    """`cifar10 main` in `project` as a user runs it; returns the line of its train step."""
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "main", "--experiment-name", "lineage",
         "--data-dir", str(data), "--model", "cnn", "--epochs", "1", "--width", "8",
         "--batch-size", "16"],
        cwd=project, env=os.environ | {"MLFLOW_TRACKING_URI": tracking_uri,
                                       "PYTHONPATH": str(project)},
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("main: train: r")]
    return lines[0]


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="needs the project as a git checkout")
@pytest.mark.slow
def test_main_reuses_training_only_for_the_same_data_config_and_code(tmp_path):
    project = project_copy(tmp_path / "project")
    data = write_image_tree(tmp_path / "pets", per_class=20)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    assert (
        main_process(project, uri, data) == "main: train: running: no finished run of this step yet"
    )
    assert main_process(project, uri, data).startswith("main: train: reused ")

    (data / "train" / "cat" / "0000.png").write_bytes(
        (data / "train" / "dog" / "0000.png").read_bytes()
    )
    line = main_process(project, uri, data)
    assert line.startswith("main: train: running: data (") and "changed since run" in line
    assert "config" not in line and "code" not in line

    recipe = project / "experiments" / "cnn.yaml"
    recipe.write_text(recipe.read_text().replace("dropout: 0.2", "dropout: 0.3"))
    line = main_process(project, uri, data)
    assert "config (dropout: 0.2 -> 0.3)" in line and "with uncommitted changes" in line
    assert "data (" not in line

    with (project / "pipeline" / "loop.py").open("a") as code:
        code.write("\n# an uncommitted edit\n")
    line = main_process(project, uri, data)
    assert line.startswith("main: train: running: code (") and "with uncommitted changes" in line
