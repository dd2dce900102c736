"""Train to a time budget: the probe's plan is logged, the run ends within its budget with its
learning-rate schedule complete, and a budget too small for one epoch is one line with the
smallest one that fits."""

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from pipeline.config import ConfigError, parse_duration

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "cnn", "--data-dir", "synthetic", "--width", "8", "--max-train-images", "512",
        "--experiment-name", "budget"]  # fmt: skip
BUDGET_S, MARGIN = 20, 1.10  # a run may end at most 10% past its budget


def train(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "train", *TINY, *args],
        env=env | {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_a_budgeted_run_ends_within_it_with_its_schedule_complete(tmp_path):
    done = train(tmp_path, "--time-budget", f"{BUDGET_S}s")
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"fit in 0m{BUDGET_S}s (one epoch ≈" in done.stderr
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = mlflow.search_runs(experiment_names=["budget"], output_format="list")[0]
    metrics, tags = run.data.metrics, run.data.tags
    planned = int(tags["time_budget_plan"].split(": ")[1].split(" epoch")[0])
    assert metrics["epochs_run"] == planned > 1
    assert run.data.params["time_budget"] == f"{BUDGET_S}s" and metrics["time_budget_seconds"] == 20
    assert metrics["train_seconds"] <= BUDGET_S * MARGIN, (metrics, tags["time_budget_plan"])
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "learning_rate")
    last = max(history, key=lambda m: m.step).value
    assert last < 1e-3 * float(run.data.params["lr"])  # the one-cycle schedule ran to its end


def test_a_budget_below_one_epoch_is_one_line_with_the_smallest_that_fits(tmp_path):
    done = train(tmp_path, "--time-budget", "1s")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    line = next(x for x in done.stderr.splitlines() if x.startswith("error:"))
    assert "cannot fit one epoch of cnn" in line and "give at least" in line


def test_durations_read_as_people_write_them():
    assert [parse_duration(t) for t in ("90s", "15m", "1h", "2.5min", "45")] == [
        90,
        900,
        3600,
        150,
        45,
    ]
    with pytest.raises(ConfigError, match="like 90s, 15m or 1h"):
        parse_duration("a quarter hour")
