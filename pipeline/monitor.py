"""The `monitor` stage: do recent images still look like what the model was trained for?

It compares a window of the serving inference log (or a folder of images, scored here through the
model's own predict) with the drift reference the logged model carries: the live server's tests on
the image statistics and the model's confidence (pipeline/model/drift.py), plus a chi-square test
of the predicted-class shares, which a live window is too small for. The run records every
statistic and p-value, the class shares, a plot and a `verdict` tag; with `fail_on_drift` a drift
verdict also exits non-zero, for a scheduled job.
"""

from __future__ import annotations

import io
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import mlflow
import numpy as np
import pandas as pd
from scipy import stats

from pipeline.config import ConfigError, MonitorConfig, config_to_params
from pipeline.data.inputs import list_inputs, read_bytes
from pipeline.data.log_store import LOG_FILES, open_store
from pipeline.errors import PipelineError, in_users_form
from pipeline.model.classifier import IMAGE_COLUMN, Observation
from pipeline.model.drift import (
    CONFIDENCE,
    FEATURES,
    MIN_WINDOW,
    OLD_REFERENCE_NOTE,
    DriftResult,
    Reference,
    drift_test,
)
from pipeline.tracking.model_logging import default_tta
from pipeline.tracking.runs import (
    describe_run,
    load_logged_model,
    log_figure,
    log_json,
    log_resolved_params,
    print_summary,
    source_name,
    stage_run,
)

CLASS_SHARES = "class_shares"
# What a shifted statistic usually means, for the summary.
MEANINGS = {
    "mean": "brightness or colour balance",
    "std": "contrast",
    "edges": "sharpness or noise",
    "saturation": "colour (grayscale or tinted input)",
    CONFIDENCE: "how sure the model is (new kinds of pictures, another orientation)",
    CLASS_SHARES: "which classes are predicted",
}


class DriftFound(PipelineError):
    """The verdict was drift and `fail_on_drift` asked for a failing exit."""


@dataclass
class Window:
    """What is compared: per image its statistics, the model's top-class probability and its
    predicted class; `models` the name:version pairs that answered (inference log only)."""

    features: np.ndarray
    confidence: np.ndarray
    labels: np.ndarray
    kind: str
    models: list[str]


@dataclass
class MonitorResult:
    run_id: str
    drift: bool
    p_values: dict[str, float]


def is_inference_log(source: str) -> bool:
    path = Path(source).expanduser()
    return (
        source.startswith("s3://")
        or path.suffix == ".parquet"
        or (path.is_dir() and any(path.glob(LOG_FILES)))
    )


def read_log_window(source: str, window: int) -> Window:
    """The most recent `window` rows of the inference log (0: all of it)."""
    path = Path(source).expanduser()
    store = open_store(str(path.parent) if path.suffix == ".parquet" else source)
    names = [path.name] if path.suffix == ".parquet" else store.names()
    frames, rows = [], 0
    for name in reversed(names):
        try:
            frame = pd.read_parquet(io.BytesIO(store.read(name)))
        except Exception as error:
            raise PipelineError(
                f"{name} is not a readable inference-log file ({str(error)[:120]}); move it out "
                "of the log folder and run monitor again."
            ) from None
        frames.insert(0, frame)
        rows += len(frame)
        if window and rows >= window:
            break
    if not frames:
        raise ConfigError(
            f"{source} holds no inference-log files ({LOG_FILES}); serve with "
            "-P inference_log=<folder or s3://bucket/prefix> first, or pass a folder of images."
        )
    table = pd.concat(frames, ignore_index=True).tail(window or None)
    models = sorted(
        {f"{n}:{v}" for n, v in zip(table.model_name, table.model_version, strict=True)}
    )
    return Window(
        table[list(FEATURES)].to_numpy(np.float64),
        table["confidence"].to_numpy(np.float64),
        table["label"].to_numpy(np.int64),
        "the inference log",
        models,
    )


def score_images(model: mlflow.pyfunc.PyFuncModel, config: MonitorConfig) -> Window:
    """Score a folder, archive or glob through the model's predict, watching it as the server
    does (a classifier observer), so the statistics are the ones the server computes."""
    classifier = model.unwrap_python_model()
    seen: list[Observation] = []
    classifier.observers.append(seen.append)
    files = list_inputs(config.source).files
    files = files[-config.window :] if config.window else files
    tta = default_tta(model)
    try:
        for start in range(0, len(files), config.batch_size):
            contents = [read_bytes(path) for path in files[start : start + config.batch_size]]
            frame = pd.DataFrame(
                {IMAGE_COLUMN: [c if isinstance(c, bytes) else b"" for c in contents]}
            )
            model.predict(frame, params={"tta": tta, "on_error": "report"})
    finally:
        classifier.observers.remove(seen.append)
    if not seen:
        raise ConfigError(f"{config.source} holds no readable PNG or JPEG images to compare.")
    labels = [o.result["label"].to_numpy() for o in seen]
    return Window(
        np.concatenate([o.features for o in seen]),
        np.concatenate([o.confidence for o in seen]),
        np.concatenate([label[label >= 0] for label in labels]),
        "a folder of images",
        [],
    )


