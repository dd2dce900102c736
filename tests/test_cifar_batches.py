"""Official batch files are pickles: only what CIFAR batches hold may be unpickled."""

import pickle
from pathlib import Path

import pytest

from pipeline.data.cifar_batches import BATCH_DIR, UnsafePickleError
from pipeline.data.sources import load_training_set
from tests.conftest import write_cifar_dir


class CreatesFile:
    """Unpickling this calls Path.touch: what a crafted batch could do with any callable."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_crafted_batch_is_refused_before_it_runs(tmp_path):
    root = write_cifar_dir(tmp_path / "cifar", per_batch=20, batches=2, test_images=0)
    planted = tmp_path / "planted-by-pickle"
    crafted = {"data": CreatesFile(planted), "labels": [0]}
    (root / BATCH_DIR / "data_batch_2").write_bytes(pickle.dumps(crafted, protocol=2))
    with pytest.raises(
        UnsafePickleError, match=r"data_batch_2 is not a plain CIFAR-10 batch.*refused unread"
    ):
        load_training_set(root, download=False, skip_bad_images=True)
    assert not planted.exists()
    assert pickle.loads(pickle.dumps(crafted)) and planted.exists()  # the file is really armed


def test_crafted_metadata_is_refused_too(tmp_path):
    root = write_cifar_dir(tmp_path / "cifar", per_batch=20, batches=1, test_images=0)
    planted = tmp_path / "planted"
    (root / BATCH_DIR / "batches.meta").write_bytes(pickle.dumps(CreatesFile(planted)))
    with pytest.raises(UnsafePickleError, match="batches.meta"):
        load_training_set(root, download=False)
    assert not planted.exists()
