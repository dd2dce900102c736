"""The Spark driver's start: its JVM options, and the class archive a first run records and every
later run maps (real JVMs; the archive's whole file is read by Java, never faked past its header)."""

import os
import shutil
import subprocess
import sys
import time

import pytest

from pipeline.data.image_folder import CACHE_ENV
from pipeline.scoring.spark import (
    DYNAMIC_ARCHIVE_MAGIC,
    LOG4J_CONFIG,
    STALE_RECORDING_SECONDS,
    archive_to_map,
    class_archive,
    driver_java_options,
)

pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="Spark's driver needs Java")
START_AND_DESCRIBE = """
from pipeline.scoring.spark import start_spark
spark = start_spark("local[1]")
jvm = spark.sparkContext._jvm
print(spark.range(3).count())
print(list(jvm.java.lang.management.ManagementFactory.getRuntimeMXBean().getInputArguments()))
print(jvm.java.lang.System.getProperty("java.vm.info"))
"""


def write_recording(path, header: bytes, age_seconds: float = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + b"\0" * 64)
    stamp = time.time() - age_seconds
    os.utime(path, (stamp, stamp))


def test_without_an_archive_the_jvm_records_one_of_its_own_and_runs_c1_only(tmp_path):
    options = driver_java_options(tmp_path)
    archive = class_archive(tmp_path)
    assert "-XX:TieredStopAtLevel=1" in options
    assert f'"-XX:ArchiveClassesAtExit={archive}.{os.getpid()}"' in options
    assert f"-Dlog4j2.configurationFile={LOG4J_CONFIG.as_uri()}" in options
    assert LOG4J_CONFIG.is_file() and "SharedArchiveFile" not in options


def test_a_finished_recording_becomes_the_archive_and_a_dead_ones_leftover_is_removed(tmp_path):
    archive = class_archive(tmp_path)
    finished = archive.with_name(f"{archive.name}.4242")
    write_recording(finished, DYNAMIC_ARCHIVE_MAGIC.to_bytes(4, "little"))
    killed = archive.with_name(f"{archive.name}.4343")  # header never written
    write_recording(killed, b"\0\0\0\0", age_seconds=STALE_RECORDING_SECONDS + 60)
    writing = archive.with_name(f"{archive.name}.4444")  # a JVM may still be writing it
    write_recording(writing, b"\0\0\0\0")

    assert f'"-XX:SharedArchiveFile={archive}"' in driver_java_options(tmp_path)
    assert archive.is_file() and not finished.exists()
    assert not killed.exists() and writing.exists()


def test_an_archive_cut_short_is_not_mapped(tmp_path):
    archive = class_archive(tmp_path)
    write_recording(archive, b"\0\0\0\0")
    assert not archive_to_map(archive)
    assert "ArchiveClassesAtExit" in driver_java_options(tmp_path)


@pytest.mark.slow
def test_the_first_spark_start_records_the_archive_and_the_next_maps_it_quietly(tmp_path):
    pytest.importorskip("pyspark")
    env = os.environ | {CACHE_ENV: str(tmp_path)}
    archive = class_archive(tmp_path)

    def start() -> subprocess.CompletedProcess:
        # Returns when the JVM has closed its output too, i.e. after it wrote the archive.
        started = subprocess.run(
            [sys.executable, "-c", START_AND_DESCRIBE],
            capture_output=True, text=True, env=env, timeout=240,
        )  # fmt: skip
        assert started.returncode == 0, started.stderr[-2000:]
        return started

    first = start()
    assert archive_to_map(archive), list(archive.parent.iterdir())
    second = start()
    lines = second.stdout.splitlines()
    assert lines[0] == "3"
    assert f"-XX:SharedArchiveFile={archive}" in lines[1] and "sharing" in lines[2]
    for started in (first, second):
        for notice in ("log4j profile", "NativeCodeLoader", "Setting default log level", "[cds]"):
            assert notice not in started.stdout + started.stderr


def test_without_java_the_error_names_what_spark_needs(tmp_path):
    pytest.importorskip("pyspark")
    started = subprocess.run(
        [sys.executable, "-c", "from pipeline.scoring.spark import start_spark; start_spark('local[1]')"],
        capture_output=True, text=True, env=os.environ | {"JAVA_HOME": str(tmp_path / "no-java")},
    )  # fmt: skip
    assert started.returncode != 0
    assert "engine=spark needs Java 17 (JAVA_HOME, or java on PATH), or use -P engine=local" in (
        started.stderr
    )
