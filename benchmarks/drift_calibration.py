"""How often the drift test cries wolf on images like the training data, and how many shifted
images it needs to notice a shift: the numbers behind pipeline/model/drift.py's defaults.

On the real 5,085-image subset (`--data subset`): the real `train` command fits `fastnet` on 4,000
of them, and the windows come from the other 1,085, scored by that logged model. On the full set
(`--data full`, the 50,000 JPEGs): it trains on 45,000 (4,500 of them its validation split, over
the 2,000 images a reference holds) and the windows come from the other 5,000. The reference is
what the model logged: up to 2,000 images drawn across its validation split. False alarms:
`--windows` random held-out windows per window size and alpha. Detection: a window full of held-out
images, then shifted held-out images one at a time (one per request) until the test says drift,
`--trials` orders per shift; "not seen" if a whole window of shifted images passes. Shifts: darker,
washed out, blurred, noisy, grayscale, rotated by 90°, and images of another kind (32x32 crops of
scikit-learn's two sample photos). Each setting twice: the image statistics alone, and with the
model's confidence (what the server tests), and once more as `monitor` tests a window: those and
the predicted-class shares against the reference's (a chi-square test of homogeneity), where
detection is the share of whole shifted windows called drift.

    python -m benchmarks.drift_calibration [--data subset|full] [--windows 400] [--trials 10]
        [--epochs 10 | --time-budget 5m] [--window-sizes 100 200 400]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from sklearn.datasets import load_sample_images

from benchmarks.machine import machine
from pipeline.data.cifar_batches import BATCH_DIR, load_cifar_batches, write_batch, write_meta
from pipeline.model.classifier import predict_probabilities
from pipeline.model.drift import DriftWindow, drift_test, image_features

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SUBSET = SHARED / "cifar10-subset" / BATCH_DIR
JPEG_ARCHIVE = SHARED / "cifar10-jpeg" / "train.tar.gz"


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
    """`held_out`: (features, confidence or None) of images like the training data."""
    features, confidence = held_out
    alarms = 0
    for _ in range(windows):
        chosen = rng.choice(len(features), window, replace=False)
        picked = None if confidence is None else confidence[chosen]
        alarms += drift_test(reference, features[chosen], alpha, picked).drift
    return alarms / windows


def monitor_verdict(reference, scored, chosen, alpha) -> bool:
    """`monitor`'s verdict on the window `chosen` of `scored` (features, confidence, labels)."""
    from pipeline.monitor import class_share_test

    features, confidence, labels = scored
    live = drift_test(reference, features[chosen], alpha, confidence[chosen])
    shares_p = class_share_test(labels[chosen], reference)[1]
    p_values = [*live.p_values.values(), shares_p]
    return min(1.0, min(p_values) * len(p_values)) < alpha


def monitor_rows(reference, scored, sizes, windows, trials, rng) -> list[dict]:
    rows = []
    held = scored["held_out"]
    for window in sizes:
        for alpha in (0.01, 0.05):
            alarms = sum(
                monitor_verdict(reference, held, rng.choice(len(held[0]), window, replace=False),
                                alpha)
                for _ in range(windows)
            )  # fmt: skip
            row = {"tests": "monitor: image statistics + confidence + class shares",
                   "window": window, "alpha": alpha, "false_alarm_rate": alarms / windows}  # fmt: skip
            for kind in SHIFTS:
                seen = sum(
                    monitor_verdict(reference, scored[kind],
                                    rng.choice(len(scored[kind][0]), window, replace=False), alpha)
                    for _ in range(trials)
                )  # fmt: skip
                row[kind] = {"windows_called_drift": f"{seen}/{trials}"}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def images_to_detection(reference, held_out, shifted, window, alpha, rng) -> int | None:
    watch = DriftWindow(reference, window, alpha)
    chosen = rng.choice(len(held_out[0]), window, replace=False)
    watch.add(held_out[0][chosen], None if held_out[1] is None else held_out[1][chosen])
    for seen, row in enumerate(rng.permutation(len(shifted[0]))[:window], 1):
        watch.add(shifted[0][row][None], None if shifted[1] is None else shifted[1][row][None])
        if watch.test().drift:
            return seen
    return None


