"""Where images come from, chosen in one place from `data_dir`, and how they are split.

Readers, each yielding the same `ImageSet` (uint8 NHWC, labels, class names, source, content digest):
- an image-folder tree or an archive of one (`pipeline/data/image_folder.py`);
- a directory in the official python layout, complete or partial, read without a checksum check,
  or else the official archive downloaded into it, md5 verified (`pipeline/data/cifar_batches.py`);
- `synthetic`: a small generated set that a network can learn, for tests and demos.

What a reader could not use (an unreadable file, an empty class folder, a test class that training
never saw) stops the caller with the list, unless it asked to skip bad images.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from pipeline.data.cifar_batches import (
    CLASS_NAMES,
    META_FILE,
    TEST_BATCH,
    TRAIN_BATCHES,
    DataIntegrityError,
    DataUnavailableError,
    find_batch_dir,
    load_cifar_batches,
    locate_batches,
)
from pipeline.data.image_folder import (
    folder_splits,
    is_archive,
    looks_like_image_folder,
    read_image_folder,
    say,
)
from pipeline.data.image_set import ImageSet
from pipeline.model.imaging import IMAGE_SHAPE

SYNTHETIC = "synthetic"
DEFAULT_DATA_DIR = "data"
SYNTHETIC_SIZES = {"train": 3000, "test": 1000}
SHOWN_PROBLEMS = 5


class BadDataError(DataIntegrityError):
    """Some files or class folders cannot be used; the message lists them and the two ways on."""


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


def canonical_source(data_dir: str | Path) -> str:
    """`data_dir` as it means the same from any working directory (a path made absolute)."""
    return SYNTHETIC if str(data_dir) == SYNTHETIC else str(Path(data_dir).resolve())


def is_image_folder(path: Path) -> bool:
    return is_archive(path) or (find_batch_dir(path) is None and looks_like_image_folder(path))


def may_download(data_dir: str | Path, download: bool | None) -> bool:
    """Only the default `data` folder downloads CIFAR-10 unless told: a mistyped path must say it
    does not exist, not fill itself with CIFAR-10 in place of the user's images."""
    if download is not None:
        return download
    return Path(data_dir).resolve() == Path(DEFAULT_DATA_DIR).resolve()


def read_split(data_dir: str | Path, split: str, download: bool | None) -> ImageSet | None:
    """The one place that maps `data_dir` to a reader; None when the source has no such split."""
    if str(data_dir) == SYNTHETIC:
        return make_synthetic(SYNTHETIC_SIZES[split], seed=0 if split == "train" else 1)
    path = Path(data_dir)
    allowed = may_download(path, download)
    if not path.exists() and not allowed:
        raise DataUnavailableError(
            f"data_dir {path} does not exist (looked in {path.resolve()}). Check the path and pass "
            "-P data_dir=... with a folder of class folders, an archive of one, or the official "
            "CIFAR-10 batches. Nothing was created or downloaded: only the default data_dir "
            f"'{DEFAULT_DATA_DIR}' (or -P download=true) downloads CIFAR-10."
        )
    if is_image_folder(path):
        return read_image_folder(path, split)
    batch_dir = locate_batches(path, allowed)
    names = TRAIN_BATCHES if split == "train" else (TEST_BATCH,)
    if not any((batch_dir / name).is_file() for name in names):
        return None
    # Named after the folder the user gave (its cifar-10-batches-py inside is found again).
    return replace(load_cifar_batches(batch_dir, names), source=canonical_source(path))


def problem_summary(problems: list[dict[str, str]]) -> str:
    shown = "; ".join(
        f"{p['file']} ({p['kind']}: {p['detail']})" for p in problems[:SHOWN_PROBLEMS]
    )
    more = f"; and {len(problems) - SHOWN_PROBLEMS} more" if len(problems) > SHOWN_PROBLEMS else ""
    return f"{len(problems)} unusable: {shown}{more}"


def checked(data: ImageSet, skip_bad_images: bool) -> ImageSet:
    """`data` if nothing was unusable or the caller skips bad images; else a BadDataError."""
    if data.problems and not skip_bad_images:
        raise BadDataError(
            f"{data.source}: {problem_summary(data.problems)}. Fix or remove them, or pass "
            "-P skip_bad_images=true to use the rest (what is skipped is logged)."
        )
    if len(data) == 0:
        raise BadDataError(
            f"{data.source}: no usable image ({problem_summary(data.problems)}). "
            "Replace the files or pass -P data_dir=... pointing to data that has them."
        )
    if len(data.class_names) < 2:
        raise BadDataError(
            f"{data.source}: {len(data.class_names)} class(es) with images "
            f"{list(data.class_names)}; a classifier needs at least 2 class folders."
        )
    if data.problems:
        say(
            f"skipped {problem_summary(data.problems)} (skip_bad_images=true; the run lists them "
            "in skipped_files.json)"
        )
    return data


def load_training_set(
    data_dir: str | Path, download: bool | None = None, skip_bad_images: bool = False
) -> ImageSet:
    data = read_split(data_dir, "train", download)
    if data is None or not (len(data) or data.problems):
        raise DataUnavailableError(
            f"{data_dir} has no training images (data_batch_1..5, or class folders of images). "
            "Put them there, or pass -P data_dir=... pointing to a directory that has them."
        )
    return checked(data, skip_bad_images)


def load_test_set(
    data_dir: str | Path, download: bool | None = None, skip_bad_images: bool = False
) -> ImageSet:
    """The held-out test split only (`test_batch` or `test/<class>/`); training never calls this."""
    test = read_split(data_dir, "test", download)
    if test is None:
        raise DataUnavailableError(
            f"{data_dir} has no test split ({TEST_BATCH}, or a test/<class>/ folder), so there is "
            f"nothing held out to test on. Add the official {TEST_BATCH} (and {META_FILE}) or a "
            "test/ folder beside train/, pass -P data_dir=... pointing to data that has one, or "
            "-P test_dir=<folder> for a folder of class folders you kept aside."
        )
    return checked(test, skip_bad_images)


def load_held_out_folder(test_dir: str | Path, skip_bad_images: bool = False) -> ImageSet:
    """A folder or archive of class folders kept aside (`held_out/<class>/*`), read whole as a
    test split."""
    path = Path(test_dir)
    if not path.exists() or not is_image_folder(path):
        raise DataUnavailableError(
            f"test_dir {path} is not a folder or archive of class folders (looked in "
            f"{path.resolve()}); give one laid out as {path.name or 'held_out'}/<class>/*.png."
        )
    return checked(read_split(path, "train", download=False), skip_bad_images)


def has_test_set(data_dir: str | Path) -> bool:
    """Whether `data_dir` holds a test split, looked up without reading (or decoding) it."""
    if str(data_dir) == SYNTHETIC:
        return True
    path = Path(data_dir)
    if is_image_folder(path):
        return folder_splits(path)[1] is not None
    batch_dir = find_batch_dir(path)
    return batch_dir is not None and (batch_dir / TEST_BATCH).is_file()


def stratified_split(
    labels: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, class-stratified (train, val) index arrays carved from the training batches."""
    # imported here, not at the top: sklearn is slow to import, and only the splits need it
    from sklearn.model_selection import train_test_split

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
    from sklearn.model_selection import train_test_split

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
