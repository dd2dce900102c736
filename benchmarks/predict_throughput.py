"""Batch scoring of real images: the `predict` stage on the local engine and on Spark, against the
inference path of `evaluate` on the same images.

The first N JPEGs of the shared archive (all ten classes) are unpacked into a folder. A ResNet-18 is
trained for one epoch on 256 of them (speed does not depend on accuracy) and logged. Then, each in one
process:
- `predict` with engine=local and with engine=spark (`--spark-master`, default local[2]), timed by
  the run's own metrics: model_load_seconds apart from scoring_seconds (reading the files, decoding,
  the forward pass, assembling the table) and the table's writing;
- evaluate's inference path: `predict_in_chunks` over the same images already decoded (PNG-encoded
  and decoded again by the pyfunc, as `evaluate` does), without reading files or writing a table.

    python benchmarks/predict_throughput.py [--images 10000] [--spark-master local[2]]
        [--engines local,spark,evaluate]
"""

from __future__ import annotations

import argparse
import json
import tarfile
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np

from pipeline.config import PredictConfig, resolve_train_config
from pipeline.model.classifier import predict_in_chunks
from pipeline.model.decoding import decode_image
from pipeline.predict import run_predict
from pipeline.train import run_train

ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg" / "train.tar.gz"


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--spark-master", default="local[2]")
    parser.add_argument("--engines", default="local,spark,evaluate")
    args = parser.parse_args()
    engines = args.engines.split(",")
    if not ARCHIVE.is_file():
        raise SystemExit(f"needs the shared JPEG archive at {ARCHIVE}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
        mlflow.create_experiment("bench", artifact_location=(root / "artifacts").as_uri())
        files = unpack_first(args.images, root / "photos")
        trained = run_train(
            resolve_train_config(
                {"model": "resnet18", "data_dir": str(root / "photos"), "epochs": 1,
                 "max_train_images": 256, "experiment_name": "bench"}
            )
        )  # fmt: skip
        for engine in [name for name in engines if name != "evaluate"]:
            output = root / f"{engine}.parquet"
            started = time.perf_counter()
            result = run_predict(
                PredictConfig(
                    model_uri=trained.model_uri, input=str(root / "photos"), output=str(output),
                    engine=engine, spark_master=args.spark_master, experiment_name="bench",
                )
            )  # fmt: skip
            whole = time.perf_counter() - started
            metrics = mlflow.get_run(result.run_id).data.metrics
            print(
                json.dumps(
                    {
                        "engine": engine if engine == "local" else f"spark {args.spark_master}",
                        "images": len(files),
                        "model_load_s": round(metrics["model_load_seconds"], 2),
                        "scoring_s": round(metrics["scoring_seconds"], 1),
                        "images_per_second": round(metrics["images_per_second"]),
                        "whole_stage_s": round(whole, 1),
                    }
                ),
                flush=True,
            )
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
