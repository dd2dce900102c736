"""The `tune` stage: an Optuna study over a search space from `experiments/search_spaces/`.

Each trial trains with the same `fit()` as the train entry point, in its own nested MLflow run, and
reports per-epoch validation accuracy to the pruner. The study lives in Optuna storage (a local SQLite
file by default, any RDB URL otherwise), so rerunning with the same study name resumes it and several
processes or machines can work on one study at once.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import mlflow
import optuna
from optuna.study import MaxTrialsCallback
from optuna.trial import FrozenTrial, TrialState

from pipeline.config import (
    EXPERIMENTS_DIR,
    ConfigError,
    TrainConfig,
    TuneConfig,
    config_to_params,
    dump_yaml,
    read_yaml,
    resolve_train_config,
)
from pipeline.data.image_set import ImageSet
from pipeline.data.sources import load_training_set, make_splits
from pipeline.errors import Interrupted, PipelineError
from pipeline.model.architectures import get_spec
from pipeline.tracking.runs import (
    log_figure,
    log_lineage,
    log_resolved_params,
    print_summary,
    stage_run,
)
from pipeline.tracking.study import (
    RUN_ID_ATTR,
    EndRunThenRetry,
    default_storage,
    open_study,
    study_name_of,
)
from pipeline.tracking.training_run import TrainingRun, training_run
from pipeline.training.watchdog import WatchdogFinding

SEARCH_SPACES_DIR = EXPERIMENTS_DIR / "search_spaces"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
OBJECTIVE = "val_accuracy"
# Fields a best_config.yaml leaves out: they describe one run, not a recipe.
RUN_ONLY_FIELDS = ("experiment_name", "resume_run_id", "config")


def load_search_space(config: TuneConfig) -> dict[str, dict[str, Any]]:
    path = (
        Path(config.search_space)
        if config.search_space
        else SEARCH_SPACES_DIR / f"{config.model}.yaml"
    )
    space = read_yaml(path)
    known = (set(TrainConfig.__dataclass_fields__) - {"options", "from_recipe"}) | set(
        get_spec(config.model).options
    )
    for name, spec in space.items():
        if name not in known:
            raise ConfigError(f"{path}: {name!r} is not a train parameter; valid: {sorted(known)}.")
        if not isinstance(spec, Mapping) or spec.get("type") not in ("float", "int", "categorical"):
            raise ConfigError(f"{path}: {name} needs type float, int or categorical.")
    return space


def suggest(trial: optuna.Trial, space: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    values = {}
    for name, spec in space.items():
        if spec["type"] == "categorical":
            values[name] = trial.suggest_categorical(name, list(spec["choices"]))
        elif spec["type"] == "int":
            values[name] = trial.suggest_int(
                name, int(spec["low"]), int(spec["high"]), log=spec.get("log", False)
            )
        else:
            values[name] = trial.suggest_float(
                name, float(spec["low"]), float(spec["high"]), log=spec.get("log", False)
            )
    return values


class NoTrialCompletedError(PipelineError):
    """Every trial was pruned or failed: a study without a best trial."""


def trial_config(config: TuneConfig, values: Mapping[str, Any]) -> TrainConfig:
    return resolve_train_config(
        {
            "model": config.model,
            "data_dir": config.data_dir,
            "val_fraction": config.val_fraction,
            "seed": config.seed,
            "max_train_images": config.max_train_images,
            "skip_bad_images": config.skip_bad_images,
            "epochs": config.epochs,
            "time_budget": config.trial_time_budget,
        }
        | dict(values)
    )


def frozen(trial: optuna.Trial) -> FrozenTrial:
    """The study's record of a running trial (its system attributes say what it retries)."""
    return next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)


def finished_twin(trial: optuna.Trial) -> FrozenTrial | None:
    """An earlier finished trial with exactly these parameters (training is deterministic per seed,
    so it would end the same way): in discrete spaces TPE proposes repeats, which cost nothing here."""
    for other in trial.study.get_trials(deepcopy=False, states=FINISHED):
        if other.number != trial.number and other.params == trial.params:
            return other
    return None


def trial_name(number: int, params: Mapping[str, Any]) -> str:
    """`trial 7 · lr 0.00213 · batch_size 64 · width 48`: what tells trials apart in a table."""
    shown = [f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in params.items()]
    return " · ".join([f"trial {number}", *shown[:3]])


