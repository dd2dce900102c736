"""The `predict` stage: batch scoring of unlabelled images into a table, on this machine or on Spark.

Both engines call the logged pyfunc's own `predict` (the decoding and forward pass that serving and
`evaluate` use) with `on_error="report"`, so a file that is not a readable image gets a row with its
error instead of stopping the job. The local engine feeds it chunks of files; the Spark engine hands
the same chunks to Spark's Python workers (`mapInPandas`), each with the model Spark shipped to it,
so the scale is Spark's, not ours.
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline.config import ConfigError, PredictConfig, config_to_params
from pipeline.data.inputs import InputFiles, list_inputs, read_bytes
from pipeline.model.classifier import IMAGE_COLUMN
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
SCORE_OPTIONS = {"on_error": "report"}
SPARK_RESULT_TYPE = "label long, class_name string, probabilities array<double>, error string"


def score_chunk(
    model: mlflow.pyfunc.PyFuncModel, paths: list[Path], tta: bool, explain: bool = False
) -> pd.DataFrame:
    """The pyfunc's answer for a chunk of files, one row each; unreadable files keep their error."""
    contents = [read_bytes(path) for path in paths]
    frame = pd.DataFrame({IMAGE_COLUMN: [c if isinstance(c, bytes) else b"" for c in contents]})
    params = {"tta": tta, **SCORE_OPTIONS} | ({"explain": True} if explain else {})
    scored = model.predict(frame, params=params)
    unread = [c if isinstance(c, str) else "" for c in contents]
    scored["error"] = [u or e for u, e in zip(unread, scored["error"], strict=True)]
    return scored


class ScoringProgress:
    """A bar on a terminal; in a log file, a line at every tenth of the files."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.next_line = total, 0, total / 10
        self.started = time.perf_counter()
        self.bar = tqdm(total=total, unit="img", file=sys.stderr, disable=not sys.stderr.isatty())

    def update(self, count: int) -> None:
        self.done += count
        self.bar.update(count)
        if self.bar.disable and (self.done >= self.next_line or self.done == self.total):
            rate = self.done / max(time.perf_counter() - self.started, 1e-9)
            print(
                f"scored {self.done:,} of {self.total:,} files ({rate:,.0f} images/s)",
                file=sys.stderr,
                flush=True,
            )
            self.next_line = self.done + self.total / 10

    def close(self) -> None:
        self.bar.close()


def score_local(
    model: mlflow.pyfunc.PyFuncModel, inputs: InputFiles, config: PredictConfig
) -> pd.DataFrame:
    progress = ScoringProgress(len(inputs.files))
    frames = []
    try:
        for start in range(0, len(inputs.files), config.batch_size):
            chunk = inputs.files[start : start + config.batch_size]
            frames.append(score_chunk(model, chunk, config.tta, config.explain))
            progress.update(len(chunk))
    finally:
        progress.close()
    scored = pd.concat(frames, ignore_index=True)
    scored.insert(0, "path", [inputs.relative(p) for p in inputs.files])
    return scored


def score_spark(inputs: InputFiles, config: PredictConfig) -> pd.DataFrame:
    """The same pyfunc and the same chunks as the local engine, in Spark's Python workers: the
    driver's list of files becomes a table of paths, one partition per core, and each worker reads
    its files and scores them in Arrow batches of `batch_size` with the model Spark shipped to it."""
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise ConfigError(
            "engine=spark needs pyspark: pip install -e '.[spark]' (and Java 17 on the machine), "
            "or use -P engine=local."
        ) from None
    spark = (
        SparkSession.builder.master(config.spark_master)
        .appName("cifar10-predict")
        .config("spark.ui.showConsoleProgress", "false")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    # Arrow hands a worker batches of up to 10,000 rows by default: over the pyfunc's 1,024-image
    # limit. One batch is one chunk of `batch_size`, as on the local engine.
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(config.batch_size))
    spark.conf.set("spark.sql.execution.arrow.pyspark.enabled", "true")
    tta = config.tta
    # A folder of its own name: a session keeps every file added to it, by name.
    with tempfile.TemporaryDirectory(prefix="cifar10-model-") as model_dir:
        mlflow.artifacts.download_artifacts(config.model_uri, dst_path=model_dir)
        spark.sparkContext.addFile(model_dir, recursive=True)
        shipped = Path(model_dir).name

        def score_partition(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
            from pyspark import SparkFiles

            model = executor_model(SparkFiles.get(shipped))
            for batch in batches:
                scored = score_chunk(model, [Path(p) for p in batch["path"]], tta)
                scored.insert(0, "path", batch["path"].to_numpy())
                yield scored

        paths = pd.DataFrame({"path": [str(path) for path in inputs.files]})
        table = (
            spark.createDataFrame(paths)  # one slice per core, in the files' order
            .mapInPandas(score_partition, f"path string, {SPARK_RESULT_TYPE}")
            .toPandas()
        )
    table["path"] = [inputs.relative(Path(p)) for p in table["path"]]
    return table


@functools.cache
def executor_model(model_dir: str) -> mlflow.pyfunc.PyFuncModel:
    """The model in a Spark Python worker, loaded once: Spark reuses its workers from task to task.
    The driver already checked that this environment satisfies the model's requirements."""
    return mlflow.pyfunc.load_model(model_dir, suppress_warnings=True)


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
            with warnings.catch_warnings():
                # PySpark warns at each pandas conversion that pandas 3 is not fully supported;
                # the Spark test checks this path's table row for row under it.
                warnings.filterwarnings(
                    "ignore", "PySpark does not yet fully support", FutureWarning
                )
                scored = score_spark(inputs, config)
        else:
            scored = score_local(model, inputs, config)
        seconds = time.perf_counter() - loaded
        table = prediction_table(scored, class_names)
        write_table(table, output)
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
                "model_load_seconds": loaded - started,
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
                f"(model loaded in {loaded - started:.1f} s)",
                "classes": ", ".join(
                    f"{name} {int(counts.get(name, 0)):,}" for name in class_names
                ),
                "output": str(output),
            },
            f"python -c \"import pandas as pd; print(pd.read_{output.suffix[1:]}('{output}'))\"",
        )
    return PredictResult(run.info.run_id, output, table)
