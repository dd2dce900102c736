"""The `evaluate` stage: the official test set through the logged pyfunc, every number and plot logged.

Predictions come from the pyfunc's own `predict` on PNG-encoded images, the exact path a served
request takes, so the reported accuracy is what users get.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import mlflow
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from mlflow.entities import Metric
from sklearn.metrics import (
    confusion_matrix,
)

from pipeline.config import EvaluateConfig, config_to_params
from pipeline.data.image_set import ImageSet
from pipeline.data.sources import (
    BadDataError,
    duplicate_counts,
    load_held_out_folder,
    load_test_set,
)
from pipeline.errors import PipelineError
from pipeline.model.architectures import normalize
from pipeline.model.classifier import predict_in_chunks
from pipeline.model.explaining import gradcam_maps, overlay
from pipeline.model.scores import (
    ECE_BINS,
    INTERVALS_NOTE,
    calibration_bins,
    ci_text,
    classification_metrics,
)
from pipeline.tracking.model_logging import default_tta
from pipeline.tracking.runs import (
    describe_run,
    load_logged_model,
    log_dataset,
    log_figure,
    log_json,
    log_lineage,
    log_resolved_params,
    print_summary,
    rebuild_splits,
    source_name,
    split_changed,
    stage_run,
)


def metrics_table(metrics: dict[str, float], class_names: tuple[str, ...]) -> pd.DataFrame:
    """Per-class precision/recall/F1 and the macro row, as the seed report printed them."""
    rows = [
        {
            "class": name,
            "precision": metrics[f"test_precision_{name}"],
            "recall": metrics[f"test_recall_{name}"],
            "recall 95% CI": ci_text(metrics, f"test_recall_{name}"),
            "f1": metrics[f"test_f1_{name}"],
        }
        for name in class_names
    ]
    rows.append(
        {
            "class": "macro avg",
            "precision": metrics["test_precision_macro"],
            "recall": metrics["test_recall_macro"],
            "recall 95% CI": "",
            "f1": metrics["test_f1_macro"],
            "f1 95% CI": ci_text(metrics, "test_f1_macro"),
        }
    )
    return pd.DataFrame(rows)


def to_markdown(frame: pd.DataFrame) -> str:
    header = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "---|" * len(frame.columns)
    body = [
        "| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row) + " |"
        for row in frame.itertuples(index=False)
    ]
    return "\n".join([header, rule, *body]) + "\n"


def plot_confusion(matrix: np.ndarray, class_names: tuple[str, ...], normalized: bool):
    figure, axis = plt.subplots(figsize=(9, 7.5))
    sns.heatmap(
        matrix,
        annot=True,
        fmt=".2f" if normalized else "d",
        cmap="Blues",
        xticklabels=class_names,
        yticklabels=class_names,
        ax=axis,
    )
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title("Confusion matrix" + (" (row-normalized)" if normalized else " (counts)"))
    figure.tight_layout()
    return figure


def plot_reliability(probabilities: np.ndarray, labels: np.ndarray, ece: float):
    _, accuracy, _ = calibration_bins(probabilities, labels)
    accuracy = np.nan_to_num(accuracy)
    edges = np.linspace(0, 1, ECE_BINS + 1)
    figure, axis = plt.subplots(figsize=(5, 5))
    axis.bar(
        edges[:-1], accuracy, width=1 / ECE_BINS, align="edge", edgecolor="black", label="accuracy"
    )
    axis.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    axis.set_xlabel("confidence")
    axis.set_ylabel("accuracy")
    axis.set_title(f"Reliability diagram (ECE {ece:.3f}, {ECE_BINS} bins)")
    axis.legend(loc="upper left")
    figure.tight_layout()
    return figure


def plot_confident_mistakes(test: ImageSet, probabilities: np.ndarray, count: int = 24):
    predicted = probabilities.argmax(axis=1)
    confidence = probabilities.max(axis=1)
    wrong = np.flatnonzero(predicted != test.labels)
    chosen = wrong[np.argsort(-confidence[wrong])][:count]
    cols = 6
    rows = max(1, -(-len(chosen) // cols))
    figure, axes = plt.subplots(rows, cols, figsize=(cols * 1.8, rows * 2.1), squeeze=False)
    for axis in axes.ravel():
        axis.axis("off")
    names = test.class_names
    for axis, i in zip(axes.ravel(), chosen, strict=False):
        axis.imshow(test.images[i])
        axis.set_title(
            f"{names[predicted[i]]} {confidence[i]:.2f}\ntrue: {names[test.labels[i]]}", fontsize=7
        )
    figure.suptitle("Most confident mistakes (predicted, confidence / true)")
    figure.tight_layout()
    return figure


def plot_gradcam(classifier, test: ImageSet, predicted: np.ndarray, per_class: int):
    """Grad-CAM overlays of the predicted class, `per_class` test images of each true class."""
    mean, std = classifier.meta["mean"], classifier.meta["std"]
    names = test.class_names
    chosen = [np.flatnonzero(test.labels == c)[:per_class] for c in range(len(names))]
    index = np.concatenate(chosen)
    batch = normalize(torch.from_numpy(test.images[index]).permute(0, 3, 1, 2), mean, std)
    targets = [int(predicted[i]) for i in index]
    # On this thread, not the model's: a backward pass run on the model's daemon thread made the
    # evaluate process abort at exit ("terminate called without an active exception"), and
    # nothing else uses the model while evaluate draws its overlays.
    heatmaps = gradcam_maps(classifier.model, batch, targets)
    figure, axes = plt.subplots(
        len(names), 2 * per_class, figsize=(4 * per_class, len(names) * 1.6), squeeze=False
    )
    cells = [(row, col) for row, members in enumerate(chosen) for col in range(len(members))]
    for k, (i, (row, col)) in enumerate(zip(index, cells, strict=True)):
        axes[row, 2 * col].imshow(test.images[i])
        axes[row, 2 * col + 1].imshow(overlay(test.images[i], heatmaps[k]))
        axes[row, 2 * col].set_title(f"true {names[test.labels[i]]}", fontsize=7)
        axes[row, 2 * col + 1].set_title(f"CAM for {names[predicted[i]]}", fontsize=7)
    for axis in axes.ravel():
        axis.axis("off")
    figure.tight_layout()
    return figure


@dataclass
class EvaluateResult:
    run_id: str
    metrics: dict[str, float]
    source_run_id: str | None


def run_evaluate(config: EvaluateConfig) -> EvaluateResult:
    """The `evaluate` entry point. The test metrics are also written back to the training run, but only
    when they come from the test split of the data that run was trained on. `tta` unset means the
    model's own default (what its validation used)."""
    with stage_run(
        "evaluate",
        config.experiment_name,
        f"evaluate · {source_name(config.test_dir or config.data_dir)}",
    ) as run:
        model = load_logged_model(config.model_uri)
        requested = config_to_params(config)  # the step's identity for `main`, as it was asked
        if config.tta is None:
            config = replace(config, tta=default_tta(model))
        if config.tta:
            mlflow.set_tag(
                "mlflow.runName",
                f"evaluate-tta · {source_name(config.test_dir or config.data_dir)}",
            )
        log_resolved_params(config_to_params(config))
        test = load_test_images(config, model)
        source_run_id = model.metadata.run_id
        mlflow.set_tags(
            {"model_uri": config.model_uri, "source_run_id": source_run_id or "", "tta": config.tta,
             "intervals": INTERVALS_NOTE}
        )  # fmt: skip
        dataset = log_dataset(test, context="test")
        log_lineage({"test": test}, requested)
        if test.problems:
            log_json(test.problems, "skipped_files.json")
        probabilities = predict_in_chunks(model, test.images, config.batch_size, config.tta)
        metrics = classification_metrics(test.labels, probabilities, test.class_names)
        mlflow.log_metrics(  # linked to the model and the test set: the model's page shows them
            metrics | {"test_images": len(test), "skipped_files": len(test.problems)},
            model_id=getattr(model.metadata, "model_id", None),
            dataset=dataset,
        )
        log_report(test, probabilities, metrics, model, config.gradcam_per_class)
        write_back = write_back_metrics(config, test, metrics, source_run_id, run)
        architecture = (model.metadata.metadata or {}).get("architecture", "model")
        describe_run(
            f"test_accuracy {metrics['test_accuracy']:.4f} on {len(test):,} images of "
            f"{test.name} ({architecture} {config.model_uri})"
        )
        print_summary(
            "evaluate",
            {
                "test_accuracy": f"{metrics['test_accuracy']:.4f} (95% CI "
                f"{ci_text(metrics, 'test_accuracy')}) on {len(test):,} images of {test.source}",
                "macro F1 / ECE": f"{metrics['test_f1_macro']:.4f} (95% CI "
                f"{ci_text(metrics, 'test_f1_macro')}) / {metrics['test_ece']:.4f}",
                "training run": f"metrics written back to {source_run_id}"
                if write_back is None
                else f"not written back: {write_back}",
            },
            f"mlflow ui --backend-store-uri {mlflow.get_tracking_uri()}",
        )
    return EvaluateResult(run.info.run_id, metrics, source_run_id)


