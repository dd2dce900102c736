"""CIFAR-10 sources, splits and normalization statistics.

Three sources, chosen by `data_dir`:
- a directory in the official python layout (`cifar-10-batches-py/data_batch_1..5`, `test_batch`,
  `batches.meta`), complete or partial; it is read as it is, without a checksum check;
- the same directory downloaded from the official URL when it is missing (md5 verified);
- `synthetic`: a small generated set that a network can learn, for tests and demos.

Images are kept as uint8 arrays of shape (N, 32, 32, 3) in RGB order; labels as int64.
"""

from __future__ import annotations

import hashlib
import pickle
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from pipeline.errors import PipelineError

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
BATCH_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META_FILE = "batches.meta"
SYNTHETIC = "synthetic"
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
IMAGE_SHAPE = (32, 32, 3)


class DataUnavailableError(PipelineError):
    """The data is not where it was looked for and could not be fetched; the message says what to do."""


class DataIntegrityError(PipelineError):
    """A batch file exists but is unreadable or malformed."""


@dataclass
class ImageSet:
    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    source: str

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> ImageSet:
        return ImageSet(self.images[index], self.labels[index], self.class_names, self.source)


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One official batch file as (images NHWC uint8, labels int64), checked for shape and range."""
    try:
        with path.open("rb") as f:
            entry = pickle.load(f, encoding="latin1")
        data = np.asarray(entry["data"])
        labels = np.asarray(entry.get("labels", entry.get("fine_labels")), dtype=np.int64)
    except Exception as error:
        raise DataIntegrityError(
            f"{path} is not a readable CIFAR-10 batch ({type(error).__name__}: {error}). "
            "Delete it and download again, or replace it with an official batch file."
        ) from error
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
    with meta.open("rb") as f:
        names = pickle.load(f, encoding="latin1")["label_names"]
    return tuple(names)


def load_cifar_batches(batch_dir: Path, names: tuple[str, ...]) -> ImageSet:
    """Concatenate whichever of `names` exist in `batch_dir` (partial sets are fine)."""
    present = [batch_dir / name for name in names if (batch_dir / name).is_file()]
    parts = [read_batch(path) for path in present]
    images = (
        np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, *IMAGE_SHAPE), np.uint8)
    )
    labels = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64)
    return ImageSet(images, labels, read_class_names(batch_dir), source=str(batch_dir.resolve()))


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_cifar10(root: Path, url: str = CIFAR10_URL, md5: str = CIFAR10_MD5) -> Path:
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


def find_batch_dir(data_dir: str | Path) -> Path | None:
    """`data_dir` itself or its `cifar-10-batches-py` child, whichever holds batch files."""
    root = Path(data_dir)
    for candidate in (root / BATCH_DIR, root):
        if candidate.is_dir() and any(
            (candidate / name).is_file() for name in (*TRAIN_BATCHES, TEST_BATCH)
        ):
            return candidate
    return None


def missing_data_message(data_dir: str | Path, reason: str) -> str:
    where = Path(data_dir).resolve()
    return (
        f"CIFAR-10 not found in {where} and the download from {CIFAR10_URL} failed ({reason}).\n"
        f"Fix it in one of two ways:\n"
        f"  1. put the official python batches in {where / BATCH_DIR} "
        f"(data_batch_1..5, test_batch, batches.meta), e.g. unpack cifar-10-python.tar.gz there;\n"
        f"  2. point to a directory that has them: -P data_dir=/path/to/cifar10 "
        f"(or data_dir=synthetic for a quick demo)."
    )


def locate_batches(data_dir: str | Path, download: bool) -> Path:
    """The batch directory for `data_dir`, downloading the official archive when it is absent."""
    batch_dir = find_batch_dir(data_dir)
    if batch_dir is not None:
        return batch_dir
    if not download:
        raise DataUnavailableError(missing_data_message(data_dir, "download disabled"))
    try:
        return download_cifar10(Path(data_dir), CIFAR10_URL, CIFAR10_MD5)
    except (OSError, tarfile.TarError) as error:
        raise DataUnavailableError(missing_data_message(data_dir, str(error))) from None


def make_synthetic(n: int, seed: int) -> ImageSet:
    """Learnable stand-in for CIFAR-10: each class is a fixed colour pattern, shifted and noised.

    The class templates come from a fixed seed so that train and test sets share them; `seed` only
    varies the draws.
    """
    templates = np.random.default_rng(1234).uniform(40, 215, size=(10, 4, 4, 3))
    templates = templates.repeat(8, axis=1).repeat(8, axis=2)
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.int64) % 10
    rng.shuffle(labels)
    shifts = rng.integers(-3, 4, size=(n, 2))
    images = np.empty((n, *IMAGE_SHAPE), np.uint8)
    for i, (label, (dy, dx)) in enumerate(zip(labels, shifts, strict=True)):
        image = np.roll(templates[label], (dy, dx), axis=(0, 1))
        image = image + rng.normal(0, 30, size=IMAGE_SHAPE)
        images[i] = np.clip(image, 0, 255).astype(np.uint8)
    return ImageSet(images, labels, CLASS_NAMES, source=SYNTHETIC)


SYNTHETIC_TRAIN_SIZE = 3000
SYNTHETIC_TEST_SIZE = 1000


def load_training_set(data_dir: str | Path, download: bool = True) -> ImageSet:
    if str(data_dir) == SYNTHETIC:
        return make_synthetic(SYNTHETIC_TRAIN_SIZE, seed=0)
    batch_dir = locate_batches(data_dir, download)
    images = load_cifar_batches(batch_dir, TRAIN_BATCHES)
    if len(images) == 0:
        raise DataUnavailableError(
            f"{batch_dir} has no training batches (data_batch_1..5). "
            "Put at least one there, or pass -P data_dir=... pointing to a directory that has them."
        )
    return images


def load_test_set(data_dir: str | Path, download: bool = True) -> ImageSet:
    """The official test batch only; training and tuning never call this."""
    if str(data_dir) == SYNTHETIC:
        return make_synthetic(SYNTHETIC_TEST_SIZE, seed=1)
    batch_dir = locate_batches(data_dir, download)
    if not (batch_dir / TEST_BATCH).is_file():
        raise DataUnavailableError(
            f"{batch_dir} has no {TEST_BATCH}, so there is nothing held out to test on. "
            f"Put the official {TEST_BATCH} (and {META_FILE}) there, or pass -P data_dir=... "
            "pointing to a directory that has them."
        )
    return load_cifar_batches(batch_dir, (TEST_BATCH,))


def has_test_set(data_dir: str | Path) -> bool:
    if str(data_dir) == SYNTHETIC:
        return True
    batch_dir = find_batch_dir(data_dir)
    return batch_dir is not None and (batch_dir / TEST_BATCH).is_file()


def stratified_split(
    labels: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, class-stratified (train, val) index arrays carved from the training batches."""
    index = np.arange(len(labels))
    try:
        train_index, val_index = train_test_split(
            index, test_size=val_fraction, random_state=seed, stratify=labels
        )
    except ValueError as error:
        raise DataIntegrityError(
            f"Cannot carve a stratified {val_fraction:.0%} validation split from {len(labels)} "
            f"images ({error}). Use more images or a larger val_fraction."
        ) from None
    return np.sort(train_index), np.sort(val_index)


