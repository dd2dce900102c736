"""Watching the served model end to end: a real server writes its inference log (request ids, the
model's name and version), /metrics counts the rows, and `monitor` finds no drift in held-out images
or in that log, finds it in darkened ones, and fails a scheduled job on drift when asked."""

import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.config import MonitorConfig
from pipeline.data.sources import load_test_set
from pipeline.model.imaging import encode_png
from pipeline.monitor import run_monitor
from registry.server import TOKEN_ENV, hardened_command, wait_until_serving
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_tracking(tiny_server):
    """In this process, the tiny server's tracking store."""
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tiny_server.tracking_uri)
    yield tiny_server
    mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="module")
def held_out() -> np.ndarray:
    return load_test_set("synthetic", None, False).images[:120]


def write_pngs(folder: Path, images: np.ndarray) -> Path:
    folder.mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:04d}.png")
    return folder


def post(url: str, token: str, body: dict) -> tuple[dict, str]:
    request = urllib.request.Request(
        url, json.dumps(body).encode(),
        {"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response), response.headers["x-request-id"]


def test_the_server_logs_every_answer_and_monitor_finds_no_drift_in_it(
    tiny_tracking, held_out, tmp_path
):
    tiny_server = tiny_tracking
    import base64

    log = tmp_path / "log"
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", *hardened_command(
            "models:/cifar10-tiny@champion", port, "--inference-log", str(log),
            "--log-rotate-rows", "25", "--log-rotate-s", "600")],
        env=os.environ | {"MLFLOW_TRACKING_URI": tiny_server.tracking_uri,
                          TOKEN_ENV: tiny_server.token},
        stdout=(tmp_path / "server.log").open("w"), stderr=subprocess.STDOUT, cwd=ROOT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(base, process)
        sent, sender = [], {}  # sender: the request id that carried each image
        for start in range(0, 100, 20):
            encoded = [encode_png(i) for i in held_out[start : start + 20]]
            pictures = [base64.b64encode(e).decode() for e in encoded]
            route = "/invocations" if start % 40 == 0 else "/v2/models/cifar10-tiny/infer"
            body = ({"dataframe_split": {"columns": ["image"], "data": [[p] for p in pictures]}}
                    if route == "/invocations" else
                    {"inputs": [{"name": "image", "shape": [20], "datatype": "BYTES",
                                 "data": pictures}]})  # fmt: skip
            sent.append((base + route, body, encoded))
        with ThreadPoolExecutor(len(sent)) as pool:  # at once: scored together, logged apart
            ids = list(pool.map(lambda s: post(s[0], tiny_server.token, s[1])[1], sent))
        for request_id, (_, _, encoded) in zip(ids, sent, strict=True):
            sender |= {hashlib.sha256(e).hexdigest(): request_id for e in encoded}
        request_ids = set(ids)
        deadline = time.monotonic() + 30
        while sum(len(pd.read_parquet(f)) for f in log.glob("inference-*.parquet")) < 100:
            assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-2000:]
            time.sleep(0.2)
        metrics = urllib.request.urlopen(
            urllib.request.Request(
                base + "/metrics", headers={"Authorization": f"Bearer {tiny_server.token}"}
            )
        ).read()
        assert b"cifar10_inference_log_rows_total 100.0" in metrics
        pictures = [base64.b64encode(encode_png(i)).decode() for i in held_out[100:103]]
        body = {"dataframe_split": {"columns": ["image"], "data": [[p] for p in pictures]}}
        request_ids.add(post(base + "/invocations", tiny_server.token, body)[1])
    finally:
        process.terminate()
        process.wait(timeout=30)
    rows = pd.concat([pd.read_parquet(f) for f in sorted(log.glob("inference-*.parquet"))])
    # 4 files of 25 rows, and the last 3 rows written when the server stopped
    assert len(rows) == 103 and set(rows["request_id"]) == request_ids
    first = rows.iloc[:100]
    assert (first["request_id"] == first["image_sha256"].map(sender)).all()
    assert set(rows["model_name"]) == {"cifar10-tiny"} and set(rows["model_version"]) == {"1"}
    assert (rows["latency_ms"] > 0).all() and rows["image"].isna().all()

    result = run_monitor(MonitorConfig(source=str(log), model_uri=tiny_server.model_uri,
                                       experiment_name="tiny-server"))  # fmt: skip
    run = mlflow.get_run(result.run_id)
    assert not result.drift and run.data.tags["verdict"] == "no drift"
    assert run.data.tags["source_kind"] == "the inference log"
    assert run.data.tags["logged_by"] == "cifar10-tiny:1"
    assert run.data.metrics["window_images"] == 103


def test_monitor_tells_held_out_images_from_darkened_ones(
    tiny_tracking, held_out, tmp_path, capsys
):
    tiny_server = tiny_tracking
    same = run_monitor(MonitorConfig(source=str(write_pngs(tmp_path / "same", held_out)),
                                     model_uri=tiny_server.model_uri,
                                     experiment_name="tiny-server"))  # fmt: skip
    assert not same.drift
    darker = write_pngs(tmp_path / "darker", (held_out * 0.6).astype(np.uint8))
    shifted = run_monitor(MonitorConfig(source=str(darker), model_uri=tiny_server.model_uri,
                                        experiment_name="tiny-server"))  # fmt: skip
    said = capsys.readouterr().out
    assert shifted.drift and min(shifted.p_values, key=shifted.p_values.get).startswith("mean_")
    assert "monitor found drift" in said and "brightness" in said and "-e main" in said
    run = mlflow.get_run(shifted.run_id)
    assert run.data.tags["verdict"] == "drift" and run.data.metrics["drift"] == 1
    assert run.data.metrics["p_value_mean_r"] < 1e-6
    assert {"p_value_confidence", "p_value_class_shares", "share_cat"} <= set(run.data.metrics)
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(shifted.run_id)}
    assert {"drift.png", "drift_report.json"} <= artifacts


