"""How often the drift test cries wolf on images like the training data, and how many shifted
images it needs to notice a shift: the numbers behind pipeline/model/drift.py's defaults.

On the real 5,085-image subset: a reference from 2,000 of 4,000 "training" images, held-out windows
from the other 1,085. False alarms: `--windows` random held-out windows per window size and alpha.
Detection: a window full of held-out images, then shifted held-out images one at a time (one per
request) until the test says drift, `--trials` orders per shift; "not seen" if a whole window of
shifted images passes. Shifts: darker, washed out, blurred, noisy, grayscale, rotated by 90°, and
images of another kind (32x32 crops of scikit-learn's two sample photos).

    python -m benchmarks.drift_calibration [--windows 400] [--trials 10]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from sklearn.datasets import load_sample_images

from benchmarks.machine import machine
from pipeline.data.cifar_batches import BATCH_DIR, load_cifar_batches
from pipeline.model.drift import DriftWindow, Reference, drift_test, image_features

SUBSET = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-subset" / BATCH_DIR


def other_photos(count: int, rng: np.random.Generator) -> np.ndarray:
    photos = load_sample_images().images
    crops = []
    for _ in range(count):
        photo = photos[rng.integers(len(photos))]
        size = int(rng.integers(48, 160))
        y, x = rng.integers(0, photo.shape[0] - size), rng.integers(0, photo.shape[1] - size)
        patch = Image.fromarray(photo[y : y + size, x : x + size]).resize((32, 32), Image.BILINEAR)
        crops.append(np.asarray(patch))
    return np.stack(crops)


def shifted(images: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    pixels = images.astype(np.float32)
    if kind == "darker":
        pixels = pixels * 0.6
    elif kind == "washed_out":
        pixels = pixels * 0.6 + 0.4 * 255
    elif kind == "blurred":
        pixels = ndimage.uniform_filter(pixels, size=(1, 3, 3, 1))
    elif kind == "noisy":
        pixels = pixels + rng.normal(0, 15, pixels.shape)
    elif kind == "grayscale":
        pixels = np.repeat(pixels.mean(axis=3, keepdims=True), 3, axis=3)
    elif kind == "rotated":
        pixels = np.rot90(pixels, axes=(1, 2))
    elif kind == "other_photos":
        return other_photos(len(images), rng)
    return np.clip(pixels, 0, 255).astype(np.uint8)


SHIFTS = ("darker", "washed_out", "blurred", "noisy", "grayscale", "rotated", "other_photos")


def false_alarm_rate(reference, held_out, window, alpha, windows, rng) -> float:
    alarms = 0
    for _ in range(windows):
        chosen = rng.choice(len(held_out), window, replace=False)
        alarms += drift_test(reference, held_out[chosen], alpha).drift
    return alarms / windows


def images_to_detection(reference, held_out, shifted_features, window, alpha, rng) -> int | None:
    watch = DriftWindow(reference, window, alpha)
    watch.add(held_out[rng.choice(len(held_out), window, replace=False)])
    for seen, row in enumerate(
        shifted_features[rng.permutation(len(shifted_features))][:window], 1
    ):
        watch.add(row[None])
        if watch.test().drift:
            return seen
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=400)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--out", default="benchmarks/results/drift_cpu.jsonl")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    images = load_cifar_batches(SUBSET, tuple(f"data_batch_{i}" for i in range(1, 6))).images
    order = rng.permutation(len(images))
    train, held_out_images = images[order[:4000]], images[order[4000:]]
    reference = Reference.from_images(train)
    held_out = image_features(held_out_images)
    shifts = {kind: image_features(shifted(held_out_images, kind, rng)) for kind in SHIFTS}

    rows = []
    for window in (100, 200, 400):
        for alpha in (0.01, 0.05):
            row = {"window": window, "alpha": alpha,
                   "false_alarm_rate": false_alarm_rate(reference, held_out, window, alpha,
                                                        args.windows, rng)}  # fmt: skip
            for kind, features in shifts.items():
                counts = [
                    images_to_detection(reference, held_out, features, window, alpha, rng)
                    for _ in range(args.trials)
                ]
                seen = [c for c in counts if c is not None]
                row[kind] = {"median_images": float(np.median(seen)) if seen else None,
                             "seen": f"{len(seen)}/{len(counts)}"}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)

    one = held_out_images[:1]
    started = time.perf_counter()
    for _ in range(2000):
        image_features(one)
    features_us = (time.perf_counter() - started) / 2000 * 1e6
    watch = DriftWindow(reference)
    watch.add(held_out[:200])
    started = time.perf_counter()
    for _ in range(200):
        watch.test()
    test_ms = (time.perf_counter() - started) / 200 * 1e3
    record = {
        "benchmark": "drift_calibration",
        **machine(),
        "reference_images": len(reference.features),
        "held_out_images": len(held_out),
        "windows_per_setting": args.windows,
        "trials_per_shift": args.trials,
        "features_per_image_us": round(features_us, 1),
        "test_of_a_200_window_ms": round(test_ms, 3),
        "rows": rows,
    }
    with open(args.out, "a") as out:
        out.write(json.dumps(record) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k != "rows"}, indent=2))


if __name__ == "__main__":
    main()
