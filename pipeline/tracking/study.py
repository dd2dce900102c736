"""Where a study's trials are kept and how they are drawn: Optuna's storage (a local SQLite file
or any RDB several workers share), the seeded sampler, the pruner, and the MLflow run of a trial
whose worker died, ended by whichever worker notices."""

from __future__ import annotations

import math
import time
from pathlib import Path

import mlflow
import optuna
import sqlalchemy.exc
from mlflow.entities import RunStatus
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from pipeline.config import TuneConfig
from pipeline.tracking.store_repair import first_use_lock

RUN_ID_ATTR = "mlflow_run_id"  # the trial's nested MLflow run, so another worker can end it


def default_storage() -> str:
    """A SQLite file beside the tracking store when that is SQLite, else in the working directory."""
    tracking = mlflow.get_tracking_uri()
    if tracking.startswith("sqlite:///"):
        return f"sqlite:///{Path(tracking.removeprefix('sqlite:///')).parent / 'optuna.db'}"
    return "sqlite:///optuna.db"


def make_pruner(config: TuneConfig) -> optuna.pruners.BasePruner:
    """No trial is judged before `prune_after_epochs` (default: three quarters of its epochs).

    While a one-cycle schedule is near its peak learning rate, validation accuracy says little about
    the final one (measured: rank correlation 0.0-0.2 at epochs 2-3 of 8, 0.77 at epoch 6), and
    pruning there stops the high-learning-rate runs that win at the end.
    """
    first_judged = config.prune_after_epochs or max(1, math.ceil(0.75 * config.epochs))
    if config.pruner == "hyperband":
        most = "auto" if config.trial_time_budget else config.epochs  # a budget plans the epochs
        return optuna.pruners.HyperbandPruner(min_resource=first_judged, max_resource=most)
    if config.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=first_judged - 1)
    return optuna.pruners.NopPruner()


def make_sampler(config: TuneConfig) -> optuna.samplers.TPESampler:
    """TPE seeded by `sampler_seed`, apart from `seed`: `seed` fixes the validation split and the
    initialization, which every worker of one study must share for its trials to be comparable,
    while each worker needs its own sampler seed or they would propose the same start-up trials."""
    seed = config.seed if config.sampler_seed is None else config.sampler_seed
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=config.startup_trials)


class EndRunThenRetry(RetryHeartbeatStaleTrialCallback):
    """Optuna fails a trial whose worker stopped heartbeating and enqueues a retry. The trial's
    MLflow run, which its dead worker could not end, is ended here as KILLED, tagged with the trial
    that retries it. It runs in whichever worker notices first, on any machine."""

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        super().__call__(study, trial)
        run_id = trial.user_attrs.get(RUN_ID_ATTR)
        if not run_id:
            return
        retries = [
            t.number
            for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
            if self.retry_history(t)[-1:] == [trial.number]
        ]
        client = mlflow.MlflowClient()
        client.set_tag(run_id, "retried_in_trial", retries[0] if retries else "none (max_retry)")
        # On the dead worker's own machine the next command may have ended the run already.
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_tag(
                run_id,
                "killed_reason",
                f"its worker stopped heartbeating; Optuna failed trial {trial.number}",
            )
            client.set_terminated(run_id, RunStatus.to_string(RunStatus.KILLED))


def open_storage(storage_url: str, heartbeat_seconds: int = 30, attempts: int = 5) -> RDBStorage:
    """Optuna's storage; heartbeats let a killed worker's trial be retried (after three missed
    beats).

    Workers started together on an empty database all create Optuna's tables at once, and all but one
    fail on a duplicate key (PostgreSQL); the DDL rolls back, so the losers retry and find the tables.
    An embedded SQLite file is created under a file lock instead (`first_use_lock`).
    """
    for attempt in range(1, attempts + 1):
        try:
            with first_use_lock(storage_url):
                return RDBStorage(
                    storage_url,
                    heartbeat_interval=heartbeat_seconds,
                    grace_period=3 * heartbeat_seconds,
                    heartbeat_stale_trial_callback=EndRunThenRetry(max_retry=2),
                )
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            if attempt == attempts:
                raise
            time.sleep(0.5 * attempt)


def study_name_of(config: TuneConfig) -> str:
    return config.study_name or f"{config.model}-tune"


def open_study(config: TuneConfig, storage_url: str) -> optuna.Study:
    """Create or resume the study."""
    storage = open_storage(storage_url, config.heartbeat_seconds)
    return optuna.create_study(
        study_name=study_name_of(config),
        storage=storage,
        direction="maximize",
        sampler=make_sampler(config),
        pruner=make_pruner(config),
        load_if_exists=True,
    )
