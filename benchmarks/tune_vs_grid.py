"""Optuna (TPE with median or Hyperband pruning) against a grid search over the same space.

Both searches use the tune stage's own objective (the one training loop, nested MLflow runs). The grid
trains every combination for the full epochs; Optuna gets at most `--budget` (default 60%) of the
grid's training epochs, counting the epochs that pruned trials spent. Writes the best-so-far curves
(best validation accuracy against epochs spent) to `--plot` and prints the numbers as JSON.

    python benchmarks/tune_vs_grid.py [--epochs 8] [--budget 0.6] [--plot benchmarks/tune_vs_grid.png]
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import mlflow
import optuna
from optuna.distributions import distribution_to_json, json_to_distribution

from pipeline.config import TuneConfig
from pipeline.data import load_training_set
from pipeline.tune import make_objective, make_pruner

SUBSET = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-subset"
SPACE = {
    "lr": {"type": "categorical", "choices": [0.001, 0.003, 0.01]},
    "width": {"type": "categorical", "choices": [16, 32]},
    "batch_size": {"type": "categorical", "choices": [64, 128]},
}
GRID_SIZE = len(list(itertools.product(*(v["choices"] for v in SPACE.values()))))


def curve(study: optuna.Study) -> list[tuple[int, float]]:
    """(epochs spent so far, best completed-trial validation accuracy so far) after each trial."""
    spent, best, points = 0, 0.0, []
    for trial in sorted(study.trials, key=lambda t: t.number):
        spent += trial.user_attrs.get("epochs_spent", 0)
        if trial.state == optuna.trial.TrialState.COMPLETE:
            best = max(best, trial.value)
        points.append((spent, best))
    return points


def save_trials(study: optuna.Study, path: Path) -> None:
    trials = [
        {
            "params": t.params,
            "distributions": {k: distribution_to_json(v) for k, v in t.distributions.items()},
            "value": t.value,
            "user_attrs": t.user_attrs,
        }
        for t in study.trials
    ]
    path.write_text(json.dumps(trials, indent=1))


def load_trials(path: Path) -> optuna.Study:
    study = optuna.create_study(direction="maximize", study_name="grid")
    for t in json.loads(path.read_text()):
        distributions = {k: json_to_distribution(v) for k, v in t.pop("distributions").items()}
        study.add_trial(optuna.trial.create_trial(distributions=distributions, **t))
    return study


def run_search(name, config, data, sampler, pruner, budget_epochs=None) -> optuna.Study:
    study = optuna.create_study(
        direction="maximize", sampler=sampler, pruner=pruner, study_name=name
    )
    callbacks = []
    if budget_epochs is not None:

        def stop_at_budget(study: optuna.Study, _trial) -> None:
            spent = sum(t.user_attrs.get("epochs_spent", 0) for t in study.trials)
            tried = {json.dumps(t.params, sort_keys=True) for t in study.trials}
            if spent >= budget_epochs or len(tried) == GRID_SIZE:
                study.stop()

        callbacks.append(stop_at_budget)
    with mlflow.start_run(run_name=name) as parent:
        study.optimize(
            make_objective(config, SPACE, data, parent.info.run_id),
            n_trials=100 if budget_epochs else None,
            callbacks=callbacks,
        )
    return study


def search_report(study: optuna.Study, points, grid_best: float, grid_epochs: int) -> dict:
    reached = next((spent for spent, best in points if best >= grid_best), None)
    return {
        "trials": len(study.trials),
        "pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials),
        "epochs": points[-1][0],
        "best_val_accuracy": round(points[-1][1], 4),
        "epochs_to_reach_grid_best": reached,
        "fraction_of_grid_epochs": None if reached is None else round(reached / grid_epochs, 3),
        "trials_run": [
            [t.params, t.state.name, t.value, t.user_attrs.get("epochs_spent")]
            for t in study.trials
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--subset", type=Path, default=SUBSET)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--budget", type=float, default=0.6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", type=Path, default=Path(__file__).with_name("tune_vs_grid.png"))
    parser.add_argument(
        "--pruners", nargs="*", default=["median", "hyperband"], help="pruner[:prune_after_epochs]"
    )
    parser.add_argument(
        "--grid-cache",
        type=Path,
        default=Path(__file__).with_name("tune_vs_grid_grid.json"),
        help="the grid's trials, saved and reused (training is deterministic); delete to rerun",
    )
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    grid_space = {k: v["choices"] for k, v in SPACE.items()}
    grid_epochs = GRID_SIZE * args.epochs
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
        mlflow.set_experiment("tune-vs-grid")
        config = TuneConfig(
            model="cnn", data_dir=str(args.subset), epochs=args.epochs, seed=args.seed
        )
        data = load_training_set(args.subset, download=False)
        if args.grid_cache.is_file():
            grid = load_trials(args.grid_cache)
        else:
            grid_sampler = optuna.samplers.GridSampler(grid_space, seed=args.seed)
            grid = run_search("grid", config, data, grid_sampler, optuna.pruners.NopPruner())
            save_trials(grid, args.grid_cache)
        searches = {}
        for variant in args.pruners:
            pruner, _, after = variant.partition(":")
            tuned = TuneConfig(
                **{**config.__dict__, "pruner": pruner, "prune_after_epochs": int(after or 0)}
            )
            searches[variant] = run_search(
                f"optuna-{variant}",
                tuned,
                data,
                optuna.samplers.TPESampler(seed=args.seed, n_startup_trials=4),
                make_pruner(tuned),
                budget_epochs=int(args.budget * grid_epochs),
            )
    grid_curve = curve(grid)
    grid_best = grid_curve[-1][1]
    report = {
        "grid_epochs": grid_epochs,
        "grid_best_val_accuracy": round(grid_best, 4),
        "grid_best_params": grid.best_params,
        "grid": [[t.params, round(t.value, 4)] for t in grid.trials],
    }
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.step(*zip(*grid_curve, strict=True), where="post", label="grid search", marker="o")
    for variant, study in searches.items():
        points = curve(study)
        report[variant] = search_report(study, points, grid_best, grid_epochs)
        label = f"Optuna TPE + {variant} pruning"
        axis.step(*zip(*points, strict=True), where="post", label=label, marker="o")
    axis.axvline(
        args.budget * grid_epochs, color="grey", linestyle="--", label=f"{args.budget:.0%} of grid"
    )
    axis.set_xlabel("training epochs spent")
    axis.set_ylabel("best validation accuracy so far")
    axis.set_title(f"cnn on the real CIFAR-10 subset, {args.epochs} epochs per trial")
    axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(args.plot, dpi=120)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