def record_outcome(trial: optuna.Trial, state: str, epochs_spent: int) -> None:
    """The trial's end state and training cost, on its nested run and in the study."""
    mlflow.set_tags({"trial_state": state, "epochs_spent": epochs_spent})
    trial.set_user_attr("epochs_spent", epochs_spent)


def make_objective(config: TuneConfig, space: Mapping, data: ImageSet, parent_run_id: str):
    def objective(trial: optuna.Trial) -> float:
        """The trial's value. A pruned trial's run ends FINISHED, tagged PRUNED: pruning is how a
        study is meant to work, not an error."""
        recipe = trial_config(config, suggest(trial, space))
        with (
            quiet_optuna_on_ctrl_c(),
            training_run(
                recipe,
                stage="tune trial",
                run_name=trial_name(trial.number, trial.params),
                parent_run_id=parent_run_id,
            ) as run,
        ):
            trial.set_user_attr(RUN_ID_ATTR, run.run_id)
            if retry_of := EndRunThenRetry.retry_history(frozen(trial))[-1:]:
                mlflow.set_tag("retry_of_trial", retry_of[0])
            mlflow.set_tags({"optuna_study": trial.study.study_name, "optuna_trial": trial.number})
            twin = finished_twin(trial)
            outcome = (
                twin_outcome(trial, twin, recipe)
                if twin is not None
                else train_trial(trial, run, recipe, data)
            )
        if isinstance(outcome, optuna.TrialPruned):
            raise outcome
        return outcome

    return objective


@contextmanager
def quiet_optuna_on_ctrl_c() -> Iterator[None]:
    """Optuna logs the interrupted trial with a traceback before it stops; the tune run says in
    one line what stopped and how to continue, so Optuna's warnings go quiet after a Ctrl-C."""
    try:
        yield
    except KeyboardInterrupt:
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        raise


def twin_outcome(
    trial: optuna.Trial, twin: FrozenTrial, recipe: TrainConfig
) -> float | optuna.TrialPruned:
    """A repeat of a finished trial ends as it did, at no cost."""
    mlflow.log_params(config_to_params(recipe))
    mlflow.set_tag("duplicate_of", twin.number)
    record_outcome(trial, twin.state.name, 0)
    if twin.state == TrialState.PRUNED:
        return optuna.TrialPruned(f"same parameters as pruned trial {twin.number}")
    mlflow.log_metric("best_val_accuracy", twin.value)
    return twin.value


def train_trial(
    trial: optuna.Trial, run: TrainingRun, recipe: TrainConfig, data: ImageSet
) -> float | optuna.TrialPruned:
    """Train one trial in its open run, reporting each epoch to the pruner."""
    run.prepare(data)
    epochs_spent = [0]

    def report(epoch: int, metrics: dict[str, float], checkpoint: Path | None) -> None:
        # After the last epoch pruning saves nothing and would throw the result away.
        epochs_spent[0] = epoch + 1
        trial.report(metrics["val_accuracy"], epoch)
        if epoch + 1 < run.resolved.epochs and trial.should_prune():  # a budget plans them
            raise optuna.TrialPruned(f"pruned after epoch {epoch + 1}")

    def prune_not_learning(finding: WatchdogFinding) -> None:
        raise optuna.TrialPruned(f"watchdog: {finding}")

    try:
        state = run.fit([report], on_finding=[prune_not_learning], checkpoints=False)
    except optuna.TrialPruned as pruned:
        record_outcome(trial, "PRUNED", epochs_spent[0])
        return pruned
    except Exception:
        record_outcome(trial, "FAIL", epochs_spent[0])
        raise
    record_outcome(trial, "COMPLETE", epochs_spent[0])
    return run.finish(state, log_model=False).best_val_accuracy


def print_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    """One line per finished trial, as the study records it (its nested run has the same)."""
    value = "" if trial.value is None else f"  val_accuracy {trial.value:.4f}"
    params = ", ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items()
    )
    print(f"trial {trial.number}  {trial.state.name}{value}  {params}", file=sys.stderr, flush=True)


def log_study_plots(study: optuna.Study) -> None:
    """Optuna's own plots; importances need at least two finished trials that differ."""
    from optuna.visualization import matplotlib as optuna_plots

    plots = {
        "optimization_history": optuna_plots.plot_optimization_history,
        "param_importances": optuna_plots.plot_param_importances,
        "parallel_coordinate": optuna_plots.plot_parallel_coordinate,
    }
    for name, plot in plots.items():
        try:
            axes = plot(study)
        except (ValueError, RuntimeError) as error:
            mlflow.log_text(f"{name} not drawn: {error}\n", f"plots/{name}.txt")
            continue
        figure = axes.flat[0].figure if hasattr(axes, "flat") else axes.figure
        log_figure(figure, f"plots/{name}.png")


