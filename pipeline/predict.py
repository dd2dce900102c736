"""The `predict` stage: batch scoring of unlabelled images into a table, on this machine or on Spark.

Both engines call the logged pyfunc's own `predict` (the decoding and forward pass that serving and
`evaluate` use) with `on_error="report"`, so a file that is not a readable image gets a row with its
error instead of stopping the job. The local engine feeds it chunks of files; the Spark engine reads
the files with Spark's `binaryFile` source and runs the same pyfunc through
`mlflow.pyfunc.spark_udf` in every executor, so the scale is Spark's, not ours.
"""

from __future__ import annotations

import os
import sys
import time
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

# Hadoop's file listing (and so Spark's binaryFile source) skips names starting with "." or "_";
# the local engine skips the same, so both score the same files.
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
    """The same pyfunc in Spark's executors over Spark's `binaryFile` source."""
    try:
        from pyspark.sql import SparkSession
        from pyspark.sql import functions as F
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
    # Arrow hands the UDF batches of up to 10,000 rows by default: over the pyfunc's 1,024-image
    # limit (measured: "2500 images in one request"). One batch is one chunk of `batch_size`.
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(config.batch_size))
    spark.conf.set("spark.sql.execution.arrow.pyspark.enabled", "true")  # the table comes back
    classify = mlflow.pyfunc.spark_udf(
        spark,
        config.model_uri,
        result_type=SPARK_RESULT_TYPE,
        env_manager="local",
        params={"tta": config.tta, **SCORE_OPTIONS},
    )
    files = spark_files(spark, inputs)
    # Thousands of small files make hundreds of partitions (Spark counts 4 MB per file opened);
    # merging them into one per core costs no shuffle, and each task loads the model once. A few
    # files make one partition, spread over every core.
    cores = spark.sparkContext.defaultParallelism
    few = files.rdd.getNumPartitions() < cores
    files = files.repartition(cores) if few else files.coalesce(cores)
    scored = files.select(
        "path", classify(F.struct(F.col("content").alias(IMAGE_COLUMN))).alias("scored")
    ).select("path", "scored.*")
    table = scored.toPandas()
    prefix = inputs.root.as_uri().removeprefix("file://")
    table["path"] = [
        p.removeprefix("file:").removeprefix("//").removeprefix(prefix).lstrip("/")
        for p in table["path"]
    ]
    return table.sort_values("path", ignore_index=True)


def spark_files(spark, inputs: InputFiles):
    """Spark's `binaryFile` rows of the files to score: one recursive listing of the root
    (Hadoop skips the hidden names `list_inputs` skips), not a list of every path, which Spark
    lists one by one (measured: 32 s for 10,000 files); a glob's files are then picked out."""
    from pyspark.sql import functions as F

    files = (
        spark.read.format("binaryFile")
        .option("recursiveFileLookup", "true")
        .load(inputs.root.as_uri())
    )
    if inputs.whole_root:
        return files
    wanted = [f"file:{path.as_posix()}" for path in inputs.files]
    return files.join(F.broadcast(spark.createDataFrame([(p,) for p in wanted], ["path"])), "path")


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
