import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.config import resolve_train_config
from pipeline.data import load_test_set
from pipeline.models import model_names
from pipeline.train import NonFiniteLossError, run_train, select_device
from registry.serving_model import encode_png
from tests.conftest import write_cifar_dir

EPOCH_METRICS = {
    "train_loss",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "learning_rate",
    "epoch_seconds",
    "images_per_second",
}


def tiny_config(tracking: str, **overrides):
    values = {"experiment_name": tracking, "seed": 0, "pretrained": False} | overrides
    return resolve_train_config(values)


def predict_pngs(model_uri: str, images: np.ndarray) -> pd.DataFrame:
    model = mlflow.pyfunc.load_model(model_uri)
    return model.predict(pd.DataFrame({"image": [encode_png(i) for i in images]}))


@pytest.fixture(scope="module")
def data_256(tmp_path_factory):
    return write_cifar_dir(tmp_path_factory.mktemp("data"), per_batch=150, batches=2, test_images=8)


@pytest.mark.parametrize("name", model_names())
def test_every_model_trains_and_logs_a_servable_model(tracking, data_256, name):
    config = tiny_config(
        tracking,
        model=name,
        data_dir=str(data_256),
        epochs=1,
        max_train_images=256,
        batch_size=64,
        freeze_epochs=0,
    )
    result = run_train(config)
    run = mlflow.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert set(run.data.metrics) >= EPOCH_METRICS
    assert run.data.params["model"] == name and run.data.metrics["train_images"] == 256
    assert run.data.tags["architecture"] == name and run.data.tags["device"] == str(select_device())
    assert run.data.tags["git_commit"] and run.data.tags["data_source"].endswith(
        "cifar-10-batches-py"
    )
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(result.run_id)}
    assert {"config.yaml", "stats.json", "checkpoints"} <= artifacts
    assert run.inputs.dataset_inputs[0].dataset.name == "cifar10-train"
    test = load_test_set(data_256)
    out = predict_pngs(result.model_uri, test.images)
    assert list(out.columns) == ["label", "class_name", "probabilities"]
    assert len(out) == 8 and out["label"].between(0, 9).all()
    assert all(len(p) == 10 and abs(sum(p) - 1) < 1e-4 for p in out["probabilities"])
    assert out["class_name"].tolist() == [test.class_names[i] for i in out["label"]]


def test_cnn_learns_the_synthetic_set(tracking):
    config = tiny_config(tracking, data_dir="synthetic", epochs=4, width=16, max_train_images=2000)
    result = run_train(config)
    assert result.best_val_accuracy >= 0.9
    test = load_test_set("synthetic")
    out = predict_pngs(result.model_uri, test.images[:300])
    assert (out["label"].to_numpy() == test.labels[:300]).mean() >= 0.9


def state_of(model_uri: str) -> dict[str, torch.Tensor]:
    return mlflow.pyfunc.load_model(model_uri).unwrap_python_model().model.state_dict()


class Crash(Exception):
    pass


def test_resume_ends_with_the_weights_of_an_unbroken_run(tracking):
    settings = {"data_dir": "synthetic", "epochs": 3, "width": 8, "max_train_images": 384}
    unbroken = run_train(tiny_config(tracking, **settings))

    def crash_after_second_epoch(epoch, metrics):
        if epoch == 1:
            raise Crash

    with pytest.raises(Crash):
        run_train(tiny_config(tracking, **settings), on_epoch_end=crash_after_second_epoch)
    crashed = mlflow.search_runs(
        experiment_names=[tracking], filter_string="attributes.status = 'FAILED'"
    ).run_id[0]
    resumed = run_train(tiny_config(tracking, resume_run_id=crashed))
    assert resumed.run_id == crashed and resumed.epochs_run == 3
    run = mlflow.get_run(crashed)
    assert run.info.status == "FINISHED" and run.data.tags["resumed_from_epoch"] == "2"
    history = mlflow.MlflowClient().get_metric_history(crashed, "val_accuracy")
    assert sorted(m.step for m in history) == [0, 1, 2]
    expected, actual = state_of(unbroken.model_uri), state_of(resumed.model_uri)
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


def test_non_finite_loss_fails_the_run_naming_epoch_and_step(tracking):
    config = tiny_config(
        tracking,
        data_dir="synthetic",
        epochs=2,
        width=8,
        max_train_images=256,
        optimizer="sgd",
        lr=1e12,
        schedule="constant",
    )
    with pytest.raises(NonFiniteLossError, match=r"at epoch \d+, step \d+.*learning rate"):
        run_train(config)
    run = mlflow.search_runs(experiment_names=[tracking]).iloc[0]
    assert run["status"] == "FAILED" and "NonFiniteLossError" in run["tags.error"]


def test_early_stopping_keeps_the_best_epoch(tracking):
    config = tiny_config(
        tracking,
        data_dir="synthetic",
        epochs=10,
        width=8,
        max_train_images=256,
        lr=1e-12,
        schedule="constant",
        patience=2,
        batch_norm=False,
        dropout=0.0,
    )
    result = run_train(config)
    assert result.epochs_run == 3 and result.best_epoch == 0
    assert mlflow.get_run(result.run_id).data.metrics["stopped_early"] == 1.0
