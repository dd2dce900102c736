import os
import re
import subprocess
import sys
import time
import uuid

import mlflow
import optuna
import pytest
import yaml

from pipeline.config import ConfigError, TuneConfig, resolve_train_config
from pipeline.tune import run_tune

POSTGRES_URL = os.environ.get("CIFAR10_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
TINY = {"model": "cnn", "data_dir": "synthetic", "epochs": 3, "max_train_images": 256}


@pytest.fixture
def space(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(
        "lr: {type: float, low: 0.0000001, high: 0.01, log: true}\n"
        "width: {type: categorical, choices: [4, 8]}\n"
        "batch_size: {type: categorical, choices: [64]}\n"
    )
    return str(path)


def nested_runs(parent_run_id: str, experiment: str):
    return mlflow.search_runs(
        experiment_names=[experiment], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'"
    )


@pytest.fixture
def storage(tmp_path):
    return f"sqlite:///{tmp_path / 'optuna.db'}"


@pytest.fixture
def tiny(tracking, storage, space):
    """A tiny study's config: real MLflow and Optuna storage in the test's temp dir."""
    return lambda **fields: TuneConfig(
        **(TINY | {"storage": storage, "search_space": space, "experiment_name": tracking} | fields)
    )


def test_tiny_study_end_to_end(tracking, tmp_path, storage, tiny, capsys, recwarn):
    config = tiny(n_trials=8, prune_after_epochs=2, study_name="tiny")
    result = run_tune(config)
    study = optuna.load_study(study_name="tiny", storage=storage)
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(finished) == 8
    printed = capsys.readouterr()
    trial_lines = re.findall(r"^trial (\d+)  (COMPLETE|PRUNED)", printed.err, re.M)
    assert sorted(int(n) for n, _ in trial_lines) == [t.number for t in finished]
    best = study.best_trial
    assert f"best trial: {best.number}: val_accuracy {best.value:.4f}" in printed.out
    assert "-P config=best_config.yaml" in printed.out
    assert study.metric_names == ["val_accuracy"]
    assert not [w for w in recwarn if issubclass(w.category, optuna.exceptions.ExperimentalWarning)]
    states = {t.state for t in finished}
    assert optuna.trial.TrialState.PRUNED in states and optuna.trial.TrialState.COMPLETE in states

    children = nested_runs(result.run_id, tracking)
    assert len(children) == 8
    by_trial = {
        int(n): s
        for n, s in zip(children["tags.optuna_trial"], children["tags.trial_state"], strict=True)
    }
    assert by_trial == {t.number: t.state.name for t in finished}
    assert children["metrics.val_accuracy"].notna().all()

    parent = mlflow.get_run(result.run_id)
    assert parent.data.metrics["best_val_accuracy"] == study.best_value
    assert parent.data.params["best_lr"] == str(study.best_params["lr"])
    best_config = yaml.safe_load(
        mlflow.artifacts.load_text(f"runs:/{result.run_id}/best_config.yaml")
    )
    path = tmp_path / "best_config.yaml"
    path.write_text(yaml.safe_dump(best_config))
    reloaded = resolve_train_config({"config": str(path)})
    assert (
        reloaded.lr == study.best_params["lr"]
        and reloaded.options["width"] == study.best_params["width"]
    )
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(result.run_id, "plots")}
    assert {"plots/optimization_history.png", "plots/parallel_coordinate.png"} <= artifacts

    resumed = run_tune(TuneConfig(**{**config.__dict__, "n_trials": 10}))
    study = optuna.load_study(study_name="tiny", storage=storage)
    assert len([t for t in study.trials if t.state.is_finished()]) == 10
    assert len(nested_runs(resumed.run_id, tracking)) == 2


def test_no_trial_is_pruned_after_its_last_epoch(storage, tiny):
    """Judged only at the final epoch, pruning would save nothing and discard finished results."""
    run_tune(tiny(epochs=2, n_trials=7, prune_after_epochs=2))
    trials = optuna.load_study(study_name="cnn-tune", storage=storage).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 7
    assert all(t.user_attrs["epochs_spent"] == 2 for t in trials)


def test_unknown_search_space_parameter_is_refused(tracking, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("learning_rate: {type: float, low: 0.1, high: 1}\n")
    with pytest.raises(ConfigError, match="'learning_rate' is not a train parameter"):
        run_tune(TuneConfig(**TINY, search_space=str(path), storage=f"sqlite:///{tmp_path}/o.db"))


def postgres_available() -> bool:
    try:
        import sqlalchemy

        with sqlalchemy.create_engine(POSTGRES_URL).connect():
            return True
    except Exception:
        return False


@pytest.fixture
def empty_postgres_database():
    """A new, empty PostgreSQL database (dropped afterwards), as on a team's first day."""
    import sqlalchemy

    name = f"optuna_test_{uuid.uuid4().hex[:8]}"
    admin = sqlalchemy.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    yield sqlalchemy.make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    with admin.connect() as connection:
        connection.execute(sqlalchemy.text(f"DROP DATABASE {name} WITH (FORCE)"))
    admin.dispose()


@pytest.mark.skipif(not postgres_available(), reason=f"PostgreSQL not reachable at {POSTGRES_URL}")
def test_two_workers_share_one_postgres_study(tracking, space, empty_postgres_database):
    """Both workers start at once on an empty database, so both try to create Optuna's tables."""
    storage = empty_postgres_database
    study_name = f"shared-{uuid.uuid4().hex[:8]}"
    command = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "tune",
        "--model",
        "cnn",
        "--data-dir",
        "synthetic",
        "--epochs",
        "2",
        "--max-train-images",
        "256",
        "--n-trials",
        "8",
        "--storage",
        storage,
        "--study-name",
        study_name,
        "--search-space",
        space,
        "--pruner",
        "none",
        "--experiment-name",
        tracking,
    ]
    workers = [
        subprocess.Popen(
            [*command, "--sampler-seed", str(seed)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in (1, 2)
    ]
    for worker in workers:
        assert worker.wait(timeout=600) == 0, worker.stderr.read()
    study = optuna.load_study(study_name=study_name, storage=storage)
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers)) and len(numbers) >= 6
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    parents = mlflow.search_runs(experiment_names=[tracking], filter_string="tags.stage = 'tune'")
    assert len(parents) == 2
    children = mlflow.search_runs(
        experiment_names=[tracking], filter_string="tags.optuna_trial != ''"
    )
    logged = sorted(int(n) for n in children["tags.optuna_trial"])
    assert logged == sorted(numbers)
    # Every trial is judged on the same validation split, whichever worker ran it.
    assert set(children["params.seed"]) == {"0"}


def tune_command(tracking: str, space: str, storage: str, **options) -> list[str]:
    settings = TINY | {"n_trials": 1, "pruner": "none", "heartbeat_seconds": 1} | options
    return [
        sys.executable, "-m", "pipeline.cli", "tune", f"--experiment-name={tracking}",
        f"--storage={storage}", f"--search-space={space}", "--study-name=killed",
        *(f"--{k.replace('_', '-')}={v}" for k, v in settings.items()),
    ]  # fmt: skip


@pytest.fixture
def learnable(tmp_path):
    """Learning rates that learn the synthetic set: no trial of it is stopped by the watchdog."""
    path = tmp_path / "learnable.yaml"
    path.write_text(
        "lr: {type: float, low: 0.001, high: 0.003, log: true}\n"
        "width: {type: categorical, choices: [8]}\n"
        "batch_size: {type: categorical, choices: [64]}\n"
    )
    return str(path)


def test_a_killed_workers_trial_run_is_ended_by_the_next_worker(
    tracking, learnable, storage, tmp_path
):
    """Worker A is SIGKILLed mid-trial. Once its heartbeat is stale (3 s here), worker B fails the
    trial, tags A's trial run with the retry and runs the retry itself; A's runs end KILLED (on
    the same machine B finds A's process gone before Optuna does; on another, by the heartbeat).

    A's trial must still be running when the kill comes: with a learning rate that cannot learn,
    the watchdog ended it after epoch 3, and on a busy machine the poll below saw epoch 1 too late
    (the flaky failure: no trial left to kill, A's run over before the kill)."""
    log_a = tmp_path / "worker_a.log"
    with log_a.open("w") as log:  # kept for the failure message: what A said before its kill
        worker_a = subprocess.Popen(
            tune_command(tracking, learnable, storage, epochs=500), stdout=log, stderr=log
        )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        trials = mlflow.search_runs(
            experiment_names=[tracking], filter_string="tags.optuna_trial = '0'"
        )
        if (
            len(trials)
            and "metrics.val_accuracy" in trials
            and trials["metrics.val_accuracy"].notna().any()
        ):
            break
        time.sleep(0.2)
    worker_a.kill()
    worker_a.wait()
    time.sleep(4)
    subprocess.run(
        tune_command(tracking, learnable, storage, epochs=1), check=True, capture_output=True
    )
    runs = mlflow.search_runs(experiment_names=[tracking])
    killed = runs[runs["tags.optuna_trial"] == "0"].iloc[0]
    retry = runs[runs["tags.optuna_trial"] == "1"].iloc[0]
    worker_a_said = log_a.read_text()[-3000:]
    assert killed["status"] == "KILLED", (killed.get("tags.error"), worker_a_said)
    assert killed["tags.retried_in_trial"] == "1", worker_a_said
    assert killed["tags.killed_reason"]
    assert retry["status"] == "FINISHED" and retry["tags.retry_of_trial"] == "0"
    assert (runs["status"] != "RUNNING").all(), runs[["tags.mlflow.runName", "status"]]
    study = optuna.load_study(study_name="killed", storage=storage)
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE"]


def test_a_study_whose_every_trial_is_stopped_ends_in_one_line(tracking, storage, tmp_path):
    """Learning rates far too small: the watchdog stops the trial, and the study has no best."""
    space = tmp_path / "hopeless.yaml"
    space.write_text("lr: {type: float, low: 0.0000001, high: 0.0000002}\n")
    done = subprocess.run(
        tune_command(tracking, str(space), storage, epochs=6), capture_output=True, text=True
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    line = next(x for x in done.stderr.splitlines() if x.startswith("error:"))
    assert "no trial of study killed completed (1 pruned)" in line and "--pruner=none" in line
    runs = mlflow.search_runs(experiment_names=[tracking])
    parent = runs[runs["tags.optuna_trial"].isna()].iloc[0]
    assert parent["status"] == "FAILED" and "no trial" in parent["tags.error"]
    assert runs[runs["tags.optuna_trial"] == "0"].iloc[0]["tags.trial_state"] == "PRUNED"


def test_each_trial_trains_the_epochs_that_fit_its_time_budget(tracking, tiny):
    result = run_tune(tiny(n_trials=2, pruner="none", trial_time_budget="12s"))
    children = nested_runs(result.run_id, tracking)
    assert len(children) == 2  # (the watchdog may still stop a trial that does not learn)
    for _, trial in children.iterrows():
        planned = int(trial["tags.time_budget_plan"].split(": ")[1].split(" epoch")[0])
        assert trial["metrics.time_budget_seconds"] == 12 and planned >= 1
        assert trial["params.epochs"] == str(planned)  # the plan, not the study's 3
    complete = children[children["tags.trial_state"] == "COMPLETE"]
    assert len(complete) >= 1
    assert (complete["metrics.train_seconds"] <= 12 * 1.1).all()
