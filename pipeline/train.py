"""The `train` stage: one tracked MLflow run around `fit()`, ending with a logged, servable model."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import mlflow
import torch

from pipeline.config import TrainConfig, config_to_params, dump_yaml
from pipeline.data.sources import has_test_set
from pipeline.tracking.model_logging import log_classifier
from pipeline.tracking.resume import (
    CHECKPOINT_FILE,
    delete_checkpoints,
    load_resume_checkpoint,
    logged_epochs,
    mlflow_epoch_logger,
    stored_config,
)
from pipeline.tracking.runs import (
    describe_run,
    log_dataset,
    log_json,
    log_lineage,
    log_resolved_params,
    print_summary,
    scratch_dir,
    source_name,
    stage_run,
)
from pipeline.training.loop import (
    CHANCE_P_VALUE,
    EpochCallback,
    FitState,
    above_chance_p_value,
    autocast_dtype,
    fit,
)
from pipeline.training.prepare import Prepared, prepare_training
from pipeline.training.progress import EpochProgress, announce_training, format_duration


def log_training_inputs(prepared: Prepared, recipe: TrainConfig) -> None:
    """Params, tags, resolved config, normalization and the dataset record of a training run.

    Where the recipe was scaled to the data, `<name>` keeps the recipe's value and
    `resolved.<name>` is what ran; `config.yaml` is what ran (a resume continues with it), and the
    lineage is the recipe's (what `main` compares before it knows the data's size)."""
    config, splits = prepared.config, prepared.splits
    used, given = config_to_params(config), config_to_params(recipe)
    logged = mlflow.get_run(mlflow.active_run().info.run_id).data.params
    mlflow.log_params(
        {k: given[k] for k in recipe.from_recipe if k not in logged and used[k] != given[k]}
    )
    log_resolved_params(used)
    mlflow.log_text(dump_yaml(used), "config.yaml")
    mlflow.set_tags(
        {
            "architecture": config.model,
            "device": str(prepared.device),
            "precision": "bf16" if autocast_dtype(prepared.device, config.precision) else "fp32",
            "data_source": prepared.data.source,
        }
    )
    log_json(
        {
            "mean": list(splits.mean),
            "std": list(splits.std),
            "class_names": list(prepared.data.class_names),
            "train_images": len(splits.train),
            "val_images": len(splits.val),
        },
        "stats.json",
    )
    mlflow.log_metrics(
        {
            "train_images": len(splits.train),
            "val_images": len(splits.val),
            "skipped_files": len(prepared.data.problems),
        }
    )
    if prepared.data.problems:
        log_json(prepared.data.problems, "skipped_files.json")
    log_dataset(splits.train, context="training")
    log_lineage({"train": splits.train, "val": splits.val}, given)


def training_verdict(state: FitState, prepared: Prepared) -> str:
    """How the summary's first line ends: a run whose best model is at chance never just
    "finished"."""
    if state.problem and state.stopped_early:
        return f"stopped early, {state.problem.split(':')[0]}"
    classes = len(prepared.data.class_names)
    p_value = above_chance_p_value(state.best_val_accuracy, len(prepared.splits.val), classes)
    if state.problem:
        return f"finished, but {state.problem.split(':')[0]}"
    if p_value >= CHANCE_P_VALUE:
        return f"finished, but its best model is no better than chance (p={p_value:.2g})"
    return "finished"


@dataclass
class TrainResult:
    run_id: str
    model_uri: str
    best_val_accuracy: float
    best_epoch: int  # counted from 1
    epochs_run: int


def run_train(config: TrainConfig, callbacks: Sequence[EpochCallback] = ()) -> TrainResult:
    """The `train` entry point: one tracked run, ending with a logged, servable `model`."""
    resume_id = config.resume_run_id
    if resume_id:
        config = stored_config(resume_id)
    started = time.perf_counter()
    with (
        stage_run(
            config.experiment_name, config.model, run_id=resume_id, log_system_metrics=True
        ) as run,
        scratch_dir() as scratch,
    ):
        prepared = prepare_training(config)
        checkpoint_path = scratch / CHECKPOINT_FILE
        resume_from, done, next_slot = None, frozenset(), 0
        if resume_id:
            resume_from, next_slot = load_resume_checkpoint(resume_id, scratch)
            done = logged_epochs(resume_id)
            mlflow.set_tag(
                "resumed_from_epoch", resume_from["fit_state"]["next_epoch"] if resume_from else 0
            )
        else:
            log_training_inputs(prepared, config)
            used = prepared.config
            mlflow.set_tag(
                "mlflow.runName",
                f"{used.model} · {source_name(prepared.data.source)} · lr {used.lr:.3g} · "
                f"{used.epochs} epochs",
            )
        first_epoch = resume_from["fit_state"]["next_epoch"] if resume_from else 0
        announce_training(prepared, config, first_epoch)
        progress = EpochProgress(config.epochs, first_epoch)
        stop = prepared.config.stop_if_not_learning

        def report_problem(problem: str) -> None:
            progress.write(
                f"watchdog: {problem}"
                + (" Stopping early (-P stop_if_not_learning=false trains on)." if stop else "")
            )
            mlflow.set_tags({"watchdog": problem.split(":")[0], "watchdog_message": problem[:4000]})

        try:
            state = fit(
                prepared.model,
                config.model,
                prepared.train_batches,
                prepared.val_batches,
                prepared.config,
                callbacks=[mlflow_epoch_logger(done, next_slot), progress, *callbacks],
                checkpoint_path=checkpoint_path,
                resume_from=resume_from,
                on_problem=report_problem,
            )
        finally:
            progress.close()
        final = state.history[-1]
        info = log_classifier(
            prepared.model.to("cpu").to(memory_format=torch.contiguous_format),
            config.model,
            config.options,
            prepared.splits.mean,
            prepared.splits.std,
            prepared.data.class_names,
            prepared.splits.val.images[0],
            tta=prepared.config.tta,
        )
        mlflow.log_metrics(
            {
                "best_val_accuracy": state.best_val_accuracy,
                "best_epoch": state.best_epoch + 1,
                "epochs_run": state.next_epoch,
                "final_train_loss": final["train_loss"],
                "final_val_accuracy": final["val_accuracy"],
                "stopped_early": float(state.stopped_early),
                "train_seconds": time.perf_counter() - started,
            },
            model_id=info.model_id,  # linked to the logged model: its page in the UI shows them
        )
        mlflow.set_tags(
            {
                "model_uri": info.model_uri,
                "checkpoints": "kept"
                if config.keep_checkpoints
                else delete_checkpoints(run.info.run_id),
            }
        )
        next_command = (
            f"mlflow run . -e evaluate --env-manager local -P model_uri={info.model_uri} "
            f"-P data_dir={config.data_dir}"
            if has_test_set(config.data_dir)
            else f"mlflow ui --backend-store-uri {mlflow.get_tracking_uri()}   "
            f"(no test split in {config.data_dir} to evaluate on)"
        )
        verdict = training_verdict(state, prepared)
        describe_run(
            f"best val_accuracy {state.best_val_accuracy:.4f} at epoch {state.best_epoch + 1} of "
            f"{state.next_epoch}" + ("" if verdict == "finished" else f"; {verdict}")
        )
        print_summary(
            "train",
            {
                "best val_accuracy": f"{state.best_val_accuracy:.4f} at epoch "
                f"{state.best_epoch + 1} of {state.next_epoch}"
                + (" (stopped early)" if state.stopped_early else ""),
                "time": format_duration(time.perf_counter() - started),
                "model": info.model_uri,
            }
            | ({"watchdog": state.problem} if state.problem else {}),
            next_command,
            verdict=verdict,
        )
    return TrainResult(
        run.info.run_id,
        info.model_uri,
        state.best_val_accuracy,
        state.best_epoch + 1,
        state.next_epoch,
    )