def cap_stratified(index: np.ndarray, labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """At most `limit` of `index`, keeping the class balance (0 means no cap)."""
    if limit <= 0 or limit >= len(index):
        return index
    kept, _ = train_test_split(index, train_size=limit, random_state=seed, stratify=labels[index])
    return np.sort(kept)


@dataclass
class Splits:
    train: ImageSet
    val: ImageSet
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def make_splits(
    data: ImageSet, val_fraction: float, seed: int, max_train_images: int = 0
) -> Splits:
    train_index, val_index = stratified_split(data.labels, val_fraction, seed)
    train_index = cap_stratified(train_index, data.labels, max_train_images, seed)
    train = data.subset(train_index)
    mean, std = channel_stats(train.images)
    return Splits(train, data.subset(val_index), mean, std)


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std on the 0-1 scale, accumulated in float64 chunks to bound memory."""
    total = np.zeros(3)
    squares = np.zeros(3)
    for start in range(0, len(images), 4096):
        chunk = images[start : start + 4096].reshape(-1, 3).astype(np.float64) / 255.0
        total += chunk.sum(axis=0)
        squares += (chunk**2).sum(axis=0)
    count = len(images) * 32 * 32
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def image_hashes(images: np.ndarray) -> np.ndarray:
    """One digest per image, to find exact duplicates."""
    return np.array([hashlib.blake2b(img.tobytes(), digest_size=16).hexdigest() for img in images])


def duplicate_counts(train: np.ndarray, test: np.ndarray | None) -> dict[str, int]:
    train_hashes = image_hashes(train)
    unique = np.unique(train_hashes)
    counts = {"duplicates_within_train": int(len(train_hashes) - len(unique))}
    if test is not None:
        test_hashes = image_hashes(test)
        counts["duplicates_train_test"] = int(np.isin(test_hashes, unique).sum())
    return counts
