"""The `ImageSet` every data source yields: pixels, labels, class names, where they came from and a
content digest."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class ImageSet:
    """uint8 NHWC RGB images, int64 labels indexing `class_names`, and where they came from.

    `source` is always something `data_dir` accepts again (a path or `synthetic`), so a run's split
    can be rebuilt from what it logged. `problems` lists what the reader could not use (one dict per
    file or class folder: kind, file, detail); the images are the usable ones.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    source: str
    problems: list[dict[str, str]] = field(default_factory=list)
    _digest: str | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> ImageSet:
        return ImageSet(self.images[index], self.labels[index], self.class_names, self.source)

    @property
    def name(self) -> str:
        """What the data is called in the UI: the source's last path component."""
        return Path(self.source).name or self.source

    @property
    def digest(self) -> str:
        """A content digest of pixels, labels and class names (not of file names or times)."""
        if self._digest is None:
            hasher = hashlib.blake2b(digest_size=16)
            hasher.update(np.ascontiguousarray(self.images).data)
            hasher.update(np.ascontiguousarray(self.labels, dtype=np.int64).data)
            hasher.update("\n".join(self.class_names).encode())
            self._digest = hasher.hexdigest()
        return self._digest
