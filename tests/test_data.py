import http.server
import io
import os
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

from pipeline.data import cifar_batches
from pipeline.data import sources as data
from pipeline.data.cifar_batches import (
    BATCH_DIR,
    DataIntegrityError,
    DataUnavailableError,
    download_cifar10,
    md5sum,
    write_batch,
)
from pipeline.data.sources import (
    channel_stats,
    duplicate_counts,
    load_test_set,
    load_training_set,
    make_splits,
    make_synthetic,
    stratified_split,
)
from tests.conftest import write_cifar_dir

UNREACHABLE_URL = "http://127.0.0.1:9/cifar-10-python.tar.gz"


def test_partial_directory_reads_whatever_batches_exist(tmp_path):
    root = write_cifar_dir(tmp_path, per_batch=40, batches=2, test_images=0)
    train = load_training_set(root, download=False)
    assert len(train) == 80
    assert train.images.shape == (80, 32, 32, 3) and train.images.dtype == np.uint8
    assert train.class_names[0] == "airplane"
    with pytest.raises(DataUnavailableError, match="has no test split"):
        load_test_set(root, download=False)


def test_batch_directory_itself_is_accepted(tmp_path):
    root = write_cifar_dir(tmp_path, per_batch=30, batches=1, test_images=20)
    assert len(load_training_set(root / BATCH_DIR, download=False)) == 30
    assert len(load_test_set(root / BATCH_DIR, download=False)) == 20


def test_pixels_round_trip_through_official_layout(tmp_path):
    images = make_synthetic(10, seed=3)
    (tmp_path / BATCH_DIR).mkdir()
    write_batch(tmp_path / BATCH_DIR / "data_batch_1", images.images, images.labels)
    loaded = load_training_set(tmp_path, download=False)
    np.testing.assert_array_equal(loaded.images, images.images)
    np.testing.assert_array_equal(loaded.labels, images.labels)


def test_corrupt_batch_names_the_file(tmp_path):
    root = write_cifar_dir(tmp_path, per_batch=20, batches=1, test_images=0)
    (root / BATCH_DIR / "data_batch_1").write_bytes(b"not a pickle")
    with pytest.raises(DataIntegrityError, match="data_batch_1"):
        load_training_set(root, download=False)


def test_offline_error_names_directory_url_and_both_fixes(tmp_path, monkeypatch):
    monkeypatch.setattr(cifar_batches, "CIFAR10_URL", UNREACHABLE_URL)
    with pytest.raises(DataUnavailableError) as error:
        load_training_set(tmp_path / "nowhere", download=True)
    message = str(error.value)
    assert str((tmp_path / "nowhere").resolve()) in message
    assert UNREACHABLE_URL in message
    assert "put the official python batches" in message and "-P data_dir=" in message


