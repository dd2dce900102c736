import mlflow
import pytest

from pipeline.workflow import StepFailedError, run_main

TINY_MAIN = {
    "data_dir": "synthetic",
    "model": "resnet18",
    "epochs": "1",
    "max_train_images": "64",
    "batch_size": "32",
}


def test_main_runs_every_step_once_then_reuses_them(tracking):
    first = run_main({**TINY_MAIN, "experiment_name": tracking})
    assert set(first) == {"preprocess", "train", "evaluate", "promote"}
    runs = mlflow.search_runs(experiment_names=[tracking])
    main_run = runs[runs["tags.mlflow.runName"] == "main"].iloc[0]
    children = runs[runs["tags.mlflow.parentRunId"] == main_run["run_id"]]
    assert set(children["run_id"]) == set(first.values())
    assert (children["status"] == "FINISHED").all()
    train = mlflow.get_run(first["train"])
    evaluate = mlflow.get_run(first["evaluate"])
    assert evaluate.data.params["model_uri"] == train.data.tags["model_uri"]
    assert "test_accuracy" in evaluate.data.metrics
    promote = mlflow.get_run(first["promote"])
    assert promote.data.tags["decision"] == "promote"

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
    with pytest.raises(StepFailedError, match="step preprocess failed") as error:
        run_main({**options, "experiment_name": tracking})
    assert "CIFAR-10 not found in" in str(error.value) and "-P data_dir=" in str(error.value)
    entry_points = mlflow.search_runs(experiment_names=[tracking])["tags.mlflow.project.entryPoint"]
    assert "train" not in set(entry_points.dropna())
