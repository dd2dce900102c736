"""The inference log: files that rotate and stay under their cap, rows that say what was answered,
and a writer that never fails or slows a request when its folder or its S3 store goes away (a real
moto server, stopped and started again)."""

import hashlib
import io
import subprocess
import sys
import time
from pathlib import Path

import boto3
import numpy as np
import pandas as pd
import pytest
from prometheus_client import CollectorRegistry

from pipeline.data.sources import make_synthetic
from pipeline.model.classifier import IMAGE_COLUMN, Observation
from pipeline.model.drift import FEATURES, image_features
from pipeline.model.imaging import encode_png
from registry.inference_log import InferenceLog, InferenceLogSettings
from registry.metrics import ServerMetrics
from tests.conftest import free_port

IMAGES = make_synthetic(64, seed=3).images


def answer(count: int, start: int = 0) -> Observation:
    """What the classifier hands its observers for `count` real PNG images (a fixed 10-class
    answer: the writer is under test here, the network in test_serve)."""
    images = IMAGES[start : start + count]
    probabilities = np.tile(np.linspace(1, 2, 10) / np.linspace(1, 2, 10).sum(), (count, 1))
    encoded = [encode_png(image) for image in images]
    return Observation(
        pd.DataFrame({IMAGE_COLUMN: encoded}),
        pd.DataFrame(
            {
                "label": [9] * count,
                "class_name": ["truck"] * count,
                "probabilities": probabilities.tolist(),
            }
        ),  # fmt: skip
        images,
        encoded,
        image_features(images),
        probabilities.max(1),
        0.004,
    )


def counters() -> ServerMetrics:
    metrics = ServerMetrics()
    assert isinstance(metrics.registry, CollectorRegistry)
    return metrics


def value(metrics: ServerMetrics, name: str, labels: dict | None = None) -> float:
    return metrics.registry.get_sample_value(name, labels or {}) or 0.0


def started(destination: str, metrics: ServerMetrics, **settings) -> InferenceLog:
    return InferenceLog(
        InferenceLogSettings(destination, **settings),
        "cifar10-resnet",
        "3",
        lambda row: "req-1",
        metrics.inference_log,
    )


def test_rows_say_what_was_answered_and_files_rotate(tmp_path):
    metrics = counters()
    log = started(str(tmp_path), metrics, rotate_rows=5)
    for start in (0, 4, 8):
        log.observe(answer(4, start))
    log.close()
    files = sorted(tmp_path.glob("inference-*.parquet"))
    assert [len(pd.read_parquet(f)) for f in files] == [5, 5, 2]
    rows = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    assert rows["image_sha256"][0] == hashlib.sha256(encode_png(IMAGES[0])).hexdigest()
    assert set(rows["model_name"]) == {"cifar10-resnet"} and set(rows["request_id"]) == {"req-1"}
    np.testing.assert_allclose(rows[list(FEATURES)], image_features(IMAGES[:12]), rtol=1e-6)
    assert rows["probabilities"][0].tolist() == pytest.approx(answer(1).result.probabilities[0])
    assert rows["confidence"][0] == pytest.approx(2 / 15) and rows["latency_ms"][0] == 4
    assert str(rows["time"].dtype).endswith("UTC]") and rows["image"].isna().all()
    assert value(metrics, "cifar10_inference_log_rows_total") == 12
    assert not list(tmp_path.glob(".*partial"))


