"""The official CIFAR-10 python layout: batch files, their metadata, and the official download.

Batch files are pickles, and `pickle.load` runs whatever a crafted file names. They are read with an
unpickler that admits only what CIFAR batches hold: dicts, lists, strings, bytes, ints and numpy
arrays. Anything else is refused before it is built.
"""

from __future__ import annotations

import codecs
import hashlib
import pickle
import tarfile
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.image_set import ImageSet
from pipeline.errors import PipelineError
from pipeline.model.imaging import IMAGE_SHAPE

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
BATCH_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META_FILE = "batches.meta"
CLASS_NAMES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

# What a pickled numpy array needs (numpy 1 and 2 spell the module differently); `codecs.encode` is
# how Python 3 writes bytes in a protocol-2 pickle.
RECONSTRUCT_ARRAY = np.ndarray.__reduce__(np.zeros(0))[0]
ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): RECONSTRUCT_ARRAY,
    ("numpy._core.multiarray", "_reconstruct"): RECONSTRUCT_ARRAY,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}


class DataUnavailableError(PipelineError):
    """The data is not where it was looked for and could not be fetched; the message says what to do."""


class DataIntegrityError(PipelineError):
    """A data file exists but is unreadable, malformed or unsafe."""


class UnsafePickleError(DataIntegrityError):
    """A batch file asks the unpickler to build something a CIFAR batch never holds."""


class BatchUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file, encoding="latin1")
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED_GLOBALS:
            return ALLOWED_GLOBALS[(module, name)]
        raise UnsafePickleError(
            f"{self.path} is not a plain CIFAR-10 batch: it asks to load {module}.{name}, which "
            "could run code, so it was refused unread. Replace it with an official batch file."
        )


def load_batch_pickle(path: Path) -> Any:
    with path.open("rb") as f:
        return BatchUnpickler(f, path).load()


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One official batch file as (images NHWC uint8, labels int64), checked for shape and range."""
    try:
        entry = load_batch_pickle(path)
        data = np.asarray(entry["data"])
        labels = np.asarray(entry.get("labels", entry.get("fine_labels")), dtype=np.int64)
    except UnsafePickleError:
        raise
    except Exception as error:
        raise DataIntegrityError(
            f"{path} is not a readable CIFAR-10 batch ({type(error).__name__}: {error}). "
            "Delete it and download again, or replace it with an official batch file."
        ) from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataIntegrityError(
            f"{path}: expected uint8 data of shape (N, 3072), got {data.dtype} {data.shape}."
        )
    if len(labels) != len(data):
        raise DataIntegrityError(f"{path}: {len(data)} images but {len(labels)} labels.")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise DataIntegrityError(f"{path}: labels outside 0..9 ({labels.min()}..{labels.max()}).")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels


def write_batch(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """The inverse of `read_batch`: a protocol-2 pickle with channel-major rows, as the official files."""
    data = np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(len(images), -1)
    entry = {"batch_label": path.name, "labels": [int(v) for v in labels], "data": data}
    with path.open("wb") as f:
        pickle.dump(entry, f, protocol=2)


def write_meta(batch_dir: Path, class_names: tuple[str, ...] = CLASS_NAMES) -> None:
    with (batch_dir / META_FILE).open("wb") as f:
        pickle.dump({"label_names": list(class_names)}, f, protocol=2)


def read_class_names(batch_dir: Path) -> tuple[str, ...]:
    meta = batch_dir / META_FILE
    if not meta.is_file():
        return CLASS_NAMES
    try:
        names = load_batch_pickle(meta)["label_names"]
    except UnsafePickleError:
        raise
    except Exception as error:
        raise DataIntegrityError(
            f"{meta} is not a readable CIFAR-10 metadata file ({type(error).__name__}: {error})."
        ) from None
    return tuple(str(name) for name in names)


def load_cifar_batches(batch_dir: Path, names: tuple[str, ...]) -> ImageSet:
    """Concatenate whichever of `names` exist in `batch_dir` (partial sets are fine); a file that
    cannot be read is left out and listed in `problems`."""
    parts, problems = [], []
    for path in (batch_dir / name for name in names):
        if not path.is_file():
            continue
        try:
            parts.append(read_batch(path))
        except UnsafePickleError:
            raise
        except DataIntegrityError as error:
            problems.append({"kind": "unreadable", "file": path.name, "detail": str(error)})
    images = (
        np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, *IMAGE_SHAPE), np.uint8)
    )
    labels = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64)
    source = str(batch_dir.resolve())
    return ImageSet(images, labels, read_class_names(batch_dir), source, problems=problems)


def find_batch_dir(data_dir: Path) -> Path | None:
    """`data_dir` itself or its `cifar-10-batches-py` child, whichever holds batch files."""
    for candidate in (data_dir / BATCH_DIR, data_dir):
        if candidate.is_dir() and any(
            (candidate / name).is_file() for name in (*TRAIN_BATCHES, TEST_BATCH)
        ):
            return candidate
    return None


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_cifar10(root: Path, url: str, md5: str = CIFAR10_MD5) -> Path:
    """Fetch and unpack the official archive into `root`, refusing a file whose md5 differs."""
    root.mkdir(parents=True, exist_ok=True)
    archive = root / Path(url).name
    if not (archive.is_file() and md5sum(archive) == md5):
        partial = archive.with_suffix(".part")
        with urllib.request.urlopen(url, timeout=30) as response, partial.open("wb") as f:
            while chunk := response.read(1 << 20):
                f.write(chunk)
        partial.replace(archive)
    if md5sum(archive) != md5:
        archive.unlink()
        raise DataIntegrityError(
            f"Downloaded {url} but its md5 is not {md5}; the file was removed, try again."
        )
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(root, filter="data")
    return root / BATCH_DIR


def missing_data_message(data_dir: str | Path, reason: str) -> str:
    where = Path(data_dir).resolve()
    return (
        f"CIFAR-10 not found in {where} and the download from {CIFAR10_URL} failed ({reason}).\n"
        f"Fix it in one of two ways:\n"
        f"  1. put the official python batches in {where / BATCH_DIR} "
        f"(data_batch_1..5, test_batch, batches.meta), e.g. unpack cifar-10-python.tar.gz there;\n"
        f"  2. point to a directory that has them, or to an image folder or archive of one: "
        f"-P data_dir=/path/to/cifar10 (or data_dir=synthetic for a quick demo)."
    )


def locate_batches(data_dir: Path, download: bool) -> Path:
    """The batch directory for `data_dir`, downloading the official archive when it is absent."""
    batch_dir = find_batch_dir(data_dir)
    if batch_dir is not None:
        return batch_dir
    if not download:
        raise DataUnavailableError(missing_data_message(data_dir, "download disabled"))
    try:
        return download_cifar10(data_dir, CIFAR10_URL)
    except (OSError, tarfile.TarError) as error:
        raise DataUnavailableError(missing_data_message(data_dir, str(error))) from None
