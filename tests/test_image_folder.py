"""Image-folder trees and archives of them, read as users keep their own pictures."""

import io
import os
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.image_folder import UnsafeArchiveError, unpack
from pipeline.data.sources import BadDataError, load_test_set, load_training_set
from pipeline.model.decoding import decode_image
from tests.conftest import write_image_tree

CLASSES = ("cat", "dog", "frog")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return write_image_tree(tmp_path / "pets", per_class=12, test_per_class=4)


def test_tree_gives_sorted_folder_names_and_32x32_rgb(tree):
    train = load_training_set(tree)
    assert train.class_names == CLASSES and len(train) == 36
    assert train.images.shape == (36, 32, 32, 3) and train.images.dtype == np.uint8
    assert np.bincount(train.labels).tolist() == [12, 12, 12]
    test = load_test_set(tree)
    assert test.class_names == CLASSES and len(test) == 12


def test_training_and_serving_decode_a_file_to_the_same_pixels(tree):
    train = load_training_set(tree)
    resized = tree / "train" / "dog" / "0001.jpg"  # a 48x40 JPEG
    position = sorted(p.name for p in (tree / "train" / "dog").iterdir()).index("0001.jpg")
    dog_images = train.images[train.labels == CLASSES.index("dog")]
    np.testing.assert_array_equal(dog_images[position], decode_image(resized.read_bytes()))


def test_classes_folder_without_train_split_is_training_only(tmp_path):
    root = write_image_tree(tmp_path / "flat", per_class=8) / "train"
    assert load_training_set(root).class_names == CLASSES
    with pytest.raises(Exception, match="has no test split"):
        load_test_set(root)


def test_corrupt_file_stops_then_is_skipped_on_request(tree):
    (tree / "train" / "cat" / "broken.png").write_bytes(b"\x89PNG not really")
    (tree / "train" / "dog" / "notes.txt").write_text("not an image")
    with pytest.raises(BadDataError, match=r"2 unusable.*cat/broken.png.*skip_bad_images=true"):
        load_training_set(tree)
    kept = load_training_set(tree, skip_bad_images=True)
    assert len(kept) == 36 and {p["file"] for p in kept.problems} == {
        "cat/broken.png",
        "dog/notes.txt",
    }


def test_empty_class_folder_and_unknown_test_class_are_named(tree):
    (tree / "train" / "bird").mkdir()
    with pytest.raises(BadDataError, match="bird/ \\(empty_class"):
        load_training_set(tree)
    assert load_training_set(tree, skip_bad_images=True).class_names == CLASSES
    (tree / "test" / "horse").mkdir()
    (tree / "test" / "horse" / "0.png").write_bytes(
        (tree / "test" / "cat" / "0000.png").read_bytes()
    )
    with pytest.raises(BadDataError, match="horse/ \\(unknown_class"):
        load_test_set(tree)
    assert len(load_test_set(tree, skip_bad_images=True)) == 12


def test_changed_or_added_file_invalidates_the_decoded_cache(tree, data_cache):
    first = load_training_set(tree)
    assert list((data_cache / "decoded").glob("*.npz"))
    np.testing.assert_array_equal(load_training_set(tree).images, first.images)
    cat = tree / "train" / "cat" / "0000.png"
    cat.write_bytes((tree / "train" / "frog" / "0000.png").read_bytes())
    os.utime(cat, ns=(cat.stat().st_atime_ns, cat.stat().st_mtime_ns + 10**9))
    changed = load_training_set(tree)
    assert not np.array_equal(changed.images[0], first.images[0])
    (tree / "train" / "cat" / "extra.png").write_bytes(cat.read_bytes())
    assert len(load_training_set(tree)) == 37


def pack(tree: Path, archive: Path) -> Path:
    if archive.suffix == ".zip":
        with zipfile.ZipFile(archive, "w") as zipped:
            for path in sorted(tree.rglob("*")):
                zipped.write(path, Path("pets") / path.relative_to(tree))
    else:
        mode = "w:gz" if archive.name.endswith(("gz", "tgz")) else "w"
        with tarfile.open(archive, mode) as tar:
            tar.add(tree, arcname="pets")
    return archive


@pytest.mark.parametrize("name", ["pets.tar.gz", "pets.tgz", "pets.tar", "pets.zip"])
def test_archive_of_a_tree_reads_like_the_tree(tree, tmp_path, data_cache, name):
    archive = pack(tree, tmp_path / name)
    train, folder = load_training_set(archive), load_training_set(tree)
    np.testing.assert_array_equal(train.images, folder.images)
    assert train.class_names == CLASSES and train.source == str(archive.resolve())
    assert len(load_test_set(archive)) == 12
    unpacked = list((data_cache / "archives").glob(f"{name}-*"))
    assert len(unpacked) == 1
    load_training_set(archive)
    assert list((data_cache / "archives").glob(f"{name}-*")) == unpacked


def tar_with(tmp_path: Path, member: tarfile.TarInfo, payload: bytes = b"x") -> Path:
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        ok = tarfile.TarInfo("train/cat/0.png")
        ok.size = 1
        tar.addfile(ok, io.BytesIO(b"x"))
        tar.addfile(member, io.BytesIO(payload) if member.isfile() else None)
    return archive


def test_tar_member_outside_the_target_is_refused_and_nothing_written(tmp_path, data_cache):
    escape = tarfile.TarInfo("../../escaped.txt")
    escape.size = 1
    archive = tar_with(tmp_path, escape)
    with pytest.raises(UnsafeArchiveError, match="outside the target"):
        load_training_set(archive)
    assert not list(tmp_path.rglob("escaped.txt")) and not list(data_cache.rglob("escaped.txt"))
    assert not list((data_cache / "archives").glob("evil.tar-*"))


@pytest.mark.parametrize("target", ["/etc/passwd", "../../../etc/passwd"])
def test_tar_link_out_of_the_target_is_refused(tmp_path, data_cache, target):
    link = tarfile.TarInfo("train/cat/1.png")
    link.type, link.linkname = tarfile.SYMTYPE, target
    with pytest.raises(UnsafeArchiveError, match="links to"):
        load_training_set(tar_with(tmp_path, link))
    assert not list((data_cache / "archives").glob("evil.tar-*"))


def test_zip_member_outside_the_target_is_refused(tmp_path, data_cache):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("train/cat/0.png", b"x")
        zipped.writestr("../escaped.txt", b"x")
    with pytest.raises(UnsafeArchiveError, match="outside the target"):
        load_training_set(archive)
    assert not list(tmp_path.rglob("escaped.txt"))


def test_oversized_member_or_archive_is_refused(tree, tmp_path):
    archive = pack(tree, tmp_path / "pets.tar")
    (tmp_path / "target").mkdir()
    with pytest.raises(UnsafeArchiveError, match="over the limit"):
        unpack(archive, tmp_path / "target" / "a", limit_member=100)
    with pytest.raises(UnsafeArchiveError, match="unpacks to over 10,000 bytes"):
        unpack(archive, tmp_path / "target" / "b", limit_total=10_000)
    assert list((tmp_path / "target").iterdir()) == []