def test_a_quiet_server_still_writes_its_rows_after_rotate_s(tmp_path):
    log = started(str(tmp_path), counters(), rotate_rows=1000, rotate_s=0.3)
    log.observe(answer(3))
    deadline = time.monotonic() + 10
    while not list(tmp_path.glob("inference-*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(pd.read_parquet(next(tmp_path.glob("inference-*.parquet")))) == 3
    log.close()


def test_the_folder_stays_under_its_cap_and_images_are_kept_only_when_asked(tmp_path):
    metrics = counters()
    small = len(encode_png(IMAGES[0])) / 1024 + 0.5
    log = started(str(tmp_path), metrics, rotate_rows=4, log_images=True, max_image_kb=small,
                  max_mb=40 / 1024)  # fmt: skip
    for start in range(0, 60, 4):
        log.observe(answer(4, start))
    log.close()
    files = sorted(tmp_path.glob("inference-*.parquet"))
    assert sum(f.stat().st_size for f in files) <= 40 * 1024
    assert 0 < len(files) < 15 and value(metrics, "cifar10_inference_log_removed_files_total") > 0
    newest = pd.read_parquet(files[-1])
    assert len(newest) == 4  # the oldest files went, the newest rows are kept
    kept = newest[newest["image"].notna()]
    assert len(kept) and all(len(b) <= small * 1024 for b in kept["image"])
    assert (newest["image"].isna() == (newest["image_bytes"] > small * 1024)).all()


def test_sampling_keeps_about_the_share_asked_for(tmp_path):
    log = started(str(tmp_path), counters(), rotate_rows=10_000, sample=0.25)
    for _ in range(25):
        log.observe(answer(16))
    log.close()
    rows = sum(len(pd.read_parquet(f)) for f in tmp_path.glob("inference-*.parquet"))
    assert 60 <= rows <= 140  # 400 images at 0.25: 100 ± 4 standard deviations


def test_a_folder_that_stops_taking_files_costs_counted_rows_not_requests(tmp_path):
    metrics = counters()
    folder = tmp_path / "log"
    log = started(str(folder), metrics, rotate_rows=2)
    log.observe(answer(2))
    wait_for(lambda: value(metrics, "cifar10_inference_log_rows_total") == 2)
    folder.rename(tmp_path / "moved")
    folder.write_text("not a folder any more")  # refuses writes even to root, unlike chmod
    log.observe(answer(4))
    wait_for(lambda: dropped(metrics, "write_failed") == 4)
    folder.unlink()
    log.observe(answer(2))
    log.close()
    assert value(metrics, "cifar10_inference_log_rows_total") == 4
    assert len(pd.read_parquet(next(folder.glob("inference-*.parquet")))) == 2


def dropped(metrics: ServerMetrics, reason: str) -> float:
    return value(metrics, "cifar10_inference_log_dropped_rows_total", {"reason": reason})


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the writer did not get there in time"
        time.sleep(0.05)


def start_moto(port: int) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}")
    wait_for(lambda: reachable(client), timeout=60)
    client.create_bucket(Bucket="logs")
    return process


def reachable(client) -> bool:
    try:
        client.list_buckets()
        return True
    except Exception:
        return False


@pytest.fixture
def s3_env(monkeypatch):
    port = free_port()
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    for name, value_ in (("AWS_ACCESS_KEY_ID", "moto"), ("AWS_SECRET_ACCESS_KEY", "moto"),
                         ("AWS_DEFAULT_REGION", "us-east-1")):  # fmt: skip
        monkeypatch.setenv(name, value_)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    return port


def test_an_s3_outage_never_blocks_a_request_and_writing_resumes_after_it(s3_env):
    port = s3_env
    moto = start_moto(port)
    metrics = counters()
    log = started("s3://logs/serving/resnet", metrics, rotate_rows=4, queue_rows=8)
    try:
        log.observe(answer(4))
        wait_for(lambda: value(metrics, "cifar10_inference_log_rows_total") == 4)
        moto.terminate()
        moto.wait(timeout=30)
        slowest = 0.0
        for start in range(0, 60, 4):  # more than the queue holds while the writer waits on S3
            began = time.perf_counter()
            log.observe(answer(4, start))
            slowest = max(slowest, time.perf_counter() - began)
        assert slowest < 0.25  # the request thread only queues
        wait_for(lambda: dropped(metrics, "write_failed") >= 4)
        assert dropped(metrics, "queue_full") > 0
        moto = start_moto(port)  # a fresh, empty store
        before = value(metrics, "cifar10_inference_log_rows_total")
        wait_for(lambda: log.rows.empty())
        log.observe(answer(4))
        wait_for(lambda: value(metrics, "cifar10_inference_log_rows_total") >= before + 4)
        client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}")
        keys = [o["Key"] for o in client.list_objects_v2(Bucket="logs")["Contents"]]
        assert keys and all(k.startswith("serving/resnet/inference-") for k in keys)
        body = client.get_object(Bucket="logs", Key=keys[-1])["Body"].read()
        assert len(pd.read_parquet(io.BytesIO(body))) == 4
    finally:
        log.close(timeout=15)
        moto.terminate()
        moto.wait(timeout=30)


def test_a_folder_the_server_cannot_write_is_refused_at_start_with_the_fix(tmp_path):
    from pipeline.config import ConfigError, ServeConfig
    from registry.server import inference_log_settings

    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(ConfigError, match="cannot take files .*-P inference_log"):
        inference_log_settings(ServeConfig(inference_log=str(blocked / "log")))
    settings = inference_log_settings(ServeConfig(inference_log=str(tmp_path / "new" / "log")))
    assert Path(settings["destination"]).is_dir() and settings["sample"] == 1.0