def test_cli_exits_nonzero_with_message_not_traceback(tmp_path):
    script = (
        "import sys; from pipeline.data import cifar_batches; cifar_batches.CIFAR10_URL = sys.argv[1]; "
        "from pipeline.cli import main; main(['preprocess'])"  # the default data_dir downloads
    )
    result = subprocess.run(
        [sys.executable, "-c", script, UNREACHABLE_URL],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "CIFAR-10 not found in" in result.stderr and UNREACHABLE_URL in result.stderr


class ArchiveHandler(http.server.BaseHTTPRequestHandler):
    payload = b""

    def do_GET(self):  # noqa: N802 (http.server API)
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.payload)))
        self.end_headers()
        self.wfile.write(self.payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def archive_server(tmp_path):
    source = write_cifar_dir(tmp_path / "source", per_batch=20, batches=1, test_images=10)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(source / BATCH_DIR, arcname=BATCH_DIR)
    ArchiveHandler.payload = buffer.getvalue()
    server = http.server.HTTPServer(("127.0.0.1", 0), ArchiveHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    archive = tmp_path / "archive.tar.gz"
    archive.write_bytes(ArchiveHandler.payload)
    yield f"http://127.0.0.1:{server.server_port}/cifar-10-python.tar.gz", md5sum(archive)
    server.shutdown()


def test_download_verifies_md5_and_unpacks(tmp_path, archive_server):
    url, md5 = archive_server
    batch_dir = download_cifar10(tmp_path / "dl", url, md5)
    assert (batch_dir / "data_batch_1").is_file() and (batch_dir / "test_batch").is_file()
    assert len(load_test_set(tmp_path / "dl", download=False)) == 10


def test_download_with_wrong_md5_is_refused_and_removed(tmp_path, archive_server):
    url, _ = archive_server
    with pytest.raises(DataIntegrityError, match="md5"):
        download_cifar10(tmp_path / "dl", url, "0" * 32)
    assert not list((tmp_path / "dl").glob("*.tar.gz"))


def test_split_is_stratified_disjoint_and_seeded():
    labels = np.repeat(np.arange(10), 50)
    train, val = stratified_split(labels, 0.1, seed=1)
    assert len(set(train) & set(val)) == 0 and len(train) + len(val) == 500
    assert np.bincount(labels[val]).tolist() == [5] * 10
    again, _ = stratified_split(labels, 0.1, seed=1)
    other, _ = stratified_split(labels, 0.1, seed=2)
    np.testing.assert_array_equal(train, again)
    assert not np.array_equal(train, other)


def test_max_train_images_caps_training_split_only():
    images = make_synthetic(400, seed=0)
    splits = make_splits(images, 0.25, seed=0, max_train_images=100)
    assert len(splits.train) == 100 and len(splits.val) == 100
    assert np.bincount(splits.train.labels).min() >= 9


def test_channel_stats_match_numpy():
    images = make_synthetic(300, seed=4).images
    mean, std = channel_stats(images)
    scaled = images.astype(np.float64) / 255
    np.testing.assert_allclose(mean, scaled.mean(axis=(0, 1, 2)), atol=1e-9)
    np.testing.assert_allclose(std, scaled.std(axis=(0, 1, 2)), atol=1e-9)


def test_stats_come_from_training_split_only():
    images = make_synthetic(200, seed=0)
    splits = make_splits(images, 0.5, seed=0)
    expected, _ = channel_stats(splits.train.images)
    assert splits.mean == expected != channel_stats(images.images)[0]


def test_duplicates_within_train_and_against_test():
    images = make_synthetic(20, seed=0).images
    train = np.concatenate([images, images[:3]])
    test = np.concatenate([images[5:7], make_synthetic(4, seed=9).images])
    assert duplicate_counts(train, test) == {
        "duplicates_within_train": 3,
        "duplicates_train_test": 2,
    }


def test_real_subset_loads_with_expected_counts(real_subset):
    train = load_training_set(real_subset, download=False)
    assert len(train) == 5085
    per_class = np.bincount(train.labels, minlength=10)
    assert per_class.min() >= 5 * 83 and per_class.max() <= 5 * 120
    mean, std = channel_stats(train.images)
    # CIFAR-10's well-known training statistics, to two decimals.
    np.testing.assert_allclose(mean, (0.491, 0.482, 0.447), atol=0.01)
    np.testing.assert_allclose(std, (0.247, 0.243, 0.261), atol=0.01)


def test_synthetic_source_needs_no_files_and_has_a_test_set():
    train, test = load_training_set("synthetic"), load_test_set("synthetic")
    assert (len(train), len(test)) == (data.SYNTHETIC_SIZES["train"], data.SYNTHETIC_SIZES["test"])
    assert train.source == "synthetic"
    assert not np.array_equal(train.images[: len(test)], test.images)


@pytest.mark.parametrize("name", ["petz", "photos.tgz"])
def test_a_mistyped_data_dir_is_reported_missing_and_nothing_is_created(tmp_path, name):
    """Only the default `data` downloads: any other missing path is an error, and no folder
    appears where the user mistyped (with internet it would have filled with CIFAR-10)."""
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    log = tmp_path / "train.log"
    with log.open("w") as out:
        result = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "train", "--data-dir", str(readonly / name)],
            stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path,
            env=os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
                              "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        )  # fmt: skip
    printed = log.read_text()
    assert result.returncode == 2 and "Traceback" not in printed
    assert f"error: data_dir {readonly / name} does not exist" in printed
    assert "only the default data_dir 'data' (or --download=true) downloads" in printed
    assert list(readonly.iterdir()) == []
