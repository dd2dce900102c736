"""Batch scoring of real images: the `predict` stage on the local engine and on Spark, against the
inference path of `evaluate` on the same images.

The first N JPEGs of the shared archive (all ten classes) are unpacked into a folder. A ResNet-18 is
trained for one epoch on 256 of them (speed does not depend on accuracy) and logged. Then each engine
runs as a user runs it, `cifar10 predict` in a process of its own, `--rounds` times, the engines'
order alternating from round to round. Each line gives the run's own metrics (model_load_seconds;
scoring_seconds: from the loaded model to the finished table, so on Spark whatever of the session's
start the model load did not cover) and the stage (the run's start to its end: loading, scoring,
writing the table) and whether Spark's JVM mapped its class archive or recorded it (a machine's first
Spark run). Last, evaluate's inference path in this process: `predict_in_chunks` over the same
images already decoded, without reading files or writing a table.

    python benchmarks/predict_throughput.py [--images 10000] [--spark-master local[2]]
        [--engines local,spark,evaluate] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np

from pipeline.config import resolve_train_config
from pipeline.data.image_folder import cache_root
from pipeline.model.classifier import predict_in_chunks
from pipeline.model.decoding import decode_image
from pipeline.scoring.spark import archive_to_map, class_archive
from pipeline.train import run_train

ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg" / "train.tar.gz"
ARCHIVE_WAIT_SECONDS = 180


def unpack_first(count: int, target: Path) -> list[Path]:
    """The first `count` JPEGs of the archive in class order, interleaved across the ten classes."""
    per_class = -(-count // 10)
    taken: dict[str, int] = {}
    files = []
    with tarfile.open(ARCHIVE) as archive:
        for member in archive:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) != 3 or taken.get(parts[1], 0) >= per_class:
                continue
            taken[parts[1]] = taken.get(parts[1], 0) + 1
            path = target / parts[1] / parts[2]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(archive.extractfile(member).read())
            files.append(path)
    return sorted(files)[:count]


def spark_archive_state() -> str:
    archive = class_archive(cache_root())
    return "mapped" if archive and archive_to_map(archive) else "recorded"


def wait_for_class_archive() -> None:
    """A first Spark run's JVM writes the archive after its process ended: wait for it."""
    archive = class_archive(cache_root())
    deadline = time.monotonic() + ARCHIVE_WAIT_SECONDS
    while archive and not archive_to_map(archive) and time.monotonic() < deadline:
        time.sleep(2)


def run_engine(engine: str, args: argparse.Namespace, model_uri: str, root: Path) -> dict:
    """One `cifar10 predict` process; its run's metrics and times."""
    archive = spark_archive_state() if engine == "spark" else None
    command = [
        sys.executable, "-m", "pipeline.cli", "predict", "--model-uri", model_uri,
        "--input", str(root / "photos"), "--output", str(root / f"{engine}.parquet"),
        "--engine", engine, "--spark-master", args.spark_master, "--experiment-name", "bench",
    ]  # fmt: skip
    started = time.perf_counter()
    finished = subprocess.run(command, capture_output=True, text=True, env=os.environ)
    process = time.perf_counter() - started
    if finished.returncode:
        raise SystemExit(f"{engine} failed:\n{finished.stderr[-3000:]}")
    run = mlflow.search_runs(
        experiment_names=["bench"],
        order_by=["start_time DESC"],
        max_results=1,
        output_format="list",
    )[0]
    metrics = run.data.metrics
    line = {
        "engine": engine if engine == "local" else f"spark {args.spark_master}",
        "images": int(metrics["input_files"]),
        "model_load_s": round(metrics["model_load_seconds"], 2),
        "scoring_s": round(metrics["scoring_seconds"], 1),
        "images_per_second": round(metrics["images_per_second"]),
        "stage_s": round((run.info.end_time - run.info.start_time) / 1000, 1),
        "process_s": round(process, 1),
    }
    if archive:
        line["jvm_class_archive"] = archive
        if archive == "recorded":
            wait_for_class_archive()
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--spark-master", default="local[2]")
    parser.add_argument("--engines", default="local,spark,evaluate")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    engines = args.engines.split(",")
    if not ARCHIVE.is_file():
        raise SystemExit(f"needs the shared JPEG archive at {ARCHIVE}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root}/mlflow.db"
        mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
        mlflow.create_experiment("bench", artifact_location=(root / "artifacts").as_uri())
        files = unpack_first(args.images, root / "photos")
        trained = run_train(
            resolve_train_config(
                {"model": "resnet18", "data_dir": str(root / "photos"), "epochs": 1,
                 "max_train_images": 256, "experiment_name": "bench"}
            )
        )  # fmt: skip
        scoring = [name for name in engines if name != "evaluate"]
        lines = []
        for round_index in range(args.rounds):
            for engine in scoring if round_index % 2 == 0 else scoring[::-1]:
                lines.append(run_engine(engine, args, trained.model_uri, root))
                print(json.dumps(lines[-1]), flush=True)
        local_runs = [x for x in lines if x["engine"] == "local"]
        mapped_runs = [x for x in lines if x.get("jvm_class_archive") == "mapped"]
        if local_runs and mapped_runs:  # a first Spark run (recording the archive) is not compared
            summary = {}
            for key in ("images_per_second", "stage_s"):
                local = statistics.median(x[key] for x in local_runs)
                spark = statistics.median(x[key] for x in mapped_runs)
                summary[f"spark_over_local_{key}"] = round(
                    spark / local if key == "images_per_second" else local / spark, 3
                )
            print(json.dumps({"median_of_rounds": summary}), flush=True)
        if "evaluate" not in engines:
            return
        images = np.stack([decode_image(path.read_bytes()) for path in files])
        model = mlflow.pyfunc.load_model(trained.model_uri)
        started = time.perf_counter()
        predict_in_chunks(model, images, batch_size=500)
        seconds = time.perf_counter() - started
        print(
            json.dumps(
                {
                    "engine": "evaluate's inference path (predict_in_chunks, decoded images)",
                    "images": len(files),
                    "scoring_s": round(seconds, 1),
                    "images_per_second": round(len(files) / seconds),
                }
            )
        )


if __name__ == "__main__":
    main()
