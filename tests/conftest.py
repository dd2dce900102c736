"""Shared fixtures: a real MLflow store in a temp dir, and small data sets in the official format."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tarfile
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

# Under pytest-xdist each worker has one core's share: its torch and every process it starts use one
# thread, so that two workers do not contend for both cores (set before anything imports torch).
# A worker also starts with SIGINT ignored, which the processes it starts would inherit: the tests
# that press Ctrl-C on a stage need it back.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)

import mlflow  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.data.cifar_batches import BATCH_DIR, write_batch, write_meta  # noqa: E402
from pipeline.data.image_folder import CACHE_ENV  # noqa: E402
from pipeline.data.sources import make_synthetic  # noqa: E402


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files with the most `slow` tests first: under `--dist loadfile` (and
    `--no-loadscope-reorder`) the workers take files in this order, so the long ones start early
    and both workers end together instead of one finishing a long file alone."""
    slow = Counter(item.path for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow[item.path])


REAL_SUBSET = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-subset"


def write_cifar_dir(
    root: Path, per_batch: int = 60, batches: int = 2, test_images: int = 50, seed: int = 0
) -> Path:
    """A small official-layout directory of learnable images (synthetic patterns)."""
    batch_dir = root / BATCH_DIR
    batch_dir.mkdir(parents=True, exist_ok=True)
    for i in range(1, batches + 1):
        part = make_synthetic(per_batch, seed=seed + i)
        write_batch(batch_dir / f"data_batch_{i}", part.images, part.labels)
    if test_images:
        test = make_synthetic(test_images, seed=seed + 100)
        write_batch(batch_dir / "test_batch", test.images, test.labels)
    write_meta(batch_dir)
    return root


@pytest.fixture
def cifar_dir(tmp_path: Path) -> Path:
    return write_cifar_dir(tmp_path / "cifar")


@pytest.fixture(autouse=True)
def data_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Unpacked archives and decoded arrays go to a folder of this test session, never ~/.cache.
    `mlflow.set_experiment` exports MLFLOW_EXPERIMENT_ID for good; each test starts without it,
    and whatever a test sets is removed afterwards, so no subprocess inherits another test's."""
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    cache = tmp_path_factory.getbasetemp() / "data-cache"
    monkeypatch.setenv(CACHE_ENV, str(cache))
    return cache


def write_image_tree(
    root: Path,
    classes: tuple[str, ...] = ("cat", "dog", "frog"),
    per_class: int = 40,
    test_per_class: int = 0,
    seed: int = 0,
) -> Path:
    """An image-folder tree `root/train/<class>/` (and `root/test/<class>/`) of learnable images in
    mixed formats and sizes: PNG and JPEG, 32x32, 48x40 and grayscale."""
    source = make_synthetic(len(classes) * (per_class + test_per_class) * 4, seed=seed)
    for split, count in (("train", per_class), ("test", test_per_class)):
        for label, name in enumerate(classes):
            folder = root / split / name
            if count:
                folder.mkdir(parents=True, exist_ok=True)
            images = source.images[source.labels == label]
            offset = 0 if split == "train" else per_class
            for i in range(count):
                image = Image.fromarray(images[offset + i])
                if i % 4 == 1:
                    image.resize((48, 40)).save(folder / f"{i:04d}.jpg", quality=90)
                elif i % 4 == 2:
                    image.save(folder / f"{i:04d}.jpeg", format="JPEG", quality=95)
                elif i % 4 == 3:
                    image.convert("L").save(folder / f"{i:04d}.png")
                else:
                    image.save(folder / f"{i:04d}.png")
    return root


@pytest.fixture(scope="session")
def tracking_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mlflow")


@pytest.fixture
def tracking(tracking_dir: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A real SQLite tracking store (shared by the session, migrations run once) and a fresh
    experiment per test; artifacts land beside the database."""
    uri = f"sqlite:///{tracking_dir / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tracking_dir)
    mlflow.set_tracking_uri(uri)
    name = f"test-{uuid.uuid4().hex[:8]}"
    mlflow.set_experiment(name)
    yield name
    while mlflow.active_run():
        mlflow.end_run("FAILED")


@pytest.fixture(scope="session")
def real_subset() -> Path:
    if not (REAL_SUBSET / BATCH_DIR / "data_batch_1").is_file():
        pytest.skip(f"real CIFAR-10 subset not found at {REAL_SUBSET}")
    return REAL_SUBSET


REAL_JPEG_ARCHIVE = REAL_SUBSET.parent / "cifar10-jpeg" / "train.tar.gz"


def write_jpeg_folder(root: Path, classes: tuple[str, ...], per_class: int) -> Path:
    """`root/<class>/NNNN.jpg`: the first `per_class` real CIFAR-10 JPEGs of each class, taken
    from the shared archive (the caller skips when it is absent)."""
    wanted = {name: per_class for name in classes}
    with tarfile.open(REAL_JPEG_ARCHIVE) as archive:
        for member in archive:
            parts = Path(member.name).parts
            if member.isfile() and len(parts) == 3 and wanted.get(parts[1], 0) > 0:
                target = root / parts[1] / parts[2]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.extractfile(member).read())
                wanted[parts[1]] -= 1
            if not any(wanted.values()):
                break
    return root


@pytest.fixture
def real_jpeg_archive() -> Path:
    if not REAL_JPEG_ARCHIVE.is_file():
        pytest.skip(f"real CIFAR-10 JPEG archive not found at {REAL_JPEG_ARCHIVE}")
    return REAL_JPEG_ARCHIVE


@dataclass
class TinyServer:
    """A hardened server (a real process) for a tiny registered cnn with an evaluate run behind it."""

    base: str
    token: str
    name: str
    model_uri: str
    tracking_uri: str
    root: Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_server(tmp_path_factory: pytest.TempPathFactory):
    """One server for the protocol and page tests: training it takes seconds (cnn, width 8)."""
    from mlflow import MlflowClient

    from pipeline.config import EvaluateConfig, resolve_train_config
    from pipeline.evaluate import run_evaluate
    from pipeline.train import run_train
    from registry.server import TOKEN_ENV, hardened_command, wait_until_serving

    root = tmp_path_factory.mktemp("tiny-server")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.create_experiment("tiny-server", artifact_location=str(root / "artifacts"))
    config = resolve_train_config(
        {"model": "cnn", "data_dir": "synthetic", "epochs": 1, "width": 8,
         "max_train_images": 64, "batch_size": 32, "experiment_name": "tiny-server"}
    )  # fmt: skip
    trained = run_train(config)
    run_evaluate(EvaluateConfig(model_uri=trained.model_uri, data_dir="synthetic",
                                gradcam_per_class=0, experiment_name="tiny-server"))  # fmt: skip
    version = mlflow.register_model(trained.model_uri, "cifar10-tiny")
    MlflowClient().set_registered_model_alias("cifar10-tiny", "champion", version.version)
    mlflow.set_tracking_uri(previous)
    token = "tiny-token-7d2e"
    port = free_port()
    log = (root / "server.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", *hardened_command("models:/cifar10-tiny@champion", port,
                                                  "--max-body-mb", "1")],
        env=os.environ | {"MLFLOW_TRACKING_URI": uri, TOKEN_ENV: token},
        stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).parents[1],
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(base, process)
        yield TinyServer(base, token, "cifar10-tiny", trained.model_uri, uri, root)
    finally:
        process.terminate()
        process.wait(timeout=30)
