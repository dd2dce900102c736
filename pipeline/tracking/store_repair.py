"""A half-migrated embedded SQLite store, found and repaired before a stage uses it.

MLflow migrates a `sqlite:///` store on first use with alembic. Alembic changes a SQLite table by
copying it: it creates `_alembic_tmp_<table>` in the new shape, copies the rows, drops the old
table and renames the copy. A process killed in between, or several processes migrating one fresh
file at once (reproduced in tests/test_store_repair.py), leaves the copy behind, and every later
migration stops at "table _alembic_tmp_<table> already exists": the store is unusable.

While the old table still exists it holds every row, so the copy is only debris: the repair backs
the file up, drops the copies and lets MLflow finish its migrations. A store that still cannot
migrate and holds no runs (a fresh one that broke in its first use) is set aside and started anew;
one with runs is left as it is, with the exact manual fix.
"""

from __future__ import annotations

import shutil
import sqlite3
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from filelock import FileLock

from pipeline.config import RepairStoreConfig
from pipeline.errors import PipelineError

LEFTOVER_PREFIX = "_alembic_tmp_"


class BrokenStoreError(PipelineError):
    """A store this module cannot repair without losing runs; the message has the manual fix."""


@dataclass
class StoreRepair:
    """What was found in the store and done about it."""

    path: Path
    leftovers: list[str] = field(default_factory=list)
    backup: Path | None = None
    revision_before: str | None = None
    runs: int = 0
    started_anew: bool = False

    def summary(self) -> str:
        if not self.leftovers:
            return f"{self.path}: no half-finished migration found"
        done = (
            f"set it aside and started a new store (it held no runs); the broken file is {self.backup}"
            if self.started_anew
            else f"dropped them and finished MLflow's migrations; {self.runs} run(s) kept, "
            f"the file before the repair is {self.backup}"
        )
        return (
            f"{self.path} was left half-migrated (leftover {', '.join(self.leftovers)} at schema "
            f"revision {self.revision_before}); {done}"
        )


def leftover_tables(connection: sqlite3.Connection) -> list[str]:
    rows = connection.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE ? ESCAPE '\\'",
        (LEFTOVER_PREFIX.replace("_", "\\_") + "%",),
    )
    return sorted(name for (name,) in rows)


def table_exists(connection: sqlite3.Connection, name: str) -> bool:
    found = connection.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
    ).fetchone()
    return found is not None


def count_rows(connection: sqlite3.Connection, table: str) -> int:
    if not table_exists(connection, table):
        return 0
    return connection.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0]


def schema_revision(connection: sqlite3.Connection) -> str | None:
    if not table_exists(connection, "alembic_version"):
        return None
    row = connection.execute("SELECT version_num FROM alembic_version").fetchone()
    return row[0] if row else None


def back_up(path: Path) -> Path:
    backup = path.with_name(f"{path.name}.before-repair-{time.strftime('%Y%m%d-%H%M%S')}")
    source = sqlite3.connect(path)
    try:
        with sqlite3.connect(backup) as target:
            source.backup(target)
    finally:
        source.close()
    return backup


def migrate(uri: str) -> None:
    """MLflow's own first-use step: create or upgrade the schema."""
    mlflow.MlflowClient(uri).search_experiments(max_results=1)


def sqlite_path(uri: str) -> Path | None:
    """The database file of an embedded SQLite URI (`sqlite:///path`), else None."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


@contextmanager
def first_use_lock(uri: str) -> Iterator[None]:
    """Serialize the first use of an embedded SQLite store across processes.

    Processes started together on a fresh store all run MLflow's (or Optuna's) schema migrations at
    once: most die in alembic, and the store can be left half-migrated. A lock file beside the
    database lets one process create it while the others wait, then find it ready.
    """
    path = sqlite_path(uri)
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{path}.lock", timeout=600):
        yield


def prepare_tracking_store() -> None:
    """Create or migrate the tracking store now, under `first_use_lock` when it is SQLite, after
    repairing a SQLite store an earlier first use left half-migrated."""
    uri = mlflow.get_tracking_uri()
    with first_use_lock(uri):
        if (path := sqlite_path(uri)) is not None:
            repair = repair_sqlite_store(path)
            if repair.leftovers:
                print(f"tracking store: {repair.summary()}", file=sys.stderr, flush=True)
        mlflow.MlflowClient(uri).search_experiments(max_results=1)


def run_repair_store(config: RepairStoreConfig) -> StoreRepair:
    """The `repair_store` command: check (and repair) the store now, and say what was found."""
    uri = config.tracking_uri or mlflow.get_tracking_uri()
    path = sqlite_path(uri)
    if path is None:
        raise BrokenStoreError(
            f"{uri} is not an embedded SQLite store (sqlite:///<file>); a tracking server's "
            "database migrates with `mlflow db upgrade <database URI>`."
        )
    with first_use_lock(uri):
        report = repair_sqlite_store(path.resolve())
        migrate(uri)
    print(f"repair_store: {report.summary()}", flush=True)
    return report


def repair_sqlite_store(path: Path) -> StoreRepair:
    """Find leftover migration tables in the store at `path` and repair it (call it under
    `first_use_lock`, so that no other process migrates the file meanwhile)."""
    report = StoreRepair(path)
    if not path.exists():
        return report
    with sqlite3.connect(path) as connection:
        report.leftovers = leftover_tables(connection)
        if not report.leftovers:
            return report
        report.revision_before = schema_revision(connection)
        report.runs = count_rows(connection, "runs")
        models = count_rows(connection, "registered_models")
        orphans = [
            name
            for name in report.leftovers
            if not table_exists(connection, name.removeprefix(LEFTOVER_PREFIX))
        ]
    report.backup = back_up(path)
    uri = f"sqlite:///{path}"
    if orphans and (report.runs or models):
        raise BrokenStoreError(
            f"{path} was left mid-migration with {', '.join(orphans)} but without the table it "
            f"replaces, so its rows may be only there. Nothing was changed (a copy is at "
            f"{report.backup}). Fix by hand: sqlite3 {path} 'ALTER TABLE {orphans[0]} RENAME TO "
            f"{orphans[0].removeprefix(LEFTOVER_PREFIX)}', then `mlflow db upgrade {uri}`."
        )
    if not orphans:
        with sqlite3.connect(path) as connection:
            for name in report.leftovers:
                connection.execute(f'DROP TABLE "{name}"')
        try:
            migrate(uri)
            return report
        except Exception as error:  # alembic and SQLAlchemy errors alike
            failure = str(error).splitlines()[0][:200]
    else:
        failure = f"{', '.join(orphans)} replaced tables that are gone"
    if report.runs or models:
        shutil.copyfile(report.backup, path)  # back as it was found
        raise BrokenStoreError(
            f"{path} was left half-migrated and MLflow's migration still fails after removing "
            f"{', '.join(report.leftovers)} ({failure}); it holds {report.runs} run(s), so it is "
            f"left as found (a copy is at {report.backup}). Fix by hand: `mlflow db upgrade {uri}` "
            "shows the failing step; a store with runs is never rebuilt automatically."
        )
    path.unlink()
    report.started_anew = True
    migrate(uri)
    return report
