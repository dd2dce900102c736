"""The drift test: statistics that mean what they say, no alarm for more images like the training
data, an alarm for shifted ones (real CIFAR-10 images), and a reference that survives a round trip."""

import numpy as np
import pytest

from pipeline.data.cifar_batches import BATCH_DIR, read_batch
from pipeline.model.drift import (
    FEATURES,
    DriftWindow,
    Reference,
    drift_test,
    image_features,
    reference_sample,
)


def test_the_statistics_of_known_images():
    gray = np.full((1, 32, 32, 3), 128, np.uint8)
    stripes = np.zeros((1, 32, 32, 3), np.uint8)
    stripes[:, :, ::2] = 255
    red = np.zeros((1, 32, 32, 3), np.uint8)
    red[..., 0] = 255
    features = dict(
        zip(FEATURES, image_features(np.concatenate([gray, stripes, red])).T, strict=True)
    )
    np.testing.assert_allclose(features["mean_r"], [128 / 255, 0.5, 1.0], atol=1e-5)
    np.testing.assert_allclose(features["std_g"], [0.0, 0.5, 0.0], atol=1e-5)
    np.testing.assert_allclose(features["edges"], [0.0, 1.0, 0.0], atol=1e-5)  # every step is 0↔1
    np.testing.assert_allclose(features["saturation"], [0.0, 0.0, 1.0], atol=1e-5)
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        image_features(np.zeros((32, 32, 3), np.uint8))


@pytest.fixture(scope="module")
def real_images(real_subset) -> np.ndarray:
    return read_batch(real_subset / BATCH_DIR / "data_batch_1")[0]


def test_held_out_real_images_pass_and_darker_or_blurred_ones_do_not(real_images):
    reference = Reference.from_images(real_images[:700], max_images=700)
    held_out = real_images[700:900]
    assert not drift_test(reference, image_features(held_out)).drift
    darker = (held_out * 0.6).astype(np.uint8)
    result = drift_test(reference, image_features(darker))
    assert result.drift and result.p_value < 1e-6
    assert max(result.statistics, key=result.statistics.get).startswith("mean_")
    grayscale = np.repeat(held_out.mean(axis=3, keepdims=True), 3, axis=3).astype(np.uint8)
    assert drift_test(reference, image_features(grayscale)).p_values["saturation"] < 1e-6


def test_a_sliding_window_notices_a_shift_after_some_dozens_of_images(real_images):
    reference = Reference.from_images(real_images[:700], max_images=700)
    window = DriftWindow(reference, size=200)
    window.add(image_features(real_images[700:900]))
    assert window.full and not window.test().drift
    washed_out = (real_images[900:1000] * 0.6 + 0.4 * 255).astype(np.uint8)
    seen = 0
    for row in image_features(washed_out):
        window.add(row[None])
        seen += 1
        if window.test().drift:
            break
    assert window.test().drift and seen <= 60
    with pytest.raises(ValueError, match="too small"):
        DriftWindow(reference, size=5)


def test_the_reference_round_trips_and_refuses_other_statistics(tmp_path, real_images):
    reference = Reference.from_images(real_images, max_images=300)
    assert len(reference.features) == 300
    reference.save(tmp_path / "reference.npz")
    loaded = Reference.load(tmp_path / "reference.npz")
    assert loaded.digest == reference.digest == Reference.from_images(real_images, 300).digest
    np.savez(tmp_path / "old.npz", features=reference.features[:, :3], names=np.array(FEATURES[:3]))
    with pytest.raises(ValueError, match="log the model again"):
        Reference.load(tmp_path / "old.npz")


def test_the_models_confidence_catches_what_the_pixels_cannot(real_images, tmp_path):
    """Rotated images keep every pixel statistic; a model that is less sure of them does not."""
    rng = np.random.default_rng(0)
    sure = np.full((400, 10), 0.02)
    sure[np.arange(400), rng.integers(0, 10, 400)] = 0.82
    sure[:, 0] += rng.uniform(0, 0.1, 400)  # a spread of top-class probabilities
    reference = Reference.from_images(real_images[:400], probabilities=sure)
    assert reference.statistics[-1] == "confidence" and reference.class_shares.sum() == 1
    rotated = image_features(np.rot90(real_images[700:900], axes=(1, 2)))
    unsure = rng.uniform(0.3, 0.6, 200)
    pixels_only = drift_test(reference, rotated)
    with_outputs = drift_test(reference, rotated, confidence=unsure)
    assert not pixels_only.drift and "confidence" not in pixels_only.p_values
    assert with_outputs.drift and with_outputs.p_values["confidence"] < 1e-6
    window = DriftWindow(reference, size=100)
    window.add(rotated[:100], unsure[:100])
    assert window.test().drift
    reference.save(tmp_path / "reference.npz")
    loaded = Reference.load(tmp_path / "reference.npz")
    assert loaded.digest == reference.digest
    np.testing.assert_array_equal(loaded.confidence, reference.confidence)
    np.savez(tmp_path / "older.npz", features=reference.features, names=np.array(FEATURES))
    assert Reference.load(tmp_path / "older.npz").confidence is None  # pixels only, as logged


def test_the_reference_sample_spans_the_whole_split_in_each_class_share():
    labels = np.repeat(np.arange(4), [2500, 1500, 800, 200])  # listed class by class
    sample = reference_sample(labels, size=2000, seed=0)
    assert len(sample) == len(set(sample)) == 2000 and np.all(np.diff(sample) > 0)
    counts = np.bincount(labels[sample], minlength=4)
    assert list(counts) == [1000, 600, 320, 80]  # each class in its share of the split
    assert sample.max() > 4000  # not the first 2,000
    np.testing.assert_array_equal(sample, reference_sample(labels, size=2000, seed=0))
    assert list(reference_sample(labels[:900], size=2000)) == list(range(900))  # all of a small one


def test_the_class_share_test_is_quiet_at_its_alpha_on_windows_like_the_reference():
    """Windows of 200 and 500 predictions drawn like a 500-image reference's: a two-sample test
    counts the reference's own noise, so false alarms stay near alpha (0.01)."""
    from pipeline.monitor import class_share_test

    rng = np.random.default_rng(0)
    shares = np.array([0.2, 0.15, 0.12, 0.1, 0.1, 0.09, 0.08, 0.07, 0.05, 0.04])
    alarms = 0
    for trial in range(400):
        reference_labels = rng.choice(10, 500, p=shares)
        counts = np.bincount(reference_labels, minlength=10)
        reference = Reference(np.zeros((500, len(FEATURES)), np.float32),
                              np.ones(500, np.float32), (counts / 500).astype(np.float32))  # fmt: skip
        window = rng.choice(10, 200 if trial % 2 else 500, p=shares)
        alarms += class_share_test(window, reference)[1] < 0.01
    assert alarms <= 10, alarms  # 4 expected; 10 of 400 is 2.5%
    shifted = rng.choice(10, 200, p=np.roll(shares, 3))
    assert class_share_test(shifted, reference)[1] < 1e-4
