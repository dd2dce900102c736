"""Optuna (TPE with median or Hyperband pruning) against a grid search over the same space.

The space is three of `experiments/search_spaces/cnn.yaml`'s parameters: lr and weight decay (log
scale) and width. The grid takes three values of each (27 points); Optuna searches the box those values
span (lr and weight decay continuous, width the same three choices), or with `--discrete` only the
grid's own values. Both use the tune stage's own objective, sampler and pruner (the one training loop,
nested MLflow runs). The grid trains every point for the full epochs; Optuna gets at most `--budget`
(default 60%) of the grid's training epochs, counting the epochs that pruned trials spent.

Every search's trials are saved to `--cache-dir` (one JSON file each) and reused on the next call
(training is seeded), so searches can be added a few at a time; `--jobs N` runs N searches at once in
worker processes, splitting the CPU cores between them. Writes the best-so-far curves (best validation
accuracy against epochs spent) to `--plot` and the numbers as JSON to `--report` and stdout.

A search's best value is the best of many noisy runs, so it flatters its configuration. Each search's
pick is therefore also retrained with `--rescore-seeds` (fresh validation splits and
initializations, cached in `rescore-<device>.json`) and compared with the grid's pick seed by seed;
that plot goes beside `--plot` as `<name>_rescored.png`.

    python benchmarks/tune_vs_grid.py [--epochs 8] [--budget 0.6] [--pruners median hyperband]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import multiprocessing
import os
import statistics
import tempfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import mlflow
import optuna
import torch
from optuna.distributions import distribution_to_json, json_to_distribution

from pipeline.config import TuneConfig
from pipeline.data.sources import load_training_set
from pipeline.tracking.study import make_pruner, make_sampler
from pipeline.training.precision import select_device
from pipeline.tune import make_objective

SUBSET = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-subset"
GRID = {"lr": [0.0005, 0.002, 0.008], "weight_decay": [0.0001, 0.001, 0.01], "width": [16, 32, 48]}
GRID_SPACE = {name: {"type": "categorical", "choices": values} for name, values in GRID.items()}
BOX_SPACE = {
    "lr": {"type": "float", "low": 0.0005, "high": 0.008, "log": True},
    "weight_decay": {"type": "float", "low": 0.0001, "high": 0.01, "log": True},
    "width": GRID_SPACE["width"],
}
GRID_SIZE = len(list(itertools.product(*GRID.values())))


def with_epochs_spent(study: optuna.Study) -> Iterator[tuple[int, optuna.trial.FrozenTrial]]:
    """Each trial in the order it ran, with the training epochs spent once it had finished."""
    spent = 0
    for trial in sorted(study.trials, key=lambda t: t.number):
        spent += trial.user_attrs.get("epochs_spent", 0)
        yield spent, trial


def curve(study: optuna.Study) -> list[tuple[int, float]]:
    """(epochs spent so far, best completed-trial validation accuracy so far) after each trial."""
    best, points = 0.0, []
    for spent, trial in with_epochs_spent(study):
        if trial.state == optuna.trial.TrialState.COMPLETE:
            best = max(best, trial.value)
        points.append((spent, best))
    return points


def save_trials(study: optuna.Study, settings: dict, path: Path) -> None:
    trials = [
        {
            "params": t.params,
            "distributions": {k: distribution_to_json(v) for k, v in t.distributions.items()},
            "value": t.value,
            "state": t.state.name,
            "intermediate_values": t.intermediate_values,
            "user_attrs": t.user_attrs,
        }
        for t in study.trials
    ]
    path.write_text(json.dumps({"settings": settings, "trials": trials}, indent=1))


def load_trials(path: Path, settings: dict) -> optuna.Study:
    saved = json.loads(path.read_text())
    if saved["settings"] != settings:
        raise SystemExit(
            f"{path} was made with {saved['settings']}, not {settings}: "
            "delete it or pass another --cache-dir."
        )
    study = optuna.create_study(direction="maximize", study_name=path.stem)
    for t in saved["trials"]:
        distributions = {k: json_to_distribution(v) for k, v in t.pop("distributions").items()}
        state = optuna.trial.TrialState[t.pop("state")]
        steps = {int(k): v for k, v in t.pop("intermediate_values").items()}
        study.add_trial(
            optuna.trial.create_trial(
                state=state, distributions=distributions, intermediate_values=steps, **t
            )
        )
    return study


def run_search(name, config, space, data, sampler, pruner, budget_epochs=None) -> optuna.Study:
    study = optuna.create_study(
        direction="maximize", sampler=sampler, pruner=pruner, study_name=name
    )
    callbacks = []
    if budget_epochs is not None:

        def stop_at_budget(study: optuna.Study, _trial) -> None:
            spent = sum(t.user_attrs.get("epochs_spent", 0) for t in study.trials)
            tried = {json.dumps(t.params, sort_keys=True) for t in study.trials}
            if spent >= budget_epochs or (space is GRID_SPACE and len(tried) == GRID_SIZE):
                study.stop()

        callbacks.append(stop_at_budget)
    with mlflow.start_run(run_name=name) as parent:
        study.optimize(
            make_objective(config, space, data, parent.info.run_id),
            n_trials=1000 if budget_epochs else None,
            callbacks=callbacks,
        )
    return study


@dataclasses.dataclass(frozen=True)
class Search:
    """One search of the benchmark: the grid (pruner None) or an Optuna search."""

    name: str
    pruner: str | None = None
    prune_after_epochs: int = 0
    sampler_seed: int = 0


def cache_settings(search: Search, args: argparse.Namespace) -> dict:
    """What a saved search depends on besides its name."""
    settings = {"epochs": args.epochs, "max_train_images": args.max_train_images}
    if search.pruner is not None:
        settings |= {"budget": args.budget, "startup_trials": args.startup_trials}
    return settings


def benchmark_config(args: argparse.Namespace, **fields) -> TuneConfig:
    return TuneConfig(
        model="cnn",
        data_dir=str(args.subset),
        epochs=args.epochs,
        max_train_images=args.max_train_images,
        startup_trials=args.startup_trials,
        **fields,
    )


def run_cached_search(search: Search, args: argparse.Namespace, threads: int) -> None:
    """Runs `search` and saves its trials, unless the cache already holds them."""
    path = args.cache_dir / f"{search.name}.json"
    if path.is_file():
        return
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(threads)
    config = benchmark_config(
        args,
        pruner=search.pruner or "none",
        prune_after_epochs=search.prune_after_epochs,
        sampler_seed=search.sampler_seed,
    )
    data = load_training_set(args.subset, download=False)
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
        mlflow.set_experiment("tune-vs-grid")
        if search.pruner is None:
            sampler = optuna.samplers.GridSampler(GRID, seed=0)
            study = run_search(search.name, config, GRID_SPACE, data, sampler, make_pruner(config))
        else:
            study = run_search(
                search.name,
                config,
                GRID_SPACE if args.discrete else BOX_SPACE,
                data,
                make_sampler(config),
                make_pruner(config),
                budget_epochs=int(args.budget * GRID_SIZE * args.epochs),
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    save_trials(study, cache_settings(search, args), path)


def search_pick(study: optuna.Study, budget_epochs: int) -> optuna.trial.FrozenTrial:
    """The configuration a search hands on: its best trial that completed within the budget."""
    best = None
    for spent, trial in with_epochs_spent(study):
        if spent > budget_epochs:
            break
        if trial.state == optuna.trial.TrialState.COMPLETE and (
            best is None or trial.value > best.value
        ):
            best = trial
    return best


def rescore_key(params: dict, seed: int) -> str:
    return json.dumps({"params": params, "seed": seed}, sort_keys=True)


def rescore(picks: list[dict], seed: int, args: argparse.Namespace, threads: int) -> dict:
    """Retrains every pick for the full epochs, unpruned, with `seed`: a validation split and an
    initialization that no search saw, so the pick's score is not the luck it was picked for."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(threads)
    config = benchmark_config(args, seed=seed, pruner="none")
    data = load_training_set(args.subset, download=False)
    study = optuna.create_study(direction="maximize", pruner=make_pruner(config))
    for params in picks:
        study.enqueue_trial(params)
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
        mlflow.set_experiment("tune-vs-grid-rescore")
        with mlflow.start_run(run_name=f"rescore-seed{seed}") as parent:
            objective = make_objective(config, BOX_SPACE, data, parent.info.run_id)
            study.optimize(objective, n_trials=len(picks))
    return {rescore_key(t.params, seed): t.value for t in study.trials}


