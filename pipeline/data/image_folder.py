"""Image-folder trees and archives of them: how people keep their own pictures.

Layouts: `DIR/train/<class>/*` (with an optional `DIR/test/<class>/*`, read only by `evaluate`), or
`DIR/<class>/*` as training images only. Class names are the folder names, sorted. An archive
(.tar.gz, .tgz, .tar, .zip) holding such a tree is checked member by member and unpacked once into
the cache. Decoding happens once too: the uint8 arrays are cached under a key made of the files'
names, sizes and modification times, so a changed or added file makes a new key.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from pipeline.data.cifar_batches import DataIntegrityError
from pipeline.data.image_set import ImageSet
from pipeline.errors import in_users_form
from pipeline.model.imaging import IMAGE_SHAPE, to_rgb_32

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
MAX_MEMBER_BYTES = 64 * 2**20
MAX_ARCHIVE_BYTES = 16 * 2**30
CACHE_ENV = "CIFAR10_MLFLOW_CACHE"
CACHE_VERSION = "1"


class UnsafeArchiveError(DataIntegrityError):
    """An archive member would land outside its target, or is too large; nothing was unpacked."""


def cache_root() -> Path:
    """One cache folder for unpacked archives and decoded arrays (`$CIFAR10_MLFLOW_CACHE`)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "cifar10-mlflow")


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def visible(path: Path) -> bool:
    return not path.name.startswith((".", "__MACOSX"))


def class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and visible(p))


def tree_root(root: Path) -> Path:
    """Step into a lone wrapping folder (`myphotos/train/cat/...` packed with its parent)."""
    while True:
        entries = [p for p in root.iterdir() if visible(p)]
        if len(entries) == 1 and entries[0].is_dir() and entries[0].name not in ("train", "test"):
            inner = [p for p in entries[0].iterdir() if visible(p)]
            if inner and all(p.is_dir() for p in inner):
                root = entries[0]
                continue
        return root


def split_dirs(root: Path) -> tuple[Path, Path | None]:
    """(train folder, test folder or None) of an image-folder tree."""
    root = tree_root(root)
    if (root / "train").is_dir():
        test = root / "test"
        return root / "train", test if test.is_dir() else None
    return root, None


def looks_like_image_folder(path: Path) -> bool:
    if not path.is_dir():
        return False
    train, _ = split_dirs(path)
    return len(class_dirs(train)) >= 1


@dataclass
class Listing:
    """The files of one split: (relative path, class name, size, mtime) in a stable order."""

    root: Path
    classes: tuple[str, ...]
    files: list[tuple[str, str, int, int]]

    def nonempty_classes(self) -> tuple[str, ...]:
        """The class names: folders holding at least one file, sorted."""
        return tuple(sorted({entry[1] for entry in self.files}))

    def key(self) -> str:
        hasher = hashlib.blake2b(digest_size=16)
        hasher.update(f"{CACHE_VERSION}\n{self.root.resolve()}\n".encode())
        hasher.update("\n".join(self.classes).encode())
        for entry in self.files:
            hasher.update(("\n" + "\t".join(map(str, entry))).encode())
        return hasher.hexdigest()


def list_split(root: Path) -> Listing:
    classes = tuple(p.name for p in class_dirs(root))
    files = []
    for name in classes:
        with os.scandir(root / name) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                if entry.is_file() and not entry.name.startswith("."):
                    stat = entry.stat()
                    files.append((f"{name}/{entry.name}", name, stat.st_size, stat.st_mtime_ns))
    return Listing(root, classes, files)


