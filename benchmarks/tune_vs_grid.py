"""Optuna (TPE + median pruning) against a grid search over the same space, on the real subset.

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

from pipeline.config import TuneConfig
from pipeline.data import load_training_set
from pipeline.tune import make_objective, make_pruner

SUBSET = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-subset"
SPACE = {
    "lr": {"type": "categorical", "choices": [0.001, 0.003, 0.01]},
    "width": {"type": "categorical", "choices": [16, 32]},
    "batch_size": {"type": "categorical", "choices": [64, 128]},
}


def curve(study: optuna.Study) -> list[tuple[int, float]]:
    """(epochs spent so far, best completed-trial validation accuracy so far) after each trial."""
    spent, best, points = 0, 0.0, []
    for trial in sorted(study.trials, key=lambda t: t.number):
        spent += trial.user_attrs.get("epochs_spent", 0)
        if trial.state == optuna.trial.TrialState.COMPLETE:
            best = max(best, trial.value)
        points.append((spent, best))
    return points


def run_search(name, config, data, sampler, pruner, budget_epochs=None) -> optuna.Study:
    study = optuna.create_study(
        direction="maximize", sampler=sampler, pruner=pruner, study_name=name
    )
    callbacks = []
    if budget_epochs is not None:

        def stop_at_budget(study: optuna.Study, _trial) -> None:
            if sum(t.user_attrs.get("epochs_spent", 0) for t in study.trials) >= budget_epochs:
                study.stop()

        callbacks.append(stop_at_budget)
    with mlflow.start_run(run_name=name) as parent:
        study.optimize(
            make_objective(config, SPACE, data, parent.info.run_id),
            n_trials=100 if budget_epochs else None,
            callbacks=callbacks,
        )
    return study


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--subset", type=Path, default=SUBSET)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--budget", type=float, default=0.6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", type=Path, default=Path(__file__).with_name("tune_vs_grid.png"))
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
        mlflow.set_experiment("tune-vs-grid")
        config = TuneConfig(
            model="cnn", data_dir=str(args.subset), epochs=args.epochs, seed=args.seed
        )
        data = load_training_set(args.subset, download=False)
        grid_space = {k: v["choices"] for k, v in SPACE.items()}
        grid_size = len(list(itertools.product(*grid_space.values())))
        grid = run_search(
            "grid",
            config,
            data,
            optuna.samplers.GridSampler(grid_space, seed=args.seed),
            optuna.pruners.NopPruner(),
        )
        grid_epochs = grid_size * args.epochs
        tpe = run_search(
            "optuna",
            config,
            data,
            optuna.samplers.TPESampler(seed=args.seed, n_startup_trials=4),
            make_pruner(config),
            budget_epochs=int(args.budget * grid_epochs),
        )
    grid_curve, tpe_curve = curve(grid), curve(tpe)
    grid_best = grid_curve[-1][1]
    reached = next((spent for spent, best in tpe_curve if best >= grid_best), None)
    figure, axis = plt.subplots(figsize=(7, 4))
    for points, label in ((grid_curve, "grid search"), (tpe_curve, "Optuna TPE + median pruning")):
        axis.step(
            [p[0] for p in points], [p[1] for p in points], where="post", label=label, marker="o"
        )
    axis.axvline(
        args.budget * grid_epochs,
        color="grey",
        linestyle="--",
        label=f"{args.budget:.0%} of grid epochs",
    )
    axis.set_xlabel("training epochs spent")
    axis.set_ylabel("best validation accuracy so far")
    axis.set_title(f"cnn on the real CIFAR-10 subset, {args.epochs} epochs per trial")
    axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(args.plot, dpi=120)
    print(
        json.dumps(
            {
                "grid_trials": len(grid.trials),
                "grid_epochs": grid_epochs,
                "grid_best_val_accuracy": round(grid_best, 4),
                "optuna_trials": len(tpe.trials),
                "optuna_pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in tpe.trials),
                "optuna_epochs": tpe_curve[-1][0],
                "optuna_best_val_accuracy": round(tpe_curve[-1][1], 4),
                "optuna_epochs_to_reach_grid_best": reached,
                "fraction_of_grid_epochs": None
                if reached is None
                else round(reached / grid_epochs, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