def rescore_cached(picks: list[dict], args: argparse.Namespace, pool, threads: int) -> dict:
    """Every pick's validation accuracy under each of `--rescore-seeds`, trained where not cached.

    Kept per device beside the searches: a search's picks may be retrained on another machine."""
    path = args.cache_dir / f"rescore-{select_device().type}.json"
    settings = {"epochs": args.epochs, "max_train_images": args.max_train_images}
    saved = json.loads(path.read_text()) if path.is_file() else {"settings": settings, "runs": {}}
    if saved["settings"] != settings:
        raise SystemExit(f"{path} was made with {saved['settings']}, not {settings}: delete it.")
    runs = saved["runs"]
    todo = {
        seed: [p for p in picks if rescore_key(p, seed) not in runs] for seed in args.rescore_seeds
    }
    todo = {seed: missing for seed, missing in todo.items() if missing}
    for done in pool.map(
        rescore, todo.values(), todo.keys(), [args] * len(todo), [threads] * len(todo)
    ):
        runs |= done
    if todo:
        path.write_text(json.dumps(saved, indent=1))
    return runs


def rescore_report(
    picks: dict[str, optuna.trial.FrozenTrial], runs: dict, seeds: list[int]
) -> dict:
    """Each search's pick retrained with fresh seeds, and its paired difference to the grid's pick."""
    scores = {
        name: [runs[rescore_key(pick.params, seed)] for seed in seeds]
        for name, pick in picks.items()
    }
    grid_scores = scores["grid"]
    report = {}
    for name, values in scores.items():
        entry = {
            "params": picks[name].params,
            "search_val_accuracy": round(picks[name].value, 4),
            "per_seed": dict(zip(seeds, values, strict=True)),
            "mean": round(statistics.fmean(values), 4),
        }
        if name != "grid":
            diffs = [v - g for v, g in zip(values, grid_scores, strict=True)]
            entry["minus_grid_mean"] = round(statistics.fmean(diffs), 4)
            if len(diffs) > 1:
                entry["minus_grid_standard_error"] = round(
                    statistics.stdev(diffs) / len(diffs) ** 0.5, 4
                )
        report[name] = entry
    return report


