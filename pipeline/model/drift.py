"""Has the model started to see images unlike its training data? A few statistics per image, and
the model's confidence in its answer, compared between a sliding window of recent images and a
reference sample with two-sample Kolmogorov-Smirnov tests (one per statistic, Bonferroni-combined).

The image statistics are cheap (no model call) and catch what goes wrong with cameras and clients:
a darker or brighter scene (channel means), washed-out or clipped contrast (channel spreads), blur,
noise and resampling (edge energy), and grayscale or colour-cast input (saturation). The top-class
probability catches what leaves those alone but puzzles the network (a rotated camera, another kind
of picture); its reference comes from held-out validation images, where the network is as sure as
it will be on new images, not from the training images it has memorized. Defaults come from
benchmarks/drift_calibration.py on real CIFAR-10 images.
"""

from __future__ import annotations

import hashlib
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FEATURES = ("mean_r", "mean_g", "mean_b", "std_r", "std_g", "std_b", "edges", "saturation")
CONFIDENCE = "confidence"  # the model's top-class probability, beside the image statistics
DEFAULT_WINDOW = 200
MIN_WINDOW = 20  # fewer images than this are not tested
DEFAULT_ALPHA = 0.01
REFERENCE_IMAGES = 2000
REFERENCE_ARTIFACT = "drift_reference"
# How the reference's images were chosen. Models logged before the sampling was recorded took the
# first 2,000 validation images for their outputs: on a split longer than that (any full-size data
# set) those describe whichever classes come first, and the class-share test cries wolf.
SAMPLED = "a seeded random sample across the validation split, stratified by class"
TRAINING_ONLY = "a seeded random sample of the training images (the run had no validation split)"
FIRST_IMAGES = "the first 2,000 validation images (outputs) and random training images (pixels)"
OLD_REFERENCE_NOTE = (
    "note: {model}'s drift reference was drawn the old way ({how}), so its class-share and "
    "confidence tests can call unshifted images drift on a data set of over 2,000 validation "
    "images; retrain it (mlflow run . -e train) to draw the reference across the whole split."
)


def reference_sample(labels: np.ndarray, size: int = REFERENCE_IMAGES, seed: int = 0) -> np.ndarray:
    """Sorted indices of `size` images drawn at random across a split, each class in its share of
    the split (the whole split when it is no larger)."""
    labels = np.asarray(labels)
    if len(labels) <= size:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quotas = np.floor(counts * size / len(labels)).astype(int)
    remainders = counts * size / len(labels) - quotas
    quotas[np.argsort(-remainders, kind="stable")[: size - quotas.sum()]] += 1
    chosen = [
        rng.choice(np.flatnonzero(labels == c), quota, replace=False)
        for c, quota in zip(classes, quotas, strict=True)
    ]
    return np.sort(np.concatenate(chosen))


def image_features(images: np.ndarray) -> np.ndarray:
    """(N, len(FEATURES)) float32 statistics of uint8 NHWC images, in [0, 1] units."""
    pixels = np.asarray(images, dtype=np.float32) / 255.0
    if pixels.ndim != 4 or pixels.shape[-1] != 3:
        raise ValueError(f"expected uint8 images shaped (N, H, W, 3), got {pixels.shape}")
    means = pixels.mean(axis=(1, 2))
    spreads = pixels.std(axis=(1, 2))
    gray = pixels.mean(axis=3)
    edges = np.abs(np.diff(gray, axis=1)).mean(axis=(1, 2)) + np.abs(np.diff(gray, axis=2)).mean(
        axis=(1, 2)
    )
    saturation = (pixels.max(axis=3) - pixels.min(axis=3)).mean(axis=(1, 2))
    return np.column_stack([means, spreads, edges, saturation]).astype(np.float32)


