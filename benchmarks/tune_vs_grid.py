"""Optuna (TPE with median or Hyperband pruning) against a grid search over the same space.

The space is three of `experiments/search_spaces/cnn.yaml`'s parameters: lr and weight decay (log
scale) and width. The grid takes three values of each (27 points); Optuna searches the box those values
span (lr and weight decay continuous, width the same three choices), or with `--discrete` only the
grid's own values. Both use the tune stage's own objective (the one training loop, nested MLflow
runs). The grid trains every point for the full epochs; Optuna gets at most `--budget` (default 60%)
of the grid's training epochs, counting the epochs that pruned trials spent. Writes the best-so-far
curves (best validation accuracy against epochs spent) to `--plot` and the numbers as JSON to
`--report` (rewritten after each search) and stdout.

    python benchmarks/tune_vs_grid.py [--epochs 8] [--budget 0.6] [--pruners median hyperband]
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
from pipeline.train import select_device
from pipeline.tune import make_objective, make_pruner

SUBSET = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-subset"
GRID = {"lr": [0.0005, 0.002, 0.008], "weight_decay": [0.0001, 0.001, 0.01], "width": [16, 32, 48]}
GRID_SPACE = {name: {"type": "categorical", "choices": values} for name, values in GRID.items()}
BOX_SPACE = {
    "lr": {"type": "float", "low": 0.0005, "high": 0.008, "log": True},
    "weight_decay": {"type": "float", "low": 0.0001, "high": 0.01, "log": True},
    "width": GRID_SPACE["width"],
}
GRID_SIZE = len(list(itertools.product(*GRID.values())))


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
        "--discrete", action="store_true", help="Optuna samples the grid's values only"
    )
    parser.add_argument("--plot", type=Path, default=Path(__file__).with_name("tune_vs_grid.png"))
    parser.add_argument("--report", type=Path, default=Path("tune_vs_grid_report.json"))
    parser.add_argument(
        "--pruners", nargs="*", default=["median", "hyperband"], help="pruner[:prune_after_epochs]"
    )
    parser.add_argument(
        "--grid-cache",
        type=Path,
        default=Path(__file__).with_name("tune_vs_grid_grid.json"),
        help="the grid's trials, saved and reused (training is seeded); delete to rerun",
    )
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    grid_epochs = GRID_SIZE * args.epochs
    space = GRID_SPACE if args.discrete else BOX_SPACE
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
        mlflow.set_experiment("tune-vs-grid")
        config = TuneConfig(
            model="cnn",
            data_dir=str(args.subset),
            epochs=args.epochs,
            max_train_images=args.max_train_images,
        )
        data = load_training_set(args.subset, download=False)
        if args.grid_cache.is_file():
            grid = load_trials(args.grid_cache)
        else:
            grid_sampler = optuna.samplers.GridSampler(GRID, seed=0)
            grid = run_search(
                "grid", config, GRID_SPACE, data, grid_sampler, optuna.pruners.NopPruner()
            )
            save_trials(grid, args.grid_cache)
        grid_curve = curve(grid)
        grid_best = grid_curve[-1][1]
        report = {
            "device": str(select_device()),
            "grid_epochs": grid_epochs,
            "grid_best_val_accuracy": round(grid_best, 4),
            "grid_best_params": grid.best_params,
            "optuna_space": "grid values" if args.discrete else "box",
            "grid": [[t.params, round(t.value, 4)] for t in grid.trials],
        }
        curves = {}
        for variant in args.pruners:
            pruner, _, after = variant.partition(":")
            tuned = TuneConfig(
                **{**config.__dict__, "pruner": pruner, "prune_after_epochs": int(after or 0)}
            )
            for seed in args.seeds:
                study = run_search(
                    f"optuna-{variant}-seed{seed}",
                    tuned,
                    space,
                    data,
                    optuna.samplers.TPESampler(seed=seed, n_startup_trials=4),
                    make_pruner(tuned),
                    budget_epochs=int(args.budget * grid_epochs),
                )
                points = curve(study)
                key = f"{variant} seed {seed}"
                report[key] = search_report(study, points, grid_best, grid_epochs)
                curves[f"Optuna TPE + {variant} pruning, seed {seed}"] = points
                args.report.write_text(json.dumps(report, indent=1))
    plot_curves(
        grid_curve,
        curves,
        args.budget,
        grid_epochs,
        f"cnn on the real CIFAR-10 subset, {args.epochs} epochs per trial",
        args.plot,
    )
    print(json.dumps({k: v for k, v in report.items() if k != "grid"}))


if __name__ == "__main__":
    main()