def load_test_images(config: EvaluateConfig, model: Any) -> ImageSet:
    """The held-out images, refused when their classes are not the model's."""
    test = (
        load_held_out_folder(config.test_dir, config.skip_bad_images)
        if config.test_dir
        else load_test_set(config.data_dir, config.download, config.skip_bad_images)
    )
    meta = model.metadata.metadata or {}
    if "class_names" in meta and tuple(meta["class_names"]) != test.class_names:
        raise BadDataError(
            f"{config.model_uri} knows the classes {list(meta['class_names'])}, but "
            f"{test.source} has {list(test.class_names)}; evaluate on the data the model was "
            "trained for."
        )
    return test


def log_report(
    test: ImageSet,
    probabilities: np.ndarray,
    metrics: dict[str, float],
    model: Any,
    gradcam_per_class: int,
) -> None:
    """The run's artifacts: per-class table, confusion matrices, reliability diagram, the most
    confident mistakes, Grad-CAM maps and every prediction."""
    names, predicted = test.class_names, probabilities.argmax(axis=1)
    table = metrics_table(metrics, names)
    mlflow.log_text(to_markdown(table), "metrics_table.md")
    mlflow.log_table(table, "metrics_table.json")
    mlflow.log_text(table.to_csv(index=False), "metrics_table.csv")
    counts = confusion_matrix(test.labels, predicted, labels=np.arange(len(names)))
    normalized = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    for matrix, tag in ((counts, "counts"), (normalized, "normalized")):
        frame = pd.DataFrame(matrix, index=names, columns=names)
        mlflow.log_text(frame.to_csv(), f"confusion_matrix_{tag}.csv")
        log_figure(
            plot_confusion(matrix, names, tag == "normalized"), f"confusion_matrix_{tag}.png"
        )
    log_figure(
        plot_reliability(probabilities, test.labels, metrics["test_ece"]),
        "reliability_diagram.png",
    )
    log_figure(plot_confident_mistakes(test, probabilities), "confident_mistakes.png")
    if gradcam_per_class > 0:
        classifier = model.unwrap_python_model()
        log_figure(plot_gradcam(classifier, test, predicted, gradcam_per_class), "gradcam.png")
    predictions = pd.DataFrame({"index": np.arange(len(test)), "true_label": test.labels,
                                "predicted_label": predicted,
                                "confidence": probabilities.max(axis=1)})  # fmt: skip
    mlflow.log_text(predictions.to_csv(index=False), "predictions.csv")


