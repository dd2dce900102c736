import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.config import ConfigError, EvaluateConfig, resolve_train_config
from pipeline.data.sources import BadDataError, load_test_set
from pipeline.evaluate import run_evaluate
from pipeline.model.architectures import build_model, model_names
from pipeline.model.imaging import encode_png
from pipeline.tracking.model_logging import default_tta
from pipeline.train import run_train
from pipeline.training.loop import NonFiniteLossError, fit
from pipeline.training.precision import autocast_dtype, select_device
from pipeline.training.prepare import prepare_training
from pipeline.training.schedule import Lookahead, Schedule, make_optimizer, make_scheduler
from tests.conftest import write_cifar_dir, write_image_tree, write_jpeg_folder

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
    assert run.data.tags["git_commit"] and run.data.tags["data_source"] == str(data_256.resolve())
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(result.run_id)}
    assert {"config.yaml", "stats.json"} <= artifacts
    # a finished run's resume checkpoints are gone; the logged model keeps the best weights
    assert "checkpoints" not in artifacts and run.data.tags["checkpoints"] == "deleted"
    assert run.inputs.dataset_inputs[0].dataset.name == data_256.name  # the folder given
    test = load_test_set(data_256)
    out = predict_pngs(result.model_uri, test.images)
    assert list(out.columns) == ["label", "class_name", "probabilities"]
    assert len(out) == 8 and out["label"].between(0, 9).all()
    assert all(len(p) == 10 and abs(sum(p) - 1) < 1e-4 for p in out["probabilities"])
    assert out["class_name"].tolist() == [test.class_names[i] for i in out["label"]]


@pytest.mark.accuracy
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


def crash_then_resume(tracking: str, settings: dict, crash_after_epoch: int, before_resume=None):
    """An unbroken run, and one that crashes after `crash_after_epoch` and is resumed in place
    (after `before_resume(crashed run id)`, when given).
    Returns (unbroken result, crashed run id, resumed result)."""
    unbroken = run_train(tiny_config(tracking, **settings))

    def crash(epoch, metrics, checkpoint):
        if epoch == crash_after_epoch:
            raise Crash

    with pytest.raises(Crash):
        run_train(tiny_config(tracking, **settings), callbacks=[crash])
    crashed = mlflow.search_runs(
        experiment_names=[tracking], filter_string="attributes.status = 'FAILED'"
    ).run_id[0]
    if before_resume:
        before_resume(crashed)
    return unbroken, crashed, run_train(tiny_config(tracking, resume_run_id=crashed))


def assert_same_weights(first_uri: str, second_uri: str) -> None:
    expected, actual = state_of(first_uri), state_of(second_uri)
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


@pytest.mark.parametrize(("checkpoint_seconds", "resumed_from"), [(0, 2), (3600, 0)])
def test_resume_ends_with_the_weights_of_an_unbroken_run(
    tracking, capsys, checkpoint_seconds, resumed_from
):
    """A crash after epoch 2 of 3 resumes in the same run to the unbroken run's weights, each epoch
    logged once: from epoch 2's checkpoint when every epoch is checkpointed, and from the start with
    the logged config when none was written yet (checkpoints at most once an hour)."""
    settings = {
        "data_dir": "synthetic",
        "epochs": 3,
        "width": 8,
        "max_train_images": 384,
        "checkpoint_seconds": checkpoint_seconds,
    }
    unbroken, crashed, resumed = crash_then_resume(tracking, settings, crash_after_epoch=1)
    assert resumed.run_id == crashed and resumed.epochs_run == 3
    run = mlflow.get_run(crashed)
    assert run.info.status == "FINISHED"
    assert run.data.tags["resumed_from_epoch"] == str(resumed_from)
    restarted = "has no checkpoint yet: training it again from epoch 1"
    assert (restarted in capsys.readouterr().err) == (resumed_from == 0)
    history = mlflow.MlflowClient().get_metric_history(crashed, "val_accuracy")
    assert sorted(m.step for m in history) == [1, 2, 3]  # epochs counted from 1, as printed
    assert_same_weights(unbroken.model_uri, resumed.model_uri)


