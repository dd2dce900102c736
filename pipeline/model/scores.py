"""What `evaluate` reports of a model's answers on labelled images, and how sure each figure is.

scikit-learn's standard scores, the expected calibration error, per-class precision, recall and F1,
and 95% intervals. A proportion (accuracy, one class's recall) gets Wilson's score interval, which stays inside [0, 1]
and keeps its coverage on small sets and near 0 or 1, where the normal approximation does not. A
macro figure (the mean F1 over classes) has no closed form, so it gets a seeded percentile
bootstrap over the test images.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import accuracy_score, log_loss, precision_recall_fscore_support

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
BOOTSTRAP_ROUNDS = 1000
WILSON = "Wilson score interval"
BOOTSTRAP = f"percentile bootstrap, {BOOTSTRAP_ROUNDS} seeded resamples of the test images"
ECE_BINS = 15
INTERVALS_NOTE = (
    f"95% intervals: accuracy and each class's recall by the {WILSON}; macro F1 by {BOOTSTRAP}"
)


def wilson_interval(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """The 95% Wilson score interval of `successes` out of `trials` ((0, 1) with no trials)."""
    if trials == 0:
        return 0.0, 1.0
    share = successes / trials
    spread = z * z / trials
    centre = (share + spread / 2) / (1 + spread)
    half = z * math.sqrt(share * (1 - share) / trials + spread / (4 * trials)) / (1 + spread)
    # At 0 or all successes a bound is exactly 0 or 1; computed, it can miss by a rounding error.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    return low, 1.0 if successes == trials else min(1.0, centre + half)


def macro_f1(confusion: np.ndarray) -> float:
    """The mean over classes of F1 from a confusion matrix (rows: true, columns: predicted); a
    class never seen nor predicted scores 0, as scikit-learn's `zero_division=0` does."""
    hits = np.diag(confusion).astype(float)
    denominators = confusion.sum(axis=0) + confusion.sum(axis=1)
    f1 = np.divide(2 * hits, denominators, out=np.zeros_like(hits), where=denominators > 0)
    return float(f1.mean())


def bootstrap_macro_f1(
    labels: np.ndarray,
    predicted: np.ndarray,
    classes: int,
    rounds: int = BOOTSTRAP_ROUNDS,
    seed: int = 0,
) -> tuple[float, float]:
    """The 95% percentile-bootstrap interval of the macro F1 of `predicted` against `labels`."""
    codes = labels.astype(np.int64) * classes + predicted
    rng = np.random.default_rng(seed)
    scores = np.empty(rounds)
    for round_ in range(rounds):
        drawn = codes[rng.integers(0, len(codes), len(codes))]
        scores[round_] = macro_f1(
            np.bincount(drawn, minlength=classes * classes).reshape(classes, classes)
        )
    low, high = np.percentile(scores, [2.5, 97.5])
    return float(low), float(high)


def interval_metrics(
    labels: np.ndarray, predicted: np.ndarray, class_names: tuple[str, ...]
) -> dict[str, float]:
    """`test_accuracy`, `test_f1_macro` and each `test_recall_<class>` as `..._ci_low` and
    `..._ci_high`: 95% intervals (Wilson; the bootstrap for the macro F1)."""
    correct = predicted == labels
    low, high = wilson_interval(int(correct.sum()), len(labels))
    metrics = {"test_accuracy_ci_low": low, "test_accuracy_ci_high": high}
    low, high = bootstrap_macro_f1(labels, predicted, len(class_names))
    metrics |= {"test_f1_macro_ci_low": low, "test_f1_macro_ci_high": high}
    for index, name in enumerate(class_names):
        members = labels == index
        low, high = wilson_interval(int(correct[members].sum()), int(members.sum()))
        metrics |= {f"test_recall_{name}_ci_low": low, f"test_recall_{name}_ci_high": high}
    return metrics


def calibration_bins(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS):
    """Per equal-width confidence bin: its share of samples, accuracy and mean confidence
    (NaN for an empty bin). The one binning behind both the ECE and the reliability diagram."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    share, accuracy, mean_confidence = np.zeros(bins), np.full(bins, np.nan), np.full(bins, np.nan)
    for b in range(bins):
        members = which == b
        if members.any():
            share[b] = members.mean()
            accuracy[b] = correct[members].mean()
            mean_confidence[b] = confidence[members].mean()
    return share, accuracy, mean_confidence


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS):
    """Weighted mean gap between confidence and accuracy over equal-width confidence bins."""
    share, accuracy, confidence = calibration_bins(probabilities, labels, bins)
    filled = share > 0
    return float(np.sum(share[filled] * np.abs(accuracy[filled] - confidence[filled])))


def classification_metrics(
    labels: np.ndarray, probabilities: np.ndarray, class_names: tuple[str, ...]
) -> dict[str, float]:
    """The `test_*` metrics: scikit-learn's standard scores plus ECE, per-class P/R/F1, and 95%
    intervals (`..._ci_low`, `..._ci_high`) of the accuracy, the macro F1 and each class's recall."""
    # Softmax rows computed in float32 sum to 1 only within ~1e-7; scikit-learn's log_loss warns.
    probabilities = probabilities / probabilities.sum(axis=1, keepdims=True)
    predicted = probabilities.argmax(axis=1)
    classes = np.arange(len(class_names))
    precision, recall, f1, _ = precision_recall_fscore_support(
        labels, predicted, labels=classes, average="macro", zero_division=0
    )
    metrics = {
        "test_accuracy": accuracy_score(labels, predicted),
        "test_precision_macro": precision,
        "test_recall_macro": recall,
        "test_f1_macro": f1,
        # By hand: scikit-learn's top_k_accuracy_score refuses two classes given as two columns.
        "test_top2_accuracy": np.mean(
            (np.argsort(-probabilities, axis=1)[:, :2] == labels[:, None]).any(axis=1)
        ),
        "test_log_loss": log_loss(labels, probabilities, labels=classes),
        "test_ece": expected_calibration_error(probabilities, labels),
    }
    per_class = precision_recall_fscore_support(
        labels, predicted, labels=classes, average=None, zero_division=0
    )
    for name, p, r, f in zip(class_names, *per_class[:3], strict=True):
        metrics |= {f"test_precision_{name}": p, f"test_recall_{name}": r, f"test_f1_{name}": f}
    metrics |= interval_metrics(labels, predicted, class_names)
    return {k: float(v) for k, v in metrics.items()}


def ci_text(metrics: dict[str, float], name: str) -> str:
    return f"{metrics[name + '_ci_low']:.3f}-{metrics[name + '_ci_high']:.3f}"
