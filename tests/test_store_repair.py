"""A tracking store left half-migrated by MLflow's own concurrent first use (reproduced with real
processes), repaired by the first stage that opens it with every run still there; what cannot be
repaired safely is refused with the manual fix and left untouched."""

import hashlib
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from pipeline.tracking.store_repair import LEFTOVER_PREFIX, leftover_tables

ROOT = Path(__file__).resolve().parents[1]
OPEN_STORE = "import sys, mlflow; mlflow.MlflowClient(sys.argv[1]).search_experiments()"


def plain_clients(uri: str, count: int) -> list[int]:
    """`count` MLflow clients (no lock of ours) opening the store at once; their exit codes."""
    processes = [
        subprocess.Popen([sys.executable, "-c", OPEN_STORE, uri],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(count)
    ]  # fmt: skip
    return [p.wait(timeout=300) for p in processes]


@pytest.fixture(scope="module")
def broken_store(tmp_path_factory) -> Path:
    """A fresh file opened by three clients at once, round after round, until a round leaves it
    with a leftover `_alembic_tmp_*` table and a fourth client cannot open it (about every second
    round here; 40 rounds, as a round can miss the race many times over while another test's busy
    loops hold both cores)."""
    root = tmp_path_factory.mktemp("half-migrated")
    for attempt in range(40):
        path = root / f"attempt-{attempt}.db"
        plain_clients(f"sqlite:///{path}", 3)
        with sqlite3.connect(path) as connection:
            left = leftover_tables(connection)
        if left and plain_clients(f"sqlite:///{path}", 1) != [0]:
            return path
    pytest.fail("40 rounds of three concurrent first uses never left the store half-migrated")


def insert_known_columns(connection: sqlite3.Connection, table: str, row: dict) -> None:
    """Insert the columns of `row` the table has: a round may stop at any migration, before or
    after the one that added a column (experiments' creation_time, say)."""
    present = {column[1] for column in connection.execute(f'PRAGMA table_info("{table}")')}
    kept = {name: value for name, value in row.items() if name in present}
    marks = ", ".join("?" for _ in kept)
    connection.execute(
        f'INSERT INTO "{table}" ({", ".join(kept)}) VALUES ({marks})', tuple(kept.values())
    )


def with_a_run(store: Path, tmp_path: Path) -> Path:
    """A copy of the broken store holding one run (written with SQL: MLflow cannot open it)."""
    copy = tmp_path / "mlflow.db"
    copy.write_bytes(store.read_bytes())
    artifacts = tmp_path / "artifacts"
    with sqlite3.connect(copy) as connection:
        insert_known_columns(connection, "experiments", {
            "experiment_id": 7, "name": "kept", "artifact_location": str(artifacts),
            "lifecycle_stage": "active", "creation_time": 1, "last_update_time": 1,
        })  # fmt: skip
        insert_known_columns(connection, "runs", {
            "run_uuid": "0123abcd", "name": "kept-run", "source_type": "LOCAL", "user_id": "me",
            "status": "FINISHED", "start_time": 1, "lifecycle_stage": "active",
            "artifact_uri": str(artifacts / "0123abcd"), "experiment_id": 7,
        })  # fmt: skip
    return copy


def cli(*args: str, cwd: Path, uri: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_EXPERIMENT")}
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        env=env | {"MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(ROOT)},
        cwd=cwd, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.mark.slow
def test_the_first_stage_on_a_half_migrated_store_repairs_it_and_keeps_every_run(
    broken_store, tmp_path
):
    store = with_a_run(broken_store, tmp_path)
    uri = f"sqlite:///{store}"
    done = cli("promote", cwd=tmp_path, uri=uri)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "was left half-migrated (leftover _alembic_tmp_" in done.stderr
    assert "1 run(s) kept" in done.stderr
    client = mlflow.MlflowClient(uri)
    assert client.get_run("0123abcd").info.run_name == "kept-run"
    assert client.get_experiment_by_name("kept").experiment_id == "7"
    with sqlite3.connect(store) as connection:
        assert leftover_tables(connection) == []
    backups = list(tmp_path.glob("mlflow.db.before-repair-*"))
    assert len(backups) == 1
    with sqlite3.connect(backups[0]) as connection:
        assert leftover_tables(connection)  # the file as it was found
    checked = cli("repair_store", cwd=tmp_path, uri=uri)
    assert checked.returncode == 0 and "no half-finished migration found" in checked.stdout


def test_a_leftover_that_may_hold_the_only_copy_of_rows_is_refused_untouched(
    broken_store, tmp_path
):
    store = with_a_run(broken_store, tmp_path)
    with sqlite3.connect(store) as connection:
        leftover = leftover_tables(connection)[0]
        connection.execute("PRAGMA foreign_keys = OFF")
        connection.execute(f'DROP TABLE "{leftover.removeprefix(LEFTOVER_PREFIX)}"')
    before = hashlib.sha256(store.read_bytes()).hexdigest()
    done = cli("repair_store", "--tracking-uri", f"sqlite:///{store}", cwd=tmp_path, uri="")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert (
        f"ALTER TABLE {leftover} RENAME TO" in done.stderr and "Nothing was changed" in done.stderr
    )
    assert hashlib.sha256(store.read_bytes()).hexdigest() == before
