"""Embedded SQLite stores used by several processes at once, as parallel workers on a fresh clone do.

Without the first-use lock, three processes on a fresh `mlflow.db` mostly die in MLflow's alembic
migrations (measured: 7 of 9 in 3 rounds), and can leave the store half-migrated.
"""

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import optuna
import pytest

from pipeline.tracking.runs import stage_run

ROUNDS, PROCESSES = 3, 3


def start_together(commands: list[list[str]], env: dict, cwd: Path) -> list[tuple[int, str]]:
    processes = [
        subprocess.Popen(
            command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for command in commands
    ]
    return [(p.wait(timeout=300), p.stdout.read()) for p in processes]


@pytest.mark.parametrize("round_number", range(ROUNDS))
def test_stages_started_together_on_a_fresh_tracking_store_all_finish(tmp_path, round_number):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_EXPERIMENT")}
    env["MLFLOW_TRACKING_URI"] = uri
    command = [sys.executable, "-m", "pipeline.cli", "promote"]
    results = start_together([command] * PROCESSES, env, tmp_path)
    assert all(code == 0 for code, _ in results), [out[-1500:] for _, out in results]
    runs = mlflow.MlflowClient(uri).search_runs(
        [mlflow.MlflowClient(uri).get_experiment_by_name("cifar10").experiment_id]
    )
    assert len(runs) == PROCESSES and all(r.info.status == "FINISHED" for r in runs)


@pytest.mark.parametrize("round_number", range(ROUNDS))
def test_tune_workers_opening_a_fresh_optuna_file_together_all_succeed(tmp_path, round_number):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    script = (
        "import sys, optuna; from pipeline.tracking.study import open_storage; "
        "optuna.create_study(study_name='s', storage=open_storage(sys.argv[1]), "
        "load_if_exists=True)"
    )
    results = start_together(
        [[sys.executable, "-c", script, storage]] * PROCESSES,
        os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        tmp_path,
    )
    assert all(code == 0 for code, _ in results), [out[-1500:] for _, out in results]
    assert [s.study_name for s in optuna.get_all_study_summaries(storage)] == ["s"]


HOLD_A_RUN = """
import sys, time
from pipeline.tracking.runs import stage_run
with stage_run("train", sys.argv[1], "held") as run:
    print(run.info.run_id, flush=True)
    time.sleep(600)
"""


def hold_a_run(experiment: str, env: dict, cwd: Path) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD_A_RUN, experiment],
        env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    return process, process.stdout.readline().strip()


def test_the_next_command_ends_a_killed_processs_run_and_leaves_a_live_ones(tracking, tmp_path):
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    killed, killed_run = hold_a_run(tracking, env, tmp_path)
    alive, alive_run = hold_a_run(tracking, env, tmp_path)
    try:
        killed.kill()
        killed.wait()
        assert mlflow.get_run(killed_run).info.status == "RUNNING"
        with stage_run("train", tracking, "next command"):
            pass
        ended = mlflow.get_run(killed_run)
        assert ended.info.status == "KILLED"
        assert (
            f"process {killed.pid} ended without closing the run"
            in ended.data.tags["killed_reason"]
        )
        assert mlflow.get_run(alive_run).info.status == "RUNNING"
    finally:
        alive.kill()
        alive.wait()
