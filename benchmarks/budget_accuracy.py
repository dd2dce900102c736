"""Accuracy against a time budget: the real `train --time-budget` for each model, budget and
precision, on the data a user gives it (the full JPEG set for RESULTS).

Each run is the `train` command as users type it (`time_to_accuracy.run_recipe`); what it planned
(the start line's words, the planned seconds) and what it really took come back from the run's
tracking. `--precision fp32` stands in for a CPU without bfloat16 (AVX2 only) on one that has it.
At the end one plot, best validation accuracy against budget with a line per model and precision,
is written beside `--output` and logged with the JSON lines to an MLflow run
(experiment `budget-accuracy`).

    python -m benchmarks.budget_accuracy --data-dir ../shared/data/cifar10-jpeg/train.tar.gz \\
        --model fastnet --model cnn --budget 5m --budget 15m --precision auto --precision fp32 \\
        --output benchmarks/results/budget_accuracy_cpu.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402

from benchmarks.machine import machine  # noqa: E402
from benchmarks.time_to_accuracy import emit, run_recipe  # noqa: E402
from pipeline.config import parse_duration  # noqa: E402

EXPERIMENT = "budget-accuracy"


def budgeted_run(data_dir: str, model: str, budget: str, precision: str) -> dict:
    """One `train --time-budget` run and what it planned against what it took."""
    result = run_recipe(f"model={model} time_budget={budget} precision={precision}", data_dir)
    asked = {**machine(), "model": model, "precision": precision}
    asked["budget_seconds"] = parse_duration(budget)
    if result["rc"] != 0:  # e.g. a budget below one epoch, refused in train's own words
        return asked | result
    run = mlflow.get_run(result["run_id"])
    metrics = run.data.metrics
    return asked | {
        "plan": run.data.tags.get("time_budget_plan"),
        "planned_seconds": round(metrics.get("planned_seconds", float("nan")), 1),
        "planned_epoch_seconds": round(metrics.get("planned_epoch_seconds", float("nan")), 1),
        "real_epoch_seconds": round(result["elapsed_per_epoch"][-1] / result["epochs"], 1),
        "stage_seconds": round(metrics.get("train_seconds", float("nan")), 1),  # budget's clock
        "command_seconds": result["command_seconds"],  # with Python's start and imports
        **{k: result[k] for k in ("rc", "run_id", "epochs", "best_val_accuracy")},
    }


def precision_name(precision: str, cpu_flags: str) -> str:
    if precision == "auto":
        return "bfloat16 (auto)" if "bf16" in cpu_flags else "float32 (auto)"
    return {"fp32": "float32", "bf16": "bfloat16"}.get(precision, precision)


def plot(results: list[dict], path: Path) -> None:
    figure, axes = plt.subplots(figsize=(6, 4))
    for key in sorted({(r["model"], r["precision"]) for r in results}):
        rows = sorted(
            (r for r in results if (r["model"], r["precision"]) == key and r["rc"] == 0),
            key=lambda r: r["budget_seconds"],
        )
        axes.plot(
            [r["budget_seconds"] / 60 for r in rows],
            [r["best_val_accuracy"] for r in rows],
            marker="o",
            label=f"{key[0]}, {precision_name(key[1], results[0]['cpu_flags'])}",
        )
    axes.set_xlabel("time budget, minutes")
    axes.set_ylabel("best validation accuracy")
    axes.set_title(f"{results[0]['machine']}, {results[0]['cpu_flags']}", fontsize=8)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--model", action="append", required=True)
    parser.add_argument("--budget", action="append", required=True, help="e.g. 5m, 900s, 1h")
    parser.add_argument("--precision", action="append", default=None, help="auto, fp32, bf16")
    parser.add_argument("--output", type=Path, required=True, help="append the JSON lines here")
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    for precision in args.precision or ["auto"]:
        for budget in args.budget:
            for model in args.model:
                emit(budgeted_run(args.data_dir, model, budget, precision), args.output)
    results = [json.loads(line) for line in args.output.read_text().splitlines() if line]
    picture = args.output.with_suffix(".png")
    plot(results, picture)
    mlflow.set_experiment(EXPERIMENT)
    with mlflow.start_run(run_name="accuracy against budget"):
        mlflow.log_artifact(str(picture))
        mlflow.log_artifact(str(args.output))
    print(f"plot: {picture} (logged to experiment {EXPERIMENT})")


if __name__ == "__main__":
    main()
