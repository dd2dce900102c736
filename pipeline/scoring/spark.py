"""The Spark engine: the local engine's chunks and pyfunc in Spark's Python workers (`mapInPandas`),
each with the model's folder that Spark shipped to it.

On a job of minutes, Spark's fixed costs decide how close it comes to the local engine (measured:
benchmarks/RESULTS.md), so the driver's JVM starts lean and early: it starts while the driver loads
the model; it runs C1-compiled code only (a short job does not earn back C2's compilations, which
take cores from the Python workers); it maps Spark's classes from a class-data archive (CDS, JEP 350)
that the first run on a machine records in the cache at its JVM's exit; and its start-up is quiet.
Python workers fork from `spark_daemon`, which has imported torch and MLflow once.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
import pandas as pd

from pipeline.config import ConfigError, PredictConfig
from pipeline.data.image_folder import cache_root
from pipeline.data.inputs import InputFiles
from pipeline.scoring.local import score_chunk

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

RESULT_TYPE = (
    "path string, label long, class_name string, probabilities array<double>, error string"
)
# HotSpot writes a dynamic archive's header, magic first, after everything else: a file that starts
# with it is whole (one cut short by a killed JVM starts with zeros).
DYNAMIC_ARCHIVE_MAGIC = 0xF00BABA8
STALE_RECORDING_SECONDS = 3600
LOG4J_CONFIG = Path(__file__).with_name("log4j2.properties")


def java_binary() -> Path | None:
    """The java that Spark's launcher runs: $JAVA_HOME/bin/java, else the one on PATH."""
    home = os.environ.get("JAVA_HOME")
    found = Path(home, "bin", "java") if home else shutil.which("java")
    return Path(found).resolve() if found and Path(found).is_file() else None


def archive_is_whole(path: Path) -> bool:
    try:
        with path.open("rb") as file:
            return int.from_bytes(file.read(4), "little") == DYNAMIC_ARCHIVE_MAGIC
    except OSError:
        return False


def class_archive(cache: Path) -> Path | None:
    """This Java's and this pyspark's archive of Spark's classes."""
    import pyspark

    java = java_binary()
    if java is None:
        return None
    # Java checks the archive against its classpath: each pyspark install records its own.
    key = f"{java}:{java.stat().st_mtime_ns}:{pyspark.__version__}:{Path(pyspark.__file__).parent}"
    return cache / "spark-jvm" / f"classes-{hashlib.sha256(key.encode()).hexdigest()[:16]}.jsa"


def archive_to_map(archive: Path) -> bool:
    """Whether the archive is whole at its name, after renaming a finished recording to it (each
    recording JVM writes a file of its own, so concurrent first runs never write into one)."""
    for recording in archive.parent.glob(f"{archive.name}.*"):
        with contextlib.suppress(OSError):
            if archive_is_whole(recording):
                os.replace(recording, archive)
            elif time.time() - recording.stat().st_mtime > STALE_RECORDING_SECONDS:
                recording.unlink()  # its JVM was killed while writing
    return archive_is_whole(archive)


def driver_java_options(cache: Path) -> str:
    """C1 only, quiet logging, and the class archive: mapped when there is one, else recorded by
    this run's JVM at its exit."""
    options = ["-XX:TieredStopAtLevel=1", f'"-Dlog4j2.configurationFile={LOG4J_CONFIG.as_uri()}"']
    archive = class_archive(cache)
    if archive is None:
        return " ".join(options)
    try:
        archive.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        return " ".join(options)  # a read-only cache: every run starts without the archive
    if archive_to_map(archive):
        return " ".join([*options, f'"-XX:SharedArchiveFile={archive}"'])
    # -Xlog: the dump's notes on the classes it leaves out (Spark's dynamic proxies) are not news.
    recording = f"{archive}.{os.getpid()}"
    return " ".join([*options, f'"-XX:ArchiveClassesAtExit={recording}"', "-Xlog:cds=off"])


def start_spark(master: str) -> SparkSession:
    """This stage's session (or the one already running in this process, as it is)."""
    try:
        from pyspark.errors import PySparkRuntimeError
        from pyspark.sql import SparkSession
    except ImportError:
        raise ConfigError(
            "engine=spark needs pyspark: pip install -e '.[spark]' (and Java 17 on the machine), "
            "or use -P engine=local."
        ) from None
    # PySpark warns at each pandas conversion that pandas 3 is not fully supported; the Spark test
    # checks this engine's table row for row under it.
    warnings.filterwarnings("ignore", "PySpark does not yet fully support", FutureWarning)
    builder = (
        SparkSession.builder.master(master)
        .appName("cifar10-predict")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.driver.defaultJavaOptions", driver_java_options(cache_root()))
        .config("spark.python.daemon.module", "pipeline.scoring.spark_daemon")
    )
    try:
        spark = builder.getOrCreate()
    except PySparkRuntimeError as error:
        raise ConfigError(
            f"Spark did not start ({error}): engine=spark needs Java 17 (JAVA_HOME, or java on "
            "PATH), or use -P engine=local."
        ) from None
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def start_spark_in_background(master: str) -> Future[SparkSession]:
    """The session, started on a thread of its own (a daemon: a driver that fails first exits)."""
    session: Future[SparkSession] = Future()

    def start() -> None:
        try:
            session.set_result(start_spark(master))
        except BaseException as error:  # handed to whoever waits for the session
            session.set_exception(error)

    threading.Thread(target=start, name="spark-start", daemon=True).start()
    return session


def score_spark(
    session: Future[SparkSession], inputs: InputFiles, config: PredictConfig
) -> pd.DataFrame:
    """The driver's list of files becomes a table of paths, one partition per core; each worker
    reads its files and scores them in Arrow batches of `batch_size` (one chunk each, as on the
    local engine), with the model Spark shipped to it."""
    tta = config.tta
    # A folder of its own name: a session keeps every file added to it, by name.
    with tempfile.TemporaryDirectory(prefix="cifar10-model-") as model_dir:
        mlflow.artifacts.download_artifacts(config.model_uri, dst_path=model_dir)
        spark = session.result()
        # Arrow hands a worker batches of up to 10,000 rows by default: over the pyfunc's
        # 1,024-image limit.
        spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(config.batch_size))
        spark.conf.set("spark.sql.execution.arrow.pyspark.enabled", "true")
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
        table = spark.createDataFrame(paths).mapInPandas(score_partition, RESULT_TYPE).toPandas()
    table["path"] = [inputs.relative(Path(p)) for p in table["path"]]
    return table


@functools.cache
def executor_model(model_dir: str) -> mlflow.pyfunc.PyFuncModel:
    """The model in a Spark Python worker, loaded once: Spark reuses its workers from task to task.
    The driver already checked that this environment satisfies the model's requirements."""
    return mlflow.pyfunc.load_model(model_dir, suppress_warnings=True)