def search_report(study: optuna.Study, points, grid_best: float, grid_epochs: int) -> dict:
    reached = next((spent for spent, best in points if best >= grid_best), None)
    return {
        "trials": len(study.trials),
        "pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials),
        "epochs": points[-1][0],
        "best_val_accuracy": round(points[-1][1], 4),
        "best_params": study.best_params,
        "epochs_to_reach_grid_best": reached,
        "fraction_of_grid_epochs": None if reached is None else round(reached / grid_epochs, 3),
        "trials_run": [
            [
                t.params,
                t.state.name,
                t.value,
                t.user_attrs.get("epochs_spent"),
                [round(v, 4) for _, v in sorted(t.intermediate_values.items())],
            ]
            for t in study.trials
        ],
    }


def plot_curves(
    grid_curve, curves: dict, budget: float, grid_epochs: int, title: str, path
) -> None:
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.step(*zip(*grid_curve, strict=True), where="post", label="grid search", marker="o")
    for label, points in curves.items():
        axis.step(*zip(*points, strict=True), where="post", label=label, marker=".")
    axis.axvline(budget * grid_epochs, color="grey", linestyle="--", label=f"{budget:.0%} of grid")
    axis.set_xlabel("training epochs spent")
    axis.set_ylabel("best validation accuracy so far")
    axis.set_title(title)
    axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def plot_rescored(rescored: dict, path: Path) -> None:
    """Each pick's accuracy in its search beside its accuracies when retrained with fresh seeds."""
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for x, entry in enumerate(rescored.values()):
        fresh = list(entry["per_seed"].values())
        axis.scatter([x] * len(fresh), fresh, color="tab:blue", alpha=0.5, s=15)
        axis.scatter(x, entry["mean"], color="tab:blue", marker="_", s=400)
        axis.scatter(x, entry["search_val_accuracy"], color="tab:red", marker="*", s=80)
    axis.scatter([], [], color="tab:red", marker="*", label="in its search (the best of many runs)")
    axis.scatter([], [], color="tab:blue", s=15, label="retrained with a fresh seed (bar: mean)")
    axis.set_xticks(range(len(rescored)), [f"{name}'s pick" for name in rescored])
    axis.set_ylabel("validation accuracy")
    axis.set_title("each search's chosen configuration, retrained")
    axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--subset", type=Path, default=SUBSET)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--budget", type=float, default=0.6)
    parser.add_argument("--max-train-images", type=int, default=0, help="0: the whole subset")
    parser.add_argument(
        "--seeds", type=int, nargs="*", default=[0], help="TPE seeds, one search each"
    )
    parser.add_argument(
        "--startup-trials", type=int, default=4, help="TPE's random start-up trials"
    )
    parser.add_argument(
        "--discrete", action="store_true", help="Optuna samples the grid's values only"
    )
    parser.add_argument(
        "--pruners", nargs="*", default=["median", "hyperband"], help="pruner[:prune_after_epochs]"
    )
    parser.add_argument(
        "--rescore-seeds",
        type=int,
        nargs="*",
        default=[1, 2, 3, 4],
        help="retrain each search's pick with these seeds (new split and initialization)",
    )
    parser.add_argument("--jobs", type=int, default=1, help="searches or rescorings run at once")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(__file__).with_name(f"tune_vs_grid_{select_device().type}"),
        help="every search's trials, saved and reused (training is seeded); delete to rerun",
    )
    parser.add_argument("--plot", type=Path, default=Path(__file__).with_name("tune_vs_grid.png"))
    parser.add_argument("--report", type=Path, default=Path("tune_vs_grid_report.json"))
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    prefix = "discrete-" if args.discrete else ""
    searches = [Search("grid")] + [
        Search(
            f"{prefix}{variant.replace(':', '-')}-seed{seed}",
            variant.partition(":")[0],
            int(variant.partition(":")[2] or 0),
            seed,
        )
        for variant in args.pruners
        for seed in args.seeds
    ]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    grid_epochs = GRID_SIZE * args.epochs
    budget_epochs = int(args.budget * grid_epochs)
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(
            pool.map(run_cached_search, searches, [args] * len(searches), [threads] * len(searches))
        )
        studies = {
            search: load_trials(
                args.cache_dir / f"{search.name}.json", cache_settings(search, args)
            )
            for search in searches
        }
        picks = {
            search.name: search_pick(study, grid_epochs if search.pruner is None else budget_epochs)
            for search, study in studies.items()
        }
        unique_picks = list(
            {json.dumps(p.params, sort_keys=True): p.params for p in picks.values()}.values()
        )
        rescored = rescore_cached(unique_picks, args, pool, threads)
    grid = studies.pop(searches[0])
    grid_curve = curve(grid)
    grid_best = grid_curve[-1][1]
    report = {
        "device": str(select_device()),
        "grid_epochs": grid_epochs,
        "grid_best_val_accuracy": round(grid_best, 4),
        "grid_best_params": grid.best_params,
        "optuna_space": "grid values" if args.discrete else "box",
        "startup_trials": args.startup_trials,
        "grid": [[t.params, round(t.value, 4)] for t in grid.trials],
    }
    if args.rescore_seeds:
        report["rescored"] = rescore_report(picks, rescored, args.rescore_seeds)
        plot_rescored(report["rescored"], args.plot.with_name(f"{args.plot.stem}_rescored.png"))
    optuna_curves = {search: curve(study) for search, study in studies.items()}
    for search, study in studies.items():
        report[search.name] = search_report(study, optuna_curves[search], grid_best, grid_epochs)
    args.report.write_text(json.dumps(report, indent=1))
    plot_curves(
        grid_curve,
        {f"Optuna, {search.name}": points for search, points in optuna_curves.items()},
        args.budget,
        grid_epochs,
        f"cnn on the real CIFAR-10 subset, {args.epochs} epochs per trial",
        args.plot,
    )
    summary = {k: v for k, v in report.items() if k != "grid"}
    for search in studies:
        summary[search.name] = {k: v for k, v in report[search.name].items() if k != "trials_run"}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
