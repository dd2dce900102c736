"""The files a user hands to `predict` or `monitor`: a folder (searched recursively), an archive
(unpacked once into the cache, with the data layer's checks) or a glob, without labels."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.data.image_folder import is_archive, unpacked_archive
from pipeline.errors import PipelineError

GLOB_CHARACTERS = "*?["
HIDDEN_PREFIXES = (".", "_")


class InputError(PipelineError):
    """No such input, or nothing in it; the message says what to pass."""


@dataclass
class InputFiles:
    """The files to score, sorted; their table paths are relative to `root`."""

    root: Path
    files: list[Path]

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()


def hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(HIDDEN_PREFIXES) for part in path.relative_to(root).parts)


def list_inputs(location: str) -> InputFiles:
    """A folder (searched recursively), an archive (unpacked once into the cache, with the data
    layer's checks) or a glob (`photos/**/*.jpg`), as the files to score."""
    globbed = any(character in location for character in GLOB_CHARACTERS)
    if globbed:
        base = location[: min(location.index(c) for c in GLOB_CHARACTERS if c in location)]
        root = Path(base if base.endswith(os.sep) else os.path.dirname(base) or ".").resolve()
        found = [Path(p).resolve() for p in glob.glob(location, recursive=True)]
    else:
        path = Path(location).expanduser()
        if is_archive(path):
            root = unpacked_archive(path)  # paths in the table: the members' names
        elif path.is_dir():
            root = path.resolve()
        elif path.exists():
            raise InputError(
                f"input {path} is a file but not an archive (.tar.gz, .tgz, .tar, .zip); pass "
                "its folder, an archive or a glob such as 'photos/*.jpg'."
            )
        else:
            raise InputError(
                f"input {path} does not exist; pass a folder of images, an archive or a glob."
            )
        found = list(root.rglob("*"))
    files = sorted(p for p in found if p.is_file() and not hidden(p, root))
    if not files:
        raise InputError(f"input {location} holds no files to score.")
    return InputFiles(root, files)


def read_bytes(path: Path) -> bytes | str:
    try:
        return path.read_bytes()
    except OSError as error:
        return f"cannot read the file ({error.strerror})"