def write_back_metrics(
    config: EvaluateConfig,
    test: ImageSet,
    metrics: dict[str, float],
    source_run_id: str | None,
    run: mlflow.ActiveRun,
) -> str | None:
    """Copy the test metrics to the training run when they test what it trained on; the reason
    they were not otherwise."""
    write_back = (
        write_back_reason(source_run_id, None, test)
        if config.test_dir
        else write_back_reason(source_run_id, config.data_dir)
    )
    mlflow.set_tags({"written_back": write_back is None, "written_back_reason": write_back or ""})
    if write_back is None:
        suffix = "_tta" if config.tta else ""
        mlflow.MlflowClient().log_batch(
            source_run_id,
            metrics=[
                Metric(f"{k}{suffix}", v, int(run.info.start_time), 0) for k, v in metrics.items()
            ],
        )
    return write_back


def write_back_reason(
    source_run_id: str | None, data_dir: str | None, held_out: ImageSet | None = None
) -> str | None:
    """None when `data_dir` holds, by content digest, the training split the run learned from, so
    its test split is the one held out from that data; else why the metrics stay here. A
    `held_out` folder counts as held out only when none of its images is in that training split
    (rebuilt from the data the run logged where `data_dir` is None)."""
    if not source_run_id:
        return "the model has no training run"
    run = mlflow.MlflowClient().get_run(source_run_id)
    try:
        rebuilt = rebuild_splits(run, data_dir).train
    except (PipelineError, TypeError, ValueError) as error:
        return (
            f"the training split of run {source_run_id} cannot be rebuilt from {data_dir} ({error})"
        )
    changed = split_changed(run, "train", rebuilt)
    if changed or held_out is None:
        return changed
    shared = duplicate_counts(rebuilt.images, held_out.images)["duplicates_train_test"]
    if shared:
        return (
            f"{shared} of the {len(held_out)} images in {held_out.source} are in the training "
            f"split of run {source_run_id}, so they are not held out"
        )
    return None