def test_a_checkpoint_cut_off_mid_upload_is_skipped_for_the_other_slot(tracking, capsys):
    """A store that writes in place (MLflow before its atomic local uploads, some remote stores)
    leaves a torn file when the upload is cut off. Checkpoints alternate between two slots, so
    resuming takes the other, older one and still ends with the unbroken weights."""
    settings = {"data_dir": "synthetic", "epochs": 3, "width": 8, "max_train_images": 384,
                "checkpoint_seconds": 0}  # fmt: skip

    def cut_newest_checkpoint_in_half(run_id: str) -> None:
        store = Path(mlflow.get_run(run_id).info.artifact_uri.removeprefix("file://"))
        newest = store / "checkpoints" / "b" / "last.pt"
        newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])

    unbroken, crashed, resumed = crash_then_resume(
        tracking, settings, crash_after_epoch=1, before_resume=cut_newest_checkpoint_in_half
    )
    assert "checkpoints/b/last.pt is incomplete" in capsys.readouterr().err
    assert mlflow.get_run(crashed).data.tags["resumed_from_epoch"] == "1"
    assert_same_weights(unbroken.model_uri, resumed.model_uri)


def test_non_finite_loss_fails_the_run_naming_epoch_and_step(tracking):
    config = tiny_config(
        tracking,
        data_dir="synthetic",
        epochs=2,
        width=8,
        max_train_images=256,
        optimizer="sgd",
        lr=1e20,  # 1e12 can stay finite behind batch norm; 1e20 overflows to NaN
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
    assert result.epochs_run == 3 and result.best_epoch == 1
    assert mlflow.get_run(result.run_id).data.metrics["stopped_early"] == 1.0


@pytest.mark.slow
def test_finetune_resumed_across_the_unfreeze_boundary_ends_like_an_unbroken_run(tracking):
    """vgg16_finetune: epoch 1 frozen (only the head learns), epochs 2-3 unfrozen at lr x factor.
    A crash right after the first unfrozen epoch resumes to exactly the unbroken weights. A
    validation split of 60 images: validating VGG16 was most of this test's time."""
    settings = {
        "model": "vgg16_finetune",
        "data_dir": "synthetic",
        "epochs": 3,
        "freeze_epochs": 1,
        "max_train_images": 64,
        "val_fraction": 0.02,
        "batch_size": 32,
        "checkpoint_seconds": 0,
    }
    unbroken, crashed, resumed = crash_then_resume(tracking, settings, crash_after_epoch=1)
    assert mlflow.get_run(crashed).data.tags["resumed_from_epoch"] == "2"
    assert_same_weights(unbroken.model_uri, resumed.model_uri)


def test_frozen_phase_trains_only_the_head(tracking):
    config = tiny_config(
        tracking,
        model="vgg16_transfer",
        data_dir="synthetic",
        epochs=1,
        max_train_images=64,
        batch_size=32,
    )
    prepared = prepare_training(config)
    features = {k: v.clone() for k, v in prepared.model.features.state_dict().items()}
    head = {k: v.clone() for k, v in prepared.model.classifier.state_dict().items()}
    fit(prepared.model, prepared.train_batches, prepared.val_batches, config)
    after_features = prepared.model.features.state_dict()
    assert all(torch.equal(features[k], after_features[k]) for k in features)
    after_head = prepared.model.classifier.state_dict()
    assert any(not torch.equal(head[k], after_head[k]) for k in head)


def test_bad_images_stop_training_before_it_starts_unless_skipped(tracking, tmp_path):
    tree = write_image_tree(tmp_path / "pets", per_class=20)
    (tree / "train" / "dog" / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    config = {"model": "cnn", "data_dir": str(tree), "epochs": 1, "width": 8, "batch_size": 16}
    with pytest.raises(BadDataError, match="dog/truncated.jpg"):
        run_train(tiny_config(tracking, **config))
    refused = mlflow.search_runs(experiment_names=[tracking]).iloc[0]
    assert refused["status"] == "FAILED" and "dog/truncated.jpg" in refused["tags.error"]
    assert "metrics.val_accuracy" not in refused or np.isnan(refused["metrics.val_accuracy"])
    result = run_train(tiny_config(tracking, **config, skip_bad_images=True))
    run = mlflow.get_run(result.run_id)
    assert run.data.metrics["skipped_files"] == 1
    skipped = json.loads(mlflow.artifacts.load_text(f"runs:/{result.run_id}/skipped_files.json"))
    assert [p["file"] for p in skipped] == ["dog/truncated.jpg"]
    assert run.data.metrics["train_images"] + run.data.metrics["val_images"] == 60


def test_resuming_a_run_without_a_logged_config_names_what_is_missing(tracking):
    with mlflow.start_run() as other:
        mlflow.log_param("not", "a train run")
    mlflow.MlflowClient().set_terminated(other.info.run_id, "KILLED")  # a finished one is refused
    with pytest.raises(
        ConfigError, match=f"Cannot resume run {other.info.run_id}: it has no config"
    ):
        run_train(tiny_config(tracking, resume_run_id=other.info.run_id))


KILL_SETTINGS = {
    "model": "cnn",
    "data_dir": "synthetic",
    "epochs": 6,
    "width": 8,
    # A wide hidden layer makes a ~50 MB checkpoint: its upload takes long enough to be caught.
    "hidden_units": 8192,
    "max_train_images": 256,
    "batch_size": 64,
    "checkpoint_seconds": 0,
    "seed": 0,
    # The wide hidden layer's loss rises in epoch 2 and the watchdog would stop the run early;
    # these tests are about the kills, so every run trains its six epochs.
    "stop_if_not_learning": False,
}


def train_command(experiment: str, **options) -> list[str]:
    arguments = [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    return [
        sys.executable,
        "-m",
        "pipeline.cli",
        "train",
        f"--experiment-name={experiment}",
        *arguments,
    ]


def experiment_folder(root: Path, experiment: str) -> Path | None:
    """Where the experiment's runs keep their artifacts; None until the experiment exists."""
    found = mlflow.get_experiment_by_name(experiment)
    return None if found is None else root / "mlruns" / found.experiment_id


def checkpoint_copy(pid: int) -> tuple[Path, Path] | None:
    """(source, destination) while process `pid` copies a checkpoint into the artifact store, read
    from the files it holds open (/proc/<pid>/fd). MLflow's local store writes a hidden temporary
    file and renames it when complete; older versions wrote `last.pt` in place."""
    opened = []
    for fd in Path(f"/proc/{pid}/fd").glob("*"):
        try:
            opened.append(Path(os.readlink(fd)))
        except OSError:
            continue
    stored = [p for p in opened if "checkpoints" in p.parts and "artifacts" in p.parts]
    scratch = [p for p in opened if p.name == "last.pt" and "artifacts" not in p.parts]
    return (scratch[0], stored[0]) if stored and scratch else None


def is_short(copy: tuple[Path, Path]) -> bool:
    try:
        return copy[1].stat().st_size < copy[0].stat().st_size
    except FileNotFoundError:
        return False


def kill_at(moment: str, process: subprocess.Popen, root: Path, experiment: str, rng) -> str | None:
    """Poll every millisecond and SIGKILL `process` at `moment`; return the killed run's id, or None
    when a kill meant to cut a checkpoint upload short came as the copy finished."""
    reached = {
        "before_first_checkpoint": lambda folder: (
            (folder / "config.yaml").exists() and not (folder / "checkpoints").exists()
        ),
        "mid_epoch": lambda folder: (folder / "checkpoints" / "a" / "last.pt").exists(),
        "during_model_logging": lambda folder: any(folder.parent.parent.glob("models/*/artifacts")),
    }.get(moment)
    delay = {"before_first_checkpoint": (0, 0.05), "mid_epoch": (0.05, 0.4)}.get(moment, (0, 0))
    deadline = time.monotonic() + 240
    experiment_dir = None  # looked up once: a tracking query per poll would let the moment slip by
    while time.monotonic() < deadline and process.poll() is None:
        if moment == "during_checkpoint_upload":
            copy = checkpoint_copy(process.pid)
            if copy and is_short(copy):
                process.kill()
                process.wait()
                return copy[1].parts[-5] if is_short(copy) else None
        else:
            experiment_dir = experiment_dir or experiment_folder(root, experiment)
            folders = list(experiment_dir.glob("*/artifacts")) if experiment_dir else []
            if folders and reached(folders[0]):
                time.sleep(rng.uniform(*delay))
                process.kill()
                process.wait()
                return folders[0].parent.name
        time.sleep(0.001)
    raise AssertionError(f"the train process ended before it could be killed {moment}")


ROOT = Path(__file__).resolve().parents[1]
MLFLOW_RUN = [sys.executable, "-m", "mlflow", "run", str(ROOT), "--env-manager", "local"]


def mlflow_run_env() -> dict[str, str]:
    """`mlflow run --experiment-name` refuses to run beside MLFLOW_EXPERIMENT_ID."""
    return {k: v for k, v in os.environ.items() if k != "MLFLOW_EXPERIMENT_ID"}


def final_weights(run_id: str) -> dict[str, torch.Tensor]:
    return state_of(mlflow.get_run(run_id).data.tags["model_uri"])


@pytest.fixture(scope="module")
def unbroken_run(tracking_dir) -> str:
    """The run id of one unbroken run of KILL_SETTINGS."""
    uri = f"sqlite:///{tracking_dir / 'mlflow.db'}"
    experiment = f"unbroken-{uuid.uuid4().hex[:8]}"
    subprocess.run(
        train_command(experiment, **KILL_SETTINGS),
        check=True, capture_output=True, cwd=tracking_dir,
        env=os.environ | {"MLFLOW_TRACKING_URI": uri},
    )  # fmt: skip
    # MLflow's store remembers the working directory it was first opened in as its artifact root:
    # open it where the tests' `tracking` fixture does.
    previous = Path.cwd()
    os.chdir(tracking_dir)
    try:
        client = mlflow.MlflowClient(uri)
        experiment_id = client.get_experiment_by_name(experiment).experiment_id
        run_id = client.search_runs([experiment_id])[0].info.run_id
    finally:
        os.chdir(previous)
    return run_id


@pytest.mark.parametrize(
    "moment",
    ["before_first_checkpoint", "mid_epoch", "during_checkpoint_upload", "during_model_logging"],
)
def test_a_run_killed_at_any_moment_resumes_to_the_unbroken_weights(
    tracking, tracking_dir, unbroken_run, moment
):
    """SIGKILL, then `train -P resume_run_id=...` on the same run: it ends FINISHED, with the
    unbroken run's weights exactly and one value per epoch in each metric series."""
    rng = random.Random(moment)
    for _attempt in range(5):
        process = subprocess.Popen(
            train_command(tracking, **KILL_SETTINGS),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        killed = kill_at(moment, process, tracking_dir, tracking, rng)
        if killed:
            break
    assert killed, "5 kills in a row came just as a checkpoint copy finished"
    assert mlflow.get_run(killed).info.status == "RUNNING"  # only its own process could end it
    resumed = subprocess.run(
        train_command(tracking, resume_run_id=killed), capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run = mlflow.get_run(killed)
    assert run.info.status == "FINISHED"
    resumed_from = int(run.data.tags["resumed_from_epoch"])
    assert {
        "before_first_checkpoint": resumed_from == 0,
        "mid_epoch": resumed_from >= 1,
        "during_checkpoint_upload": resumed_from < KILL_SETTINGS["epochs"],
        "during_model_logging": resumed_from == KILL_SETTINGS["epochs"],
    }[moment], resumed.stderr[-3000:]
    history = mlflow.MlflowClient().get_metric_history(killed, "val_accuracy")
    assert sorted(m.step for m in history) == list(range(1, KILL_SETTINGS["epochs"] + 1))
    expected, actual = final_weights(unbroken_run), final_weights(killed)
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


def test_a_run_killed_before_it_logged_its_config_resumes_to_the_unbroken_weights(
    tracking, tracking_dir, unbroken_run
):
    """`mlflow run` creates the run and logs its parameters before our process starts; a SIGKILL
    then (here: the moment the run exists) leaves no config.yaml, and resuming starts it over
    from those parameters."""
    settings = [a for k, v in KILL_SETTINGS.items() for a in ("-P", f"{k}={v}")]
    launcher = subprocess.Popen(
        [*MLFLOW_RUN, "-e", "train", "--experiment-name", tracking, *settings],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env=mlflow_run_env(),
    )  # fmt: skip
    deadline = time.monotonic() + 120
    killed = None
    while killed is None and time.monotonic() < deadline and launcher.poll() is None:
        runs = mlflow.search_runs(experiment_names=[tracking])
        # the moment mlflow run has logged the parameters (on a slow machine the run exists first)
        if len(runs) and mlflow.get_run(runs["run_id"][0]).data.params:
            killed = runs["run_id"][0]
        time.sleep(0.05)
    os.killpg(launcher.pid, signal.SIGKILL)
    launcher.wait()
    assert killed, "mlflow run never created its run"
    names = {f.path for f in mlflow.MlflowClient().list_artifacts(killed)}
    assert "config.yaml" not in names, "the kill came after the config was logged"
    resumed = subprocess.run(
        train_command(tracking, resume_run_id=killed), capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "has no checkpoint yet: training it again from epoch 1 with its parameters" in (
        resumed.stderr
    )
    run = mlflow.get_run(killed)
    assert run.info.status == "FINISHED" and "config.yaml" in {
        f.path for f in mlflow.MlflowClient().list_artifacts(killed)
    }
    expected, actual = final_weights(unbroken_run), final_weights(killed)
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


def test_keep_checkpoints_keeps_a_finished_runs_checkpoints(tracking):
    config = tiny_config(
        tracking, data_dir="synthetic", epochs=1, width=8, max_train_images=128,
        keep_checkpoints=True,
    )  # fmt: skip
    result = run_train(config)
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(result.run_id, "checkpoints")}
    assert artifacts == {"checkpoints/a"}
    assert mlflow.get_run(result.run_id).data.tags["checkpoints"] == "kept"


@pytest.mark.accuracy
def test_a_run_that_cannot_learn_is_told_so_tagged_and_stopped_early(tracking, capsys):
    config = tiny_config(
        tracking, data_dir="synthetic", epochs=8, width=8, max_train_images=256, lr=1e-9,
        schedule="constant",
    )  # fmt: skip
    result = run_train(config)
    run = mlflow.get_run(result.run_id)
    assert result.epochs_run == 3 and run.data.tags["watchdog"] == "not learning"
    printed = capsys.readouterr()
    assert (
        "watchdog: not learning: after 3 epochs" in printed.err and "Stopping early" in printed.err
    )
    assert "no better than chance (0.100 for 10 classes" in printed.err and "-P lr=" in printed.err
    assert f"train stopped early, not learning: run {result.run_id}" in printed.out


@pytest.mark.accuracy
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_diverging_run_is_caught(tracking, capsys, precision, threads):
    """The watchdog reads every step's loss, so a run whose loss climbs within an epoch is caught
    there, before its kernels (AVX2 or AVX-512, float32 or bfloat16, one thread or two) turn it
    into a NaN at one step or another: the same finding, and the run ends on its best epoch."""
    config = tiny_config(
        tracking, data_dir="synthetic", epochs=4, width=8, max_train_images=512, batch_size=32,
        optimizer="sgd", lr=2.5, warmup_fraction=0.9, precision=precision,
    )  # fmt: skip
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        result = run_train(config)
    finally:
        torch.set_num_threads(before)
    assert 1 <= result.epochs_run < config.epochs and result.model_uri
    assert mlflow.get_run(result.run_id).data.tags["watchdog"] == "diverging"
    assert "watchdog: diverging: the training loss rose from" in capsys.readouterr().err


def test_a_loss_that_turns_non_finite_after_a_good_epoch_ends_on_that_epoch(tracking):
    """A weight turns NaN after epoch 1 (as an overflow would): epoch 2's loss is NaN from its
    first step; the run ends on epoch 1's weights, and the finding names where."""
    config = tiny_config(tracking, data_dir="synthetic", epochs=3, width=8, max_train_images=256)
    prepared = prepare_training(config)

    def overflow(epoch: int, metrics: dict, checkpoint) -> None:
        if epoch == 0:
            with torch.no_grad():
                next(prepared.model.parameters()).fill_(float("nan"))

    found = []
    state = fit(prepared.model, prepared.train_batches, prepared.val_batches, prepared.config,
                callbacks=[overflow], on_problem=found.append)  # fmt: skip
    assert state.next_epoch == 1 and state.best_epoch == 0 and state.stopped_early
    assert found == [state.problem] and "at epoch 2, step 1 (from" in str(found[0])
    weights = prepared.model.state_dict().values()
    assert all(torch.isfinite(w).all() for w in weights if w.is_floating_point())


def test_own_classes_are_told_that_training_mirrors_them(tracking, tmp_path, capsys):
    folder = write_image_tree(tmp_path / "digits", classes=("one", "two", "six"), per_class=8)
    run_train(tiny_config(tracking, data_dir=str(folder), epochs=1, width=8))
    assert (
        "note: training mirrors your images (flip augmentation); if a mirrored image can belong "
        "to another class (digits, letters, arrows), pass -P flip=false -P tta=false"
    ) in capsys.readouterr().err
    run_train(tiny_config(tracking, data_dir=str(folder), epochs=1, width=8, flip=False))
    assert "mirrors your images" not in capsys.readouterr().err


@pytest.mark.accuracy
def test_a_three_class_folder_of_real_images_learns_with_the_defaults(
    tracking, real_jpeg_archive, tmp_path
):
    """300 real CIFAR-10 JPEGs per class, the cnn recipe as it is (written for 45,000 images:
    3 steps an epoch unscaled) and 5 epochs: well above the 0.333 of chance."""
    folder = write_jpeg_folder(tmp_path / "three", ("airplane", "frog", "truck"), 300)
    result = run_train(tiny_config(tracking, model="cnn", data_dir=str(folder), epochs=5))
    run = mlflow.get_run(result.run_id)
    assert run.data.params["resolved.batch_size"] == "16"
    assert result.best_val_accuracy >= 0.7


def test_fastnet_whitens_from_its_data_resumes_bit_identically_and_evaluates(tracking, data_256):
    """With lookahead every 5 steps, which falls mid-epoch, so the average must be resumed too."""
    settings = {"model": "fastnet", "data_dir": "synthetic", "epochs": 3, "width": 16,
                "max_train_images": 384, "checkpoint_seconds": 0, "lookahead_steps": 5}  # fmt: skip
    prepared = prepare_training(tiny_config(tracking, **settings))
    assert len(prepared.train_batches) % 5
    whitening = prepared.model.whiten.weight.detach().clone()
    assert not whitening.requires_grad and whitening.abs().sum() > 0
    fit(prepared.model, prepared.train_batches, prepared.val_batches, prepared.config)
    assert torch.equal(prepared.model.whiten.weight, whitening)  # fixed, not trained
    unbroken, crashed, resumed = crash_then_resume(tracking, settings, crash_after_epoch=1)
    assert mlflow.get_run(crashed).data.tags["resumed_from_epoch"] == "2"
    assert_same_weights(unbroken.model_uri, resumed.model_uri)
    trained = run_train(
        tiny_config(tracking, model="fastnet", data_dir=str(data_256), epochs=1, width=16)
    )
    evaluated = run_evaluate(
        EvaluateConfig(model_uri=trained.model_uri, data_dir=str(data_256), gradcam_per_class=1)
    )
    assert 0 <= evaluated.metrics["test_accuracy"] <= 1


def test_lookahead_averages_little_early_and_much_late_and_ends_on_the_average():
    model = torch.nn.Linear(2, 1)
    lookahead = Lookahead(model, every=2, schedule=Schedule("constant", 0.0, total_steps=5))
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight += 1
    lookahead.after_step(1)  # between updates: untouched
    torch.testing.assert_close(model.weight, start + 1)
    lookahead.after_step(2)  # early: decay 0.95**2 * (2/5)**3, the weights barely move back
    torch.testing.assert_close(model.weight, start + 1 - 0.95**2 * 0.4**3)
    average = model.weight.detach().clone()
    with torch.no_grad():
        model.weight += 1
    lookahead.after_step(5)  # the last step, though not a multiple of 2: decay 0.95**2
    torch.testing.assert_close(model.weight, average + 1 - 0.95**2)
    torch.testing.assert_close(lookahead.average["weight"], model.weight.detach())


def test_bias_lr_factor_speeds_up_normalization_biases_through_the_schedule():
    """airbench's bias scaler: batch-norm biases at 64x the learning rate, all along the one-cycle
    schedule, with the same weight decay per step as every other weight; the recipe's momentum
    holds all along (one-cycle does not cycle it)."""
    config = resolve_train_config({"model": "fastnet", "width": 8, "bias_lr_factor": 64})
    model = build_model("fastnet", config.options)
    optimizer = make_optimizer(model, config, config.lr)
    scheduler = make_scheduler(optimizer, config, total_steps=40)
    weights, biases = optimizer.param_groups
    norm_biases = [m.bias for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert {id(p) for p in biases["params"]} == {id(p) for p in norm_biases}
    assert len(weights["params"]) + len(biases["params"]) == sum(
        p.requires_grad for p in model.parameters()
    )
    assert config.optimizer == "sgd" and config.schedule == "onecycle"
    for _ in range(25):
        assert weights["momentum"] == biases["momentum"] == config.momentum
        assert biases["lr"] == pytest.approx(64 * weights["lr"])
        assert biases["lr"] * biases["weight_decay"] == pytest.approx(
            weights["lr"] * weights["weight_decay"]
        )
        optimizer.step()
        scheduler.step()
    plain = resolve_train_config({"model": "fastnet", "width": 8, "bias_lr_factor": 1})
    assert len(make_optimizer(model, plain, plain.lr).param_groups) == 1


@pytest.mark.accuracy
def test_precision_is_chosen_recorded_and_trains_in_both(tracking):
    assert autocast_dtype(torch.device("cpu"), "fp32") is None
    assert autocast_dtype(torch.device("cpu"), "bf16") is torch.bfloat16
    settings = {"data_dir": "synthetic", "epochs": 2, "width": 8, "max_train_images": 256}
    for precision in ("fp32", "bf16"):
        result = run_train(tiny_config(tracking, precision=precision, **settings))
        run = mlflow.get_run(result.run_id)
        assert run.data.tags["precision"] == precision
        assert result.best_val_accuracy > 0.2  # synthetic classes are easy; chance is 0.1


def test_flip_tta_is_the_same_in_validation_evaluate_and_the_served_model(tracking, data_256):
    """A model trained with `tta` reports the validation accuracy that its served form, by default
    with flip TTA, gives on the same images; evaluate uses it unless told otherwise."""
    config = tiny_config(
        tracking, model="fastnet", data_dir=str(data_256), epochs=1, width=8, tta=True,
        precision="fp32",
    )  # fmt: skip
    trained = run_train(config)
    model = mlflow.pyfunc.load_model(trained.model_uri)
    assert default_tta(model) is True
    val = prepare_training(config).splits.val
    frame = pd.DataFrame({"image": [encode_png(image) for image in val.images]})
    default = np.stack(model.predict(frame)["probabilities"])
    flipped = np.stack(model.predict(frame, params={"tta": True})["probabilities"])
    plain = np.stack(model.predict(frame, params={"tta": False})["probabilities"])
    np.testing.assert_allclose(default, flipped)
    assert not np.allclose(default, plain)
    served_accuracy = float((default.argmax(axis=1) == val.labels).mean())
    assert served_accuracy == pytest.approx(trained.best_val_accuracy, abs=1 / len(val))
    evaluated = run_evaluate(
        EvaluateConfig(model_uri=trained.model_uri, data_dir=str(data_256), gradcam_per_class=0)
    )
    evaluate_run = mlflow.get_run(evaluated.run_id)
    assert evaluate_run.info.run_name.startswith("evaluate-tta")
    assert evaluate_run.data.params["tta"] == "True"
    written_back = mlflow.get_run(trained.run_id).data.metrics
    assert written_back["test_accuracy_tta"] == evaluated.metrics["test_accuracy"]