@dataclass(frozen=True)
class Reference:
    """What the logged model carries: statistics of a sample of images and, where the run had a
    validation split, the network's top-class probability and predicted-class shares on the same
    images: `sample` are their indices in that split, `sampling` says how they were drawn."""

    features: np.ndarray
    confidence: np.ndarray | None = None
    class_shares: np.ndarray | None = None
    sample: np.ndarray | None = None
    sampling: str = SAMPLED

    @classmethod
    def from_images(
        cls,
        images: np.ndarray,
        max_images: int = REFERENCE_IMAGES,
        seed: int = 0,
        probabilities: np.ndarray | None = None,
    ) -> Reference:
        """`probabilities`: the network's softmax outputs on the same `images`, when known."""
        rng = np.random.default_rng(seed)
        chosen = np.sort(rng.permutation(len(images))[:max_images])
        if probabilities is None or not len(probabilities):
            return cls(image_features(images[chosen]), sample=chosen)
        probabilities = np.asarray(probabilities, dtype=np.float64)[chosen]
        shares = np.bincount(probabilities.argmax(1), minlength=probabilities.shape[1])
        return cls(
            image_features(images[chosen]),
            probabilities.max(1).astype(np.float32),
            (shares / shares.sum()).astype(np.float32),
            chosen,
        )

    @property
    def class_counts(self) -> np.ndarray | None:
        """The predicted classes counted over the reference's images (the class-share test's)."""
        if self.class_shares is None or self.confidence is None:
            return None
        return np.round(self.class_shares.astype(np.float64) * len(self.confidence))

    @property
    def drawn_the_old_way(self) -> bool:
        return self.sampling == FIRST_IMAGES

    @property
    def statistics(self) -> tuple[str, ...]:
        return FEATURES + ((CONFIDENCE,) if self.confidence is not None else ())

    @property
    def digest(self) -> str:
        parts = [self.features] + [a for a in (self.confidence, self.class_shares) if a is not None]
        hashed = hashlib.sha256()
        for part in parts:
            hashed.update(np.ascontiguousarray(part).tobytes())
        return hashed.hexdigest()[:16]

    def save(self, path: Path) -> None:
        outputs = {}
        if self.confidence is not None:
            outputs = {"confidence": self.confidence, "class_shares": self.class_shares}
        if self.sample is not None:
            outputs["sample"] = self.sample
        np.savez_compressed(path, features=self.features, names=np.array(FEATURES),
                            sampling=np.array(self.sampling), **outputs)  # fmt: skip

    @classmethod
    def load(cls, path: Path) -> Reference:
        with np.load(path) as saved:
            if tuple(saved["names"]) != FEATURES:
                raise ValueError(
                    f"{path} holds statistics {tuple(saved['names'])}, this code computes "
                    f"{FEATURES}; log the model again to refresh its drift reference."
                )
            sampling = str(saved["sampling"]) if "sampling" in saved else FIRST_IMAGES
            sample = saved.get("sample")
            if "confidence" not in saved:  # logged before the confidence test existed
                return cls(saved["features"], sample=sample, sampling=sampling)
            return cls(saved["features"], saved["confidence"], saved["class_shares"], sample,
                       sampling)  # fmt: skip


@dataclass(frozen=True)
class DriftResult:
    """Each statistic's KS distance and p-value, and the Bonferroni-combined verdict."""

    statistics: dict[str, float]
    p_values: dict[str, float]
    p_value: float
    drift: bool


def drift_test(
    reference: Reference,
    window: np.ndarray,
    alpha: float = DEFAULT_ALPHA,
    confidence: np.ndarray | None = None,
) -> DriftResult:
    """Compare the statistics of `window` (from image_features) with the reference's, and the
    model's top-class probabilities on those images (`confidence`) where both have them."""
    from scipy import stats  # here: the CLI imports this module's defaults and should start fast

    samples = {name: (window[:, column], reference.features[:, column])
               for column, name in enumerate(FEATURES)}  # fmt: skip
    if confidence is not None and reference.confidence is not None:
        known = confidence[~np.isnan(confidence)]
        if len(known) >= MIN_WINDOW:
            samples[CONFIDENCE] = (known, reference.confidence)
    distances, p_values = {}, {}
    for name, (recent, expected) in samples.items():
        result = stats.ks_2samp(recent, expected)
        distances[name], p_values[name] = float(result.statistic), float(result.pvalue)
    combined = min(1.0, min(p_values.values()) * len(samples))
    return DriftResult(distances, p_values, combined, combined < alpha)


class DriftWindow:
    """The statistics of the last `size` images and the model's confidence in each, tested against
    the reference on demand (request threads add while a scrape tests, hence the lock)."""

    def __init__(
        self, reference: Reference, size: int = DEFAULT_WINDOW, alpha: float = DEFAULT_ALPHA
    ):
        if size < MIN_WINDOW:
            raise ValueError(
                f"a drift window of {size} images is too small to test; use {MIN_WINDOW} or more."
            )
        self.reference, self.alpha, self.size = reference, alpha, size
        self.rows: deque[np.ndarray] = deque(maxlen=size)
        self.lock = threading.Lock()

    def add(self, features: np.ndarray, confidence: np.ndarray | None = None) -> None:
        """`confidence`: the top-class probability of each image (NaN or None: not known)."""
        known = np.full(len(features), np.nan) if confidence is None else confidence
        rows = np.column_stack([features, known])
        with self.lock:
            self.rows.extend(rows)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def full(self) -> bool:
        return len(self.rows) == self.size

    def test(self) -> DriftResult:
        with self.lock:
            window = np.array(self.rows)
        return drift_test(self.reference, window[:, :-1], self.alpha, window[:, -1])