@dataclass
class TuneResult:
    run_id: str
    study_name: str
    storage: str
    best_value: float
    best_params: dict[str, Any]
    best_config: dict[str, Any]


def run_tune(config: TuneConfig) -> TuneResult:
    """The `tune` entry point: this run is the parent, every trial a nested run."""
    with warnings.catch_warnings():
        # Heartbeats, their retry callback and metric names are marked experimental in Optuna
        # since 2.8-3.4; we rely on them on purpose, and the warning offers the user nothing to do.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optimize(config)


def run_trials(
    study: optuna.Study,
    config: TuneConfig,
    space: Mapping,
    data: ImageSet,
    parent_run_id: str,
    storage: str,
) -> dict[str, int]:
    """The study's trials, up to `n_trials` finished among every worker; the count of trials in
    each state, logged on the tune run. Ctrl-C leaves the study to be continued."""
    started = time.perf_counter()
    try:
        study.optimize(
            make_objective(config, space, data, parent_run_id),
            n_trials=config.n_trials,
            n_jobs=config.n_jobs,
            timeout=config.timeout_seconds,
            callbacks=[MaxTrialsCallback(config.n_trials, states=FINISHED), print_trial],
            catch=(RuntimeError,),
        )
    except KeyboardInterrupt:
        done = len(study.get_trials(deepcopy=False, states=FINISHED))
        raise Interrupted(
            f"tune run {parent_run_id} stopped by Ctrl-C with {done} of {config.n_trials} "
            f"trials finished; the study keeps them (the one running is marked failed). "
            f"Continue with the same command: study {study.study_name} in {storage} goes on "
            "where it stopped."
        ) from None
    trials = study.get_trials(deepcopy=False)
    counts = {state.name.lower(): sum(t.state == state for t in trials) for state in TrialState}
    mlflow.log_metrics(
        {f"trials_{k}": v for k, v in counts.items()}
        | {"tune_seconds": time.perf_counter() - started}
    )
    return counts


def optimize(config: TuneConfig) -> TuneResult:
    space = load_search_space(config)
    storage = config.storage or default_storage()
    study_name = study_name_of(config)
    with stage_run("tune", config.experiment_name, f"tune · {study_name}") as run:
        log_resolved_params(
            config_to_params(config) | {"storage": storage, "study_name": study_name}
        )
        data = load_training_set(config.data_dir, skip_bad_images=config.skip_bad_images)
        splits = make_splits(data, config.val_fraction, config.seed, config.max_train_images)
        log_lineage({"train": splits.train, "val": splits.val}, config_to_params(config))
        study = open_study(config, storage)
        study.set_metric_names([OBJECTIVE])
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        mlflow.log_text(dump_yaml(space), "search_space.yaml")
        counts = run_trials(study, config, space, data, run.info.run_id, storage)
        counted = ", ".join(f"{n} {k}" for k, n in counts.items() if n)
        if not counts["complete"]:
            log_study_plots(study)
            raise NoTrialCompletedError(
                f"no trial of study {study_name} completed ({counted}), so there is no best "
                "configuration. Each trial run says why it stopped (tags "
                "trial_state and watchdog_message). Fix: a search space whose learning rates can "
                "learn on this data, more -P n_trials=..., or -P pruner=none; the study keeps its "
                "trials, so the same command goes on with it."
            )
        best = study.best_trial
        best_config = {
            k: v
            for k, v in config_to_params(trial_config(config, best.params)).items()
            if k not in RUN_ONLY_FIELDS
        }
        mlflow.log_metrics({"best_val_accuracy": best.value, "best_trial": best.number})
        mlflow.log_params({f"best_{k}": v for k, v in best.params.items()})
        mlflow.log_text(dump_yaml(best_config), "best_config.yaml")
        log_study_plots(study)
        print_summary(
            "tune",
            {
                "study": f"{study.study_name} in {storage}",
                "trials": counted,
                "best trial": f"{best.number}: {OBJECTIVE} {best.value:.4f} with {best.params}",
            },
            f"mlflow artifacts download -r {run.info.run_id} -a best_config.yaml -d . && "
            "mlflow run . -e train --env-manager local -P config=best_config.yaml",
        )
    return TuneResult(
        run.info.run_id, study.study_name, storage, best.value, best.params, best_config
    )
