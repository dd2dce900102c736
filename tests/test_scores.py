"""What evaluate reports and how sure each figure is: the scores against hand-computed values and
scikit-learn, and 95% intervals that cover the truth about 95% of the time."""

import math

import numpy as np
import pytest
from sklearn.metrics import f1_score

from pipeline.model.scores import (
    bootstrap_macro_f1,
    classification_metrics,
    expected_calibration_error,
    macro_f1,
    wilson_interval,
)

NAMES = ("a", "b", "c")
LABELS = np.array([0, 0, 1, 1, 2])
PROBS = np.array(
    [
        [0.7, 0.2, 0.1],  # right, conf 0.7
        [0.2, 0.5, 0.3],  # wrong (b), true class last
        [0.1, 0.8, 0.1],  # right, conf 0.8
        [0.1, 0.9, 0.0],  # right, conf 0.9
        [0.6, 0.1, 0.3],  # wrong (a), true class second
    ]
)


def test_metrics_match_hand_computed_values():
    m = classification_metrics(LABELS, PROBS, NAMES)
    assert m["test_accuracy"] == pytest.approx(3 / 5)
    # predicted [a, b, b, b, a]: precision a=1/2, b=2/3, c=0; recall a=1/2, b=1, c=0.
    assert m["test_precision_macro"] == pytest.approx((1 / 2 + 2 / 3 + 0) / 3)
    assert m["test_recall_macro"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    f1_b = 2 * (2 / 3) * 1 / (2 / 3 + 1)
    assert m["test_f1_macro"] == pytest.approx((0.5 + f1_b + 0) / 3)
    assert m["test_f1_b"] == pytest.approx(f1_b) and m["test_recall_c"] == 0
    assert m["test_top2_accuracy"] == pytest.approx(4 / 5)
    expected_loss = -np.mean(np.log([0.7, 0.2, 0.8, 0.9, 0.3]))
    assert m["test_log_loss"] == pytest.approx(expected_loss)
    # Bins of width 1/15: 0.5, 0.6, 0.7, 0.8, 0.9 fall in five different bins.
    gaps = [abs(1 - 0.7), abs(0 - 0.5), abs(1 - 0.8), abs(1 - 0.9), abs(0 - 0.6)]
    assert m["test_ece"] == pytest.approx(sum(gaps) / 5)


def test_metrics_work_for_two_classes():
    labels = np.array([0, 1, 1, 0])
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    metrics = classification_metrics(labels, probabilities, ("cat", "dog"))
    assert metrics["test_accuracy"] == 0.5 and metrics["test_top2_accuracy"] == 1.0
    assert {"test_f1_cat", "test_f1_dog"} <= set(metrics)


def test_ece_is_zero_for_perfect_calibration():
    probs = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(probs, np.array([0, 1])) == 0
    assert math.isclose(expected_calibration_error(probs, np.array([1, 0])), 1.0)


def test_wilson_gives_the_textbook_intervals_and_stays_inside_zero_and_one():
    assert wilson_interval(50, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_a_95_percent_interval_covers_the_true_accuracy_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    for truth, images in ((0.9, 50), (0.6, 1000)):
        hits = rng.binomial(images, truth, size=4000)
        covered = np.mean([low <= truth <= high for low, high in
                           (wilson_interval(int(h), images) for h in hits)])  # fmt: skip
        assert 0.93 <= covered <= 0.98, (truth, images, covered)  # discreteness moves it


def test_the_bootstrap_interval_holds_the_macro_f1_narrows_with_more_images_and_repeats():
    rng = np.random.default_rng(1)

    def noisy_predictions(images: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, 10, images)
        wrong = rng.random(images) < 0.3
        return labels, np.where(wrong, rng.integers(0, 10, images), labels)

    labels, predicted = noisy_predictions(500)
    point = f1_score(labels, predicted, average="macro")
    confusion = np.bincount(labels * 10 + predicted, minlength=100).reshape(10, 10)
    assert macro_f1(confusion) == pytest.approx(point)
    low, high = bootstrap_macro_f1(labels, predicted, 10)
    assert low < point < high and (low, high) == bootstrap_macro_f1(labels, predicted, 10)
    big_low, big_high = bootstrap_macro_f1(*noisy_predictions(5000), 10)
    assert big_high - big_low < 0.5 * (high - low)


def test_every_reported_proportion_has_its_interval_around_it():
    m = classification_metrics(LABELS, PROBS, NAMES)
    for name in ("test_accuracy", "test_f1_macro", "test_recall_a", "test_recall_c"):
        assert m[f"{name}_ci_low"] <= m[name] <= m[f"{name}_ci_high"], name
    assert (m["test_accuracy_ci_low"], m["test_accuracy_ci_high"]) == wilson_interval(3, 5)