def decode_file(path: Path) -> np.ndarray | str:
    """The file's pixels as the served model would see them, or why it cannot be read."""
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb_32(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        return f"{type(error).__name__}: {error}"[:300]


@dataclass
class DecodedSplit:
    images: np.ndarray
    class_of: list[str]
    paths: list[str]
    bad: list[dict[str, str]]


def decode_split(listing: Listing) -> DecodedSplit:
    """Decode every file of a split in threads (Pillow releases the GIL while it decodes)."""
    paths = [listing.root / rel for rel, *_ in listing.files]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = list(pool.map(decode_file, paths, chunksize=256))
    good = [i for i, r in enumerate(results) if not isinstance(r, str)]
    images = np.stack([results[i] for i in good]) if good else np.zeros((0, *IMAGE_SHAPE), np.uint8)
    bad = [
        {"kind": "unreadable", "file": listing.files[i][0], "detail": r}
        for i, r in enumerate(results)
        if isinstance(r, str)
    ]
    return DecodedSplit(
        images,
        [listing.files[i][1] for i in good],
        [listing.files[i][0] for i in good],
        bad,
    )


def atomic_save(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
        np.savez(f, **arrays)
    os.replace(f.name, path)


def say(line: str) -> None:
    """What happened to the data, one line on stderr (a terminal and a log file alike)."""
    print(in_users_form(f"data: {line}"), file=sys.stderr, flush=True)


def cached_split(listing: Listing) -> DecodedSplit:
    """`decode_split`, from the cache when the listing's key matches."""
    path = cache_root() / "decoded" / f"{listing.key()}.npz"
    started = time.perf_counter()
    if path.is_file():
        with np.load(path) as stored:
            meta = json.loads(str(stored["meta"]))
            decoded = DecodedSplit(stored["images"], meta["class_of"], meta["paths"], meta["bad"])
        say(
            f"read {len(decoded.paths):,} decoded images of {listing.root} from the cache "
            f"({time.perf_counter() - started:.1f} s)"
        )
        return decoded
    decoded = decode_split(listing)
    meta = {"class_of": decoded.class_of, "paths": decoded.paths, "bad": decoded.bad}
    atomic_save(path, images=decoded.images, meta=np.array(json.dumps(meta)))
    say(
        f"decoded {len(listing.files):,} files of {listing.root} in "
        f"{time.perf_counter() - started:.1f} s; cached for next time "
        f"({path.stat().st_size / 2**20:,.0f} MB in {path.parent}; {CACHE_ENV} moves it)"
    )
    return decoded


def read_split(listing: Listing, class_names: tuple[str, ...], source: str) -> ImageSet:
    """One split as an ImageSet of its readable images; what could not be used (unreadable files,
    class folders without a readable image, classes outside `class_names`) is in `problems`."""
    decoded = cached_split(listing)
    index = {name: i for i, name in enumerate(class_names)}
    present = set(decoded.class_of)
    problems = list(decoded.bad)
    problems += [
        {"kind": "empty_class", "file": f"{name}/", "detail": "no readable image"}
        for name in listing.classes
        if name not in present
    ]
    problems += [
        {"kind": "unknown_class", "file": f"{name}/", "detail": "not a training class"}
        for name in sorted(present - set(index))
    ]
    known = np.array([c in index for c in decoded.class_of], dtype=bool)
    labels = np.array([index[c] for c in decoded.class_of if c in index], dtype=np.int64)
    images = decoded.images[known] if len(known) else decoded.images
    return ImageSet(images, labels, class_names, source, problems=problems)


def check_member(name: str, size: int, limit_member: int) -> None:
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts or (pure.parts and ":" in pure.parts[0]):
        raise UnsafeArchiveError(f"member {name!r} would land outside the target folder")
    if size > limit_member:
        raise UnsafeArchiveError(
            f"member {name!r} is {size:,} bytes, over the limit of {limit_member:,}"
        )


def check_tar(tar: tarfile.TarFile, limit_member: int, limit_total: int) -> None:
    total = 0
    for member in tar.getmembers():
        check_member(member.name, member.size, limit_member)
        if member.issym() or member.islnk():
            target = PurePosixPath(member.name).parent / member.linkname
            if member.islnk():
                target = PurePosixPath(member.linkname)
            if PurePosixPath(member.linkname).is_absolute() or ".." in target.parts:
                raise UnsafeArchiveError(
                    f"member {member.name!r} links to {member.linkname!r}, outside the target"
                )
        elif not (member.isfile() or member.isdir()):
            raise UnsafeArchiveError(f"member {member.name!r} is not a file or folder")
        total += member.size
        if total > limit_total:
            raise UnsafeArchiveError(f"unpacks to over {limit_total:,} bytes, the limit")


def check_zip(archive: zipfile.ZipFile, limit_member: int, limit_total: int) -> None:
    total = 0
    for info in archive.infolist():
        check_member(info.filename, info.file_size, limit_member)
        total += info.file_size
        if total > limit_total:
            raise UnsafeArchiveError(f"unpacks to over {limit_total:,} bytes, the limit")


def unpack(
    archive: Path,
    target: Path,
    limit_member: int = MAX_MEMBER_BYTES,
    limit_total: int = MAX_ARCHIVE_BYTES,
) -> None:
    """Check every member first, then unpack into a temporary folder renamed to `target`."""
    work = Path(tempfile.mkdtemp(dir=target.parent, prefix=".unpack-"))
    try:
        if archive.name.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as zipped:
                check_zip(zipped, limit_member, limit_total)
                zipped.extractall(work)
        else:
            with tarfile.open(archive) as tar:
                check_tar(tar, limit_member, limit_total)
                tar.extractall(work, filter="data")
        os.replace(work, target)
    except UnsafeArchiveError as error:
        raise UnsafeArchiveError(
            f"{archive} refused: {error}. Nothing was unpacked; repack the images as plain "
            "files under one folder (train/<class>/..., or <class>/...)."
        ) from None
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as error:
        raise DataIntegrityError(
            f"{archive} is not a readable archive ({type(error).__name__}: {error}). "
            "Check the download or repack it as .tar.gz, .tar or .zip."
        ) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def unpacked_archive(archive: Path) -> Path:
    """The archive's tree in the cache, unpacked on first use; a changed archive gets a new one."""
    stat = archive.stat()
    key = hashlib.blake2b(
        f"{archive.resolve()}\n{stat.st_size}\n{stat.st_mtime_ns}".encode(), digest_size=16
    ).hexdigest()
    target = cache_root() / "archives" / f"{archive.name}-{key}"
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        unpack(archive, target)
        say(
            f"unpacked {archive} ({stat.st_size / 2**20:,.1f} MB) into the cache in "
            f"{time.perf_counter() - started:.1f} s ({target})"
        )
    return target


def folder_splits(data_dir: Path) -> tuple[Path, Path | None]:
    """(train folder, test folder or None) of a tree, or of an archive's unpacked tree."""
    return split_dirs(unpacked_archive(data_dir) if is_archive(data_dir) else data_dir)


def read_image_folder(data_dir: Path, split: str) -> ImageSet | None:
    """The `train` or `test` split of an image-folder tree or archive (None: no test split)."""
    source = str(data_dir.resolve())
    train_dir, test_dir = folder_splits(data_dir)
    train = list_split(train_dir)
    if split == "train":
        return read_split(train, train.nonempty_classes(), source)
    if test_dir is None:
        return None
    return read_split(list_split(test_dir), train.nonempty_classes(), source)
