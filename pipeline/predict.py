"""The `predict` stage: batch scoring of unlabelled images into a table, on this machine or on Spark
(`pipeline/scoring/`: the same chunks through the same pyfunc on both engines, so the scale is
Spark's, not ours)."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from pipeline.config import PredictConfig, config_to_params
from pipeline.data.inputs import list_inputs
from pipeline.scoring.local import score_local
from pipeline.tracking.model_logging import default_tta
from pipeline.tracking.runs import (
    load_logged_model,
    log_lineage,
    log_resolved_params,
    print_summary,
    source_name,
    stage_run,
)

ARTIFACT_LIMIT_BYTES = 50 * 2**20


def prediction_table(scored: pd.DataFrame, class_names: list[str]) -> pd.DataFrame:
    """path, class_name, label, confidence, one probability column per class, (with explain:
    explained_class and heatmap_png, the Grad-CAM overlay as base64 PNG), error."""
    ok = scored["error"] == ""
    rows = ok.to_numpy()
    probabilities = np.full((len(scored), len(class_names)), np.nan)
    confidence = np.full(len(scored), np.nan)
    if rows.any():
        probabilities[rows] = np.stack(scored.loc[ok, "probabilities"].map(np.asarray))
        confidence[rows] = probabilities[rows].max(axis=1)
    table = pd.DataFrame(
        {
            "path": scored["path"],
            "class_name": scored["class_name"].where(ok, ""),
            "label": pd.array(scored["label"].where(ok), dtype="Int64"),
            "confidence": confidence,
        }
    )
    for index, name in enumerate(class_names):
        table[f"p_{name}"] = probabilities[:, index]
    if "heatmap_png" in scored:
        table["explained_class"] = scored["explained_class"]
        table["heatmap_png"] = scored["heatmap_png"]
    table["error"] = scored["error"]
    return table


def write_table(table: pd.DataFrame, output: Path) -> None:
    """Written to a temporary file beside `output`, then renamed: never a half-written table."""
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.partial")
    if output.suffix.lower() == ".parquet":
        table.to_parquet(partial, index=False)
    else:
        table.to_csv(partial, index=False)
    os.replace(partial, output)


def model_version_tags(model_uri: str) -> dict[str, str]:
    """For a registry URI (`models:/name@alias` or `models:/name/3`), the version it resolved to."""
    name, _, which = model_uri.removeprefix("models:/").partition("@")
    client = mlflow.MlflowClient()
    try:
        if which:
            version = client.get_model_version_by_alias(name, which).version
        elif "/" in name:
            name, version = name.split("/", 1)
        else:
            return {}
    except mlflow.exceptions.MlflowException:
        return {}
    return {"model_name": name, "model_version": str(version)}


@dataclass
class PredictResult:
    run_id: str
    output: Path
    table: pd.DataFrame


def run_predict(config: PredictConfig) -> PredictResult:
    """The `predict` entry point: one tracked run, one row per input file. `tta` unset means the
    model's own default."""
    output = Path(config.output).expanduser().resolve()
    with stage_run(
        "predict", config.experiment_name, f"predict-{config.engine} · {source_name(config.input)}"
    ) as run:
        started = time.perf_counter()
        if config.engine == "spark":
            from pipeline.scoring.spark import score_spark, start_spark_in_background

            session = start_spark_in_background(config.spark_master)  # while the model loads
        model = load_logged_model(config.model_uri)
        log_lineage({}, config_to_params(config))  # as asked: the model's default stays implicit
        if config.tta is None:
            config = replace(config, tta=default_tta(model))
        log_resolved_params(config_to_params(config))
        class_names = list(model.metadata.metadata["class_names"])
        inputs = list_inputs(config.input)
        loaded = time.perf_counter()
        print(
            f"predict: scoring {len(inputs.files):,} files of {config.input} with "
            f"{config.model_uri} on engine {config.engine}",
            file=sys.stderr,
            flush=True,
        )
        if config.engine == "spark":
            scored = score_spark(session, inputs, config)
        else:
            scored = score_local(model, inputs, config)
        seconds = time.perf_counter() - loaded
        table = prediction_table(scored, class_names)
        write_table(table, output)
        report_predictions(config, table, output, class_names, loaded - started, seconds)
    return PredictResult(run.info.run_id, output, table)


def report_predictions(
    config: PredictConfig,
    table: pd.DataFrame,
    output: Path,
    class_names: list[str],
    load_seconds: float,
    seconds: float,
) -> None:
    """The run's tags, counts and speed, the table itself where it is small enough, and the
    summary a person reads."""
    errors = int((table["error"] != "").sum())
    counts = table.loc[table["error"] == "", "class_name"].value_counts()
    mlflow.set_tags(
        {
            "model_uri": config.model_uri,
            "engine": config.engine,
            "input": config.input,
            "output_path": str(output),
        }
        | model_version_tags(config.model_uri)
    )
    mlflow.log_metrics(
        {
            "input_files": len(table),
            "scored_files": len(table) - errors,
            "error_files": errors,
            "images_per_second": len(table) / seconds,
            "model_load_seconds": load_seconds,
            "scoring_seconds": seconds,
        }
        | {f"count_{name}": int(counts.get(name, 0)) for name in class_names}
    )
    if output.stat().st_size <= ARTIFACT_LIMIT_BYTES:
        mlflow.log_artifact(str(output))
    print_summary(
        "predict",
        {
            "scored": f"{len(table) - errors:,} of {len(table):,} files"
            + (f" ({errors:,} not readable images: see the error column)" if errors else ""),
            "speed": f"{len(table) / seconds:,.0f} images/s on {config.engine} "
            f"(model loaded in {load_seconds:.1f} s)",
            "classes": ", ".join(f"{name} {int(counts.get(name, 0)):,}" for name in class_names),
            "output": str(output),
        },
        f"python -c \"import pandas as pd; print(pd.read_{output.suffix[1:]}('{output}'))\"",
    )