def class_share_test(labels: np.ndarray, reference: Reference) -> tuple[np.ndarray, float]:
    """The window's predicted-class shares, and the p-value of a chi-square test of homogeneity
    between its counts and the reference's: two samples, so the reference's own sampling noise is
    counted (a test against its shares as if exact cries wolf when the reference is small)."""
    classes = len(reference.class_shares)
    counts = np.bincount(labels, minlength=classes)[:classes]
    table = np.vstack([counts, reference.class_counts])
    table = table[:, table.sum(axis=0) > 0]  # a class neither predicted says nothing
    if table.shape[1] < 2 or table.sum(axis=1).min() == 0:
        return counts / max(counts.sum(), 1), 1.0
    return counts / max(counts.sum(), 1), float(stats.chi2_contingency(table).pvalue)


def plot_drift(
    reference: Reference,
    window: Window,
    result: DriftResult,
    shares: np.ndarray,
    class_names: list[str],
    verdict: str,
    alpha: float,
):
    """One page: each test's p-value against its threshold, the most shifted statistic's two
    distributions, the confidence distributions and the class shares."""
    figure, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    names = list(result.p_values)
    threshold = alpha / len(names)
    p_values = np.array([max(result.p_values[n], 1e-300) for n in names])
    colours = ["#c0392b" if p < threshold else "#2e86c1" for p in p_values]
    axes[0, 0].barh(names, -np.log10(p_values), color=colours)
    axes[0, 0].axvline(-np.log10(threshold), color="k", linestyle="--", label="drift threshold")
    axes[0, 0].set_xlabel("-log10 p-value (longer bar: stronger evidence of drift)")
    axes[0, 0].legend(loc="lower right", fontsize=8)
    image_stats = [n for n in names if n in FEATURES]
    worst = max(image_stats, key=lambda n: result.statistics[n])
    column = FEATURES.index(worst)
    bins = np.linspace(0, 1, 41)
    axes[0, 1].hist(reference.features[:, column], bins, density=True, alpha=0.6, label="reference")
    axes[0, 1].hist(window.features[:, column], bins, density=True, alpha=0.6, label="window")
    axes[0, 1].set_title(f"{worst} (KS {result.statistics[worst]:.2f})")
    axes[0, 1].legend(fontsize=8)
    if reference.confidence is not None:
        axes[1, 0].hist(reference.confidence, bins, density=True, alpha=0.6, label="held-out")
        axes[1, 0].hist(window.confidence, bins, density=True, alpha=0.6, label="window")
        axes[1, 0].legend(fontsize=8)
    axes[1, 0].set_title("top-class probability")
    positions = np.arange(len(class_names))
    if reference.class_shares is not None:
        axes[1, 1].bar(positions - 0.2, reference.class_shares, 0.4, label="held-out")
    axes[1, 1].bar(positions + 0.2, shares, 0.4, label="window")
    axes[1, 1].set_xticks(positions, class_names, rotation=45, ha="right", fontsize=8)
    axes[1, 1].set_title("predicted-class shares")
    axes[1, 1].legend(fontsize=8)
    figure.suptitle(
        f"{verdict}: {len(window.features):,} images from {window.kind} against the model's "
        "reference"
    )
    figure.tight_layout()
    return figure


def meaning(statistic: str) -> str:
    return next(text for key, text in MEANINGS.items() if statistic.startswith(key))


def run_monitor(config: MonitorConfig) -> MonitorResult:
    """The `monitor` entry point."""
    with stage_run("monitor", config.experiment_name, f"monitor · {source_name(config.source)}"):
        log_resolved_params(config_to_params(config))
        model = load_logged_model(config.model_uri)
        classifier = model.unwrap_python_model()
        reference = reference_of(classifier, config.model_uri)
        class_names = list(classifier.class_names)
        if is_inference_log(config.source):
            window = read_log_window(config.source, config.window)
        else:
            window = score_images(model, config)
        if len(window.features) < MIN_WINDOW:
            raise ConfigError(
                f"{config.source} gave {len(window.features)} images; monitor needs {MIN_WINDOW} "
                "or more to tell drift from chance."
            )
        live = drift_test(reference, window.features, config.alpha, window.confidence)
        shares, shares_p = class_share_test(window.labels, reference)
        p_values = live.p_values | {CLASS_SHARES: shares_p}
        combined = min(1.0, min(p_values.values()) * len(p_values))
        result = DriftResult(live.statistics, p_values, combined, combined < config.alpha)
        log_findings(config, reference, window, result, shares, class_names)
        shifted = [n for n, p in p_values.items() if p * len(p_values) < config.alpha]
        print_findings(config, reference, window, result, shifted)
        run_id = mlflow.active_run().info.run_id
    if result.drift and config.fail_on_drift:
        raise DriftFound(
            f"drift in {config.source} (run {run_id}, {', '.join(shifted)}); exiting non-zero as "
            "fail_on_drift asked."
        )
    return MonitorResult(run_id, result.drift, p_values)