def trained_model(
    images: np.ndarray, labels: np.ndarray, epochs: int, time_budget: str, root: Path
):
    """The real `train` command on these images (fastnet's recipe), in a store of its own."""
    import mlflow

    from pipeline.config import resolve_train_config
    from pipeline.train import run_train

    batch_dir = root / "data" / BATCH_DIR
    batch_dir.mkdir(parents=True)
    write_batch(batch_dir / "data_batch_1", images, labels)
    write_meta(batch_dir)
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    mlflow.create_experiment("drift", artifact_location=str(root / "artifacts"))
    config = resolve_train_config({"model": "fastnet", "data_dir": str(root / "data"),
                                   "epochs": epochs, "time_budget": time_budget,
                                   "experiment_name": "drift"})  # fmt: skip
    trained = run_train(config)
    return mlflow.pyfunc.load_model(trained.model_uri), trained.best_val_accuracy


def outputs_of(classifier, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The served model's top-class probability and predicted class for each image."""
    meta = classifier.meta
    probabilities = predict_probabilities(classifier.model, images, meta["mean"], meta["std"], True)
    return probabilities.max(axis=1), probabilities.argmax(axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=400)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--time-budget", default="", help="train to a time instead (e.g. 5m)")
    parser.add_argument("--data", choices=("subset", "full"), default="subset")
    parser.add_argument("--window-sizes", type=int, nargs="+", default=[100, 200, 400])
    parser.add_argument("--out", default="benchmarks/results/drift_cpu.jsonl")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    if args.data == "full":
        from pipeline.data.sources import load_training_set

        data = load_training_set(JPEG_ARCHIVE)
        held_count = 5000
    else:
        data = load_cifar_batches(SUBSET, tuple(f"data_batch_{i}" for i in range(1, 6)))
        held_count = len(data.images) - 4000
    order = rng.permutation(len(data.images))
    train, held_out_images = order[:-held_count], order[-held_count:]
    with tempfile.TemporaryDirectory() as tmp:
        model, val_accuracy = trained_model(
            data.images[train], data.labels[train], args.epochs, args.time_budget, Path(tmp)
        )
        classifier = model.unwrap_python_model()
        reference = classifier.reference
        held = data.images[held_out_images]
        sets = {"held_out": held} | {kind: shifted(held, kind, rng) for kind in SHIFTS}
        scored = {k: (image_features(v), *outputs_of(classifier, v)) for k, v in sets.items()}
        held_accuracy = float((scored["held_out"][2] == data.labels[held_out_images]).mean())

    rows = []
    for tests in ("image statistics", "image statistics + confidence"):
        with_confidence = tests.endswith("confidence")
        chosen = {k: (f, c if with_confidence else None) for k, (f, c, _) in scored.items()}
        for window in args.window_sizes:
            for alpha in (0.01, 0.05):
                row = {"tests": tests, "window": window, "alpha": alpha,
                       "false_alarm_rate": false_alarm_rate(reference, chosen["held_out"], window,
                                                            alpha, args.windows, rng)}  # fmt: skip
                for kind in SHIFTS:
                    counts = [
                        images_to_detection(
                            reference, chosen["held_out"], chosen[kind], window, alpha, rng
                        )
                        for _ in range(args.trials)
                    ]
                    seen = [c for c in counts if c is not None]
                    row[kind] = {"median_images": float(np.median(seen)) if seen else None,
                                 "seen": f"{len(seen)}/{len(counts)}"}  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
    rows += monitor_rows(reference, scored, args.window_sizes, args.windows, args.trials, rng)

    one = held[:1]
    started = time.perf_counter()
    for _ in range(2000):
        image_features(one)
    features_us = (time.perf_counter() - started) / 2000 * 1e6
    watch = DriftWindow(reference)
    watch.add(scored["held_out"][0][:200], scored["held_out"][1][:200])
    started = time.perf_counter()
    for _ in range(200):
        watch.test()
    test_ms = (time.perf_counter() - started) / 200 * 1e3
    record = {
        "benchmark": "drift_calibration",
        **machine(),
        "model": f"fastnet, {args.time_budget or f'{args.epochs} epochs'} on {len(train):,} "
        f"{args.data} images",
        "val_accuracy": round(val_accuracy, 4),
        "held_out_accuracy": round(held_accuracy, 4),
        "reference_images": len(reference.features),
        "reference_confidence_images": len(reference.confidence),
        "reference_sampling": reference.sampling,
        "held_out_images": len(held),
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