def test_fail_on_drift_fails_the_scheduled_job_in_one_line(tiny_server, held_out, tmp_path):
    darker = write_pngs(tmp_path / "darker", (held_out * 0.6).astype(np.uint8))
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "monitor", "--source", str(darker),
         "--model-uri", tiny_server.model_uri, "--fail-on-drift", "true",
         "--experiment-name", "tiny-server"],
        env=os.environ | {"MLFLOW_TRACKING_URI": tiny_server.tracking_uri},
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert done.returncode != 0
    assert "exiting non-zero as fail_on_drift asked" in done.stderr
    assert "Traceback" not in done.stderr
    assert "monitor found drift" in done.stdout


def test_a_source_with_nothing_to_compare_is_one_clear_error(tiny_tracking, tmp_path):
    from pipeline.data.inputs import InputError

    tiny_server = tiny_tracking
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no files"):
        run_monitor(MonitorConfig(source=str(tmp_path / "empty"),
                                  model_uri=tiny_server.model_uri))  # fmt: skip


@pytest.mark.slow
def test_a_model_with_over_2000_validation_images_is_quiet_on_unshifted_held_out_images(
    tracking, real_jpeg_archive, tmp_path, capsys
):
    """Real CIFAR-10 JPEGs: 3,150 validation images, listed class by class. The reference is a
    stratified sample of all of them, not the first 2,000 (which hold no image of the third
    class), so unshifted held-out windows of 200 and 300 images are quiet, a darkened one not."""
    from pipeline.config import resolve_train_config
    from pipeline.train import run_train
    from tests.conftest import write_jpeg_folder

    classes = ("airplane", "automobile", "bird")
    pool = write_jpeg_folder(tmp_path / "pool", classes, 1500)
    held_out = {}
    for name in classes:
        files = sorted((pool / name).iterdir())
        held_out[name] = [np.asarray(Image.open(path).convert("RGB")) for path in files[1400:]]
        for path in files[1400:]:
            path.unlink()
    trained = run_train(resolve_train_config(
        {"model": "cnn", "data_dir": str(pool), "val_fraction": 0.75, "epochs": 3, "width": 8,
         "experiment_name": tracking, "seed": 0}))  # fmt: skip
    reference = mlflow.pyfunc.load_model(trained.model_uri).metadata.metadata["drift_reference"]
    assert reference["validation_images"] == 3150 and reference["held_out_images"] == 2000
    assert "stratified by class" in reference["sampling"]
    mixed = np.stack([image for i in range(100) for name in classes
                      for image in held_out[name][i : i + 1]])  # fmt: skip
    for size in (200, 300):
        window = write_pngs(tmp_path / f"same-{size}", mixed[:size])
        quiet = run_monitor(MonitorConfig(source=str(window), model_uri=trained.model_uri,
                                          experiment_name=tracking))  # fmt: skip
        assert not quiet.drift, quiet.p_values
    darker = write_pngs(tmp_path / "darker", (mixed[:200] * 0.6).astype(np.uint8))
    shifted = run_monitor(MonitorConfig(source=str(darker), model_uri=trained.model_uri,
                                        experiment_name=tracking))  # fmt: skip
    assert shifted.drift
    assert "drawn the old way" not in capsys.readouterr().err


def test_a_reference_drawn_the_old_way_still_loads_and_says_so(tmp_path):
    """A model logged before the sampling was recorded keeps working; its reference says how it
    was drawn, which monitor and serve print in one line with the fix."""
    from pipeline.model.drift import FEATURES, FIRST_IMAGES, OLD_REFERENCE_NOTE, Reference

    rng = np.random.default_rng(0)
    features = rng.random((50, len(FEATURES)), dtype=np.float32)
    shares = np.full(10, 0.1, dtype=np.float32)
    np.savez(tmp_path / "old.npz", features=features, names=np.array(FEATURES),
             confidence=rng.random(50, dtype=np.float32), class_shares=shares)  # fmt: skip
    old = Reference.load(tmp_path / "old.npz")
    assert old.drawn_the_old_way and old.sampling == FIRST_IMAGES and old.class_counts.sum() == 50
    note = OLD_REFERENCE_NOTE.format(model="models:/m-1", how=old.sampling)
    assert "retrain it (mlflow run . -e train)" in note and "\n" not in note
    new = Reference.from_images(rng.integers(0, 255, (60, 32, 32, 3), dtype=np.uint8),
                                probabilities=rng.dirichlet(np.ones(10), 60))  # fmt: skip
    new.save(tmp_path / "new.npz")
    loaded = Reference.load(tmp_path / "new.npz")
    assert not loaded.drawn_the_old_way and len(loaded.sample) == 60