def reference_of(classifier: object, model_uri: str) -> Reference:
    """The training reference the model was logged with; a note when it was drawn the old way."""
    reference: Reference | None = getattr(classifier, "reference", None)
    if reference is None or reference.confidence is None:
        raise ConfigError(
            f"{model_uri} was logged without the drift reference monitor needs; train "
            "it again (mlflow run . -e train) and monitor the new model."
        )
    if reference.drawn_the_old_way:
        note = OLD_REFERENCE_NOTE.format(model=model_uri, how=reference.sampling)
        print(in_users_form(note), file=sys.stderr, flush=True)
        mlflow.set_tag("reference_sampling", reference.sampling)
    return reference


def log_findings(
    config: MonitorConfig,
    reference: Reference,
    window: Window,
    result: DriftResult,
    shares: np.ndarray,
    class_names: list[str],
) -> None:
    """The run's metrics, tags, plot and report."""
    verdict = "drift" if result.drift else "no drift"
    mlflow.log_metrics(
        {f"ks_{name}": value for name, value in result.statistics.items()}
        | {f"p_value_{name}": value for name, value in result.p_values.items()}
        | {f"share_{name}": float(s) for name, s in zip(class_names, shares, strict=True)}
        | {
            f"share_shift_{name}": float(s - r)
            for name, s, r in zip(class_names, shares, reference.class_shares, strict=True)
        }
        | {
            "combined_p_value": result.p_value,
            "drift": float(result.drift),
            "window_images": len(window.features),
            "mean_confidence": float(window.confidence.mean()),
            "reference_mean_confidence": float(reference.confidence.mean()),
        }
    )
    mlflow.set_tags({"verdict": verdict, "model_uri": config.model_uri, "source": config.source,
                     "source_kind": window.kind, "reference_digest": reference.digest,
                     "logged_by": ", ".join(window.models)})  # fmt: skip
    log_figure(
        plot_drift(reference, window, result, shares, class_names, verdict, config.alpha),
        "drift.png",
    )
    report = {
        "verdict": verdict,
        "combined_p_value": result.p_value,
        "alpha": config.alpha,
        "images": len(window.features),
        "statistics": result.statistics,
        "p_values": result.p_values,
        "class_shares": dict(zip(class_names, shares.tolist(), strict=True)),
        "reference_class_shares": dict(
            zip(class_names, reference.class_shares.tolist(), strict=True)
        ),
        "models_in_window": window.models,
    }
    log_json(report, "drift_report.json")


def print_findings(
    config: MonitorConfig,
    reference: Reference,
    window: Window,
    result: DriftResult,
    shifted: list[str],
) -> None:
    """The run's one-line description and the summary a person reads, with the next command."""
    verdict, p_values, combined = (
        "drift" if result.drift else "no drift",
        result.p_values,
        result.p_value,
    )
    strongest = min(p_values, key=p_values.get)
    describe_run(
        f"{verdict} in {len(window.features):,} images of {config.source} against "
        f"{config.model_uri} (combined p {combined:.2g})"
    )
    facts = {
        "verdict": f"{verdict} (combined p-value {combined:.3g}, alpha {config.alpha:g}) over "
        f"{len(window.features):,} images from {window.kind}",
        "strongest signal": f"{strongest}: p {p_values[strongest]:.3g} ({meaning(strongest)})",
        "confidence": f"mean {window.confidence.mean():.3f} here, "
        f"{reference.confidence.mean():.3f} on held-out images",
    }
    if result.drift:
        facts["what changed"] = "; ".join(f"{n} ({meaning(n)})" for n in shifted)
        next_command = (
            "add labelled images like these to the training folders and retrain: "
            "mlflow run . -e main -P data_dir=<folder with them>; the plot is drift.png"
        )
    else:
        next_command = (
            f"schedule it: mlflow run . -e monitor -P source={config.source} -P fail_on_drift=true"
        )
    verdict_line = "found drift" if result.drift else "passed"
    print_summary("monitor", facts, next_command, verdict=verdict_line)
