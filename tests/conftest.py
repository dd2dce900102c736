"""Shared fixtures: a real MLflow store in a temp dir, and small data sets in the official format."""

from __future__ import annotations

import uuid
from pathlib import Path

import mlflow
import pytest

from pipeline.data import BATCH_DIR, make_synthetic, write_batch, write_meta

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


@pytest.fixture
def real_subset() -> Path:
    if not (REAL_SUBSET / BATCH_DIR / "data_batch_1").is_file():
        pytest.skip(f"real CIFAR-10 subset not found at {REAL_SUBSET}")
    return REAL_SUBSET
