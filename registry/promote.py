"""The `promote` stage: the best ResNet run becomes the `champion` of a registered model, if it earns it.

Candidates are ranked by a validation metric, never by test scores. A challenger replaces the current
champion only when it is better on the same validation split by at least `min_delta` and McNemar's
exact test on the two models' validation predictions says the difference is real (`alpha`); `force`
skips the gate. The old champion keeps the alias `previous`, and `rollback` swaps the two back.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from scipy.stats import binomtest

from pipeline.config import PromoteConfig, config_to_params
from pipeline.data.image_set import ImageSet
from pipeline.errors import PipelineError
from pipeline.model.classifier import predict_in_chunks
from pipeline.tracking.lineage import CODE_TAG, DATA_TAG, DIRTY_TAG
from pipeline.tracking.runs import (
    log_json,
    log_lineage,
    log_resolved_params,
    print_summary,
    rebuild_splits,
    split_changed,
    stage_run,
)

CHAMPION = "champion"
PREVIOUS = "previous"


class PromotionError(PipelineError):
    """Promotion cannot proceed as asked (nothing to roll back to, unknown experiment, ...)."""


def rolled_back_tag(model_name: str) -> str:
    """Run tag that keeps a rolled-back run from being promoted to `model_name` again."""
    return f"rolled_back.{model_name}"


def model_uri_of(run: Run) -> str:
    return run.data.tags.get("model_uri") or f"runs:/{run.info.run_id}/model"


def alias_version(client: mlflow.MlflowClient, name: str, alias: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def find_candidates(
    client: mlflow.MlflowClient, experiment_id: str, config: PromoteConfig
) -> list[Run]:
    """Finished runs of the allowed architectures with the metric, best first."""
    runs = client.search_runs(
        [experiment_id],
        filter_string="attributes.status = 'FINISHED'",
        order_by=[f"metrics.`{config.metric}` DESC"],
        max_results=1000,
    )
    return [
        r
        for r in runs
        if r.data.tags.get("architecture") in config.architectures
        and "model_uri" in r.data.tags  # a logged model; tuning trials have none
        and config.metric in r.data.metrics
        and rolled_back_tag(config.model_name) not in r.data.tags
    ]


def checked_validation_set(candidate: Run, others: list[Run]) -> tuple[ImageSet, str | None]:
    """The candidate's validation split, rebuilt from its data source, and why it cannot be used
    (None when it can): each run compared on it must have logged exactly this content."""
    val = rebuild_splits(candidate).val
    for run in (candidate, *others):
        if problem := split_changed(run, "val", val):
            return val, (
                f"{problem}. The files under {val.source} changed since then: retrain on them "
                f"(mlflow run . -e train --env-manager local -P data_dir={val.source} ...) and "
                "promote that run, or restore the files it was trained on"
            )
    return val, None


def predicted_labels(val: ImageSet, model_uris: list[str], batch_size: int) -> list[np.ndarray]:
    return [
        predict_in_chunks(mlflow.pyfunc.load_model(uri), val.images, batch_size).argmax(axis=1)
        for uri in model_uris
    ]


def refused(problem: str, config: PromoteConfig, **ids: Any) -> Decision:
    """A comparison that cannot be made fairly: kept, unless forced."""
    if config.force:
        return Decision("force", f"forced although {problem}", **ids)
    return Decision("keep", f"not compared: {problem}", **ids)


def mcnemar_p_value(new_correct: np.ndarray, old_correct: np.ndarray) -> tuple[float, int, int]:
    """Exact (binomial) McNemar test on the discordant pairs; returns (p, new-only, old-only)."""
    new_only = int((new_correct & ~old_correct).sum())
    old_only = int((~new_correct & old_correct).sum())
    if new_only + old_only == 0:
        return 1.0, new_only, old_only
    return float(binomtest(new_only, new_only + old_only, 0.5).pvalue), new_only, old_only


@dataclass
class Decision:
    action: str
    reason: str
    candidate_run_id: str | None = None
    champion_run_id: str | None = None
    candidate_val_accuracy: float | None = None
    champion_val_accuracy: float | None = None
    p_value: float | None = None
    candidate_only_correct: int | None = None
    champion_only_correct: int | None = None
    version: str | None = None


def gate(candidate: Run, champion: Run, config: PromoteConfig) -> Decision:
    """Compare two runs' models on the candidate's validation split."""
    ids = {"candidate_run_id": candidate.info.run_id, "champion_run_id": champion.info.run_id}
    val_tag = f"{DATA_TAG}val"
    if candidate.data.tags.get(val_tag) != champion.data.tags.get(val_tag):
        return refused(
            "the two runs were judged on validation splits of different content (digests "
            f"{candidate.data.tags.get(val_tag)} and {champion.data.tags.get(val_tag)}), so their "
            "accuracies are not comparable; train the candidate on the champion's data and split",
            config,
            **ids,
        )
    val, problem = checked_validation_set(candidate, [champion])
    if problem:
        return refused(problem, config, **ids)
    new, old = predicted_labels(
        val, [model_uri_of(candidate), model_uri_of(champion)], config.batch_size
    )
    labels = val.labels
    new_correct, old_correct = new == labels, old == labels
    p_value, new_only, old_only = mcnemar_p_value(new_correct, old_correct)
    delta = new_correct.mean() - old_correct.mean()
    better = delta > 0 and delta >= config.min_delta and p_value < config.alpha
    if better:
        action, reason = "promote", f"better by {delta:.4f} (p={p_value:.3g} < {config.alpha})"
    elif config.force:
        action, reason = "force", f"forced although delta={delta:.4f}, p={p_value:.3g}"
    else:
        action = "keep"
        reason = (
            f"not better enough: delta={delta:.4f} (min_delta {config.min_delta}), "
            f"p={p_value:.3g} (alpha {config.alpha})"
        )
    return Decision(
        action,
        reason,
        candidate_val_accuracy=float(new_correct.mean()),
        champion_val_accuracy=float(old_correct.mean()),
        p_value=p_value,
        candidate_only_correct=new_only,
        champion_only_correct=old_only,
        **ids,
    )


def first_champion_gate(candidate: Run, config: PromoteConfig) -> Decision:
    """A first champion has nothing to beat but chance: its validation accuracy must be above
    1 / classes by a one-sided binomial test at `alpha`, and at least `min_accuracy`."""
    val, problem = checked_validation_set(candidate, [])
    if problem:
        return refused(problem, config, candidate_run_id=candidate.info.run_id)
    (predicted,) = predicted_labels(val, [model_uri_of(candidate)], config.batch_size)
    labels = val.labels
    correct, total = int((predicted == labels).sum()), len(labels)
    chance = 1 / len(val.class_names)
    p_value = float(binomtest(correct, total, chance, alternative="greater").pvalue)
    accuracy = correct / total
    numbers = (
        f"validation accuracy {accuracy:.4f} ({correct}/{total}) against chance {chance:.3f}: "
        f"p={p_value:.3g} (alpha {config.alpha}), min_accuracy {config.min_accuracy}"
    )
    above_chance, accurate = p_value < config.alpha, accuracy >= config.min_accuracy
    earned = above_chance and accurate
    action = "promote" if earned else "force" if config.force else "keep"
    if earned:
        reason = f"first champion, {numbers}"
    elif not above_chance:
        reason = f"refused as first champion, no better than chance: {numbers}" + (
            "; forced"
            if config.force
            else ". The model has not learned: train it again with a lower -P lr (or a larger "
            "one), more -P epochs, or check the labels (cifar10 preprocess)"
        )
    else:
        reason = (
            f"refused as first champion, below min_accuracy {config.min_accuracy}: {numbers}"
            + (
                "; forced"
                if config.force
                else ". It learned (better than chance) but not enough: train it further (more -P "
                "epochs or data, a larger model) or pass a lower -P min_accuracy"
            )
        )
    return Decision(
        action,
        reason,
        candidate_run_id=candidate.info.run_id,
        candidate_val_accuracy=accuracy,
        p_value=p_value,
    )


def register(
    client: mlflow.MlflowClient,
    candidate: Run,
    config: PromoteConfig,
    champion: ModelVersion | None,
) -> ModelVersion:
    """Register the candidate's logged model (MLflow links the version to it, and so to its
    run, metrics and dataset inputs), with the lineage a reviewer needs as tags, then move
    `champion` to it and `previous` to the old one."""
    metric = candidate.data.metrics[config.metric]
    run_tags = candidate.data.tags
    source = run_tags.get("data_source", "")
    tags = {
        "source_run_id": candidate.info.run_id,
        "architecture": run_tags.get("architecture", ""),
        "selection_metric": config.metric,
        "selection_value": f"{metric:.6f}",
        "data_source": source,
        "dataset": Path(source).name or source,
        "dataset_train_digest": run_tags.get(f"{DATA_TAG}train", ""),
        "dataset_val_digest": run_tags.get(f"{DATA_TAG}val", ""),
        "git_commit": run_tags.get("git_commit", ""),
        "code_dirty": run_tags.get(DIRTY_TAG, ""),
        "code": run_tags.get(CODE_TAG, ""),
        "config": logged_config(candidate),
    }
    version = mlflow.register_model(model_uri_of(candidate), config.model_name, tags=tags)
    dirty = " with uncommitted changes" if tags["code_dirty"] == "True" else ""
    client.update_model_version(
        config.model_name,
        version.version,
        description=(
            f"{tags['architecture']} from run {candidate.info.run_id}: {config.metric}={metric:.4f} "
            f"on dataset {tags['dataset']} (train digest {tags['dataset_train_digest']}, "
            f"validation digest {tags['dataset_val_digest']}) at commit {tags['git_commit']}{dirty}."
            " Its resolved config is the tag `config`."
        ),
    )
    if champion is not None:
        client.set_registered_model_alias(config.model_name, PREVIOUS, champion.version)
    client.set_registered_model_alias(config.model_name, CHAMPION, version.version)
    return version


def logged_config(run: Run) -> str:
    """The run's resolved config as YAML (its `config.yaml`), or "" for a run without one."""
    try:
        return mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/config.yaml")
    except MlflowException:
        return ""


def rollback(client: mlflow.MlflowClient, config: PromoteConfig) -> Decision:
    """Swap `champion` and `previous`; the demoted run is kept out of later promotions."""
    champion = alias_version(client, config.model_name, CHAMPION)
    previous = alias_version(client, config.model_name, PREVIOUS)
    if champion is None or previous is None:
        raise PromotionError(
            f"Nothing to roll back: {config.model_name} needs both a '{CHAMPION}' and a "
            f"'{PREVIOUS}' alias (promote at least twice first)."
        )
    client.set_registered_model_alias(config.model_name, CHAMPION, previous.version)
    client.set_registered_model_alias(config.model_name, PREVIOUS, champion.version)
    if champion.run_id:
        client.set_tag(champion.run_id, rolled_back_tag(config.model_name), champion.version)
    return Decision(
        "rollback",
        f"champion moved back from version {champion.version} to {previous.version}",
        version=str(previous.version),
    )


def decide(client: mlflow.MlflowClient, experiment_id: str, config: PromoteConfig) -> Decision:
    candidates = find_candidates(client, experiment_id, config)
    if not candidates:
        return Decision("none", no_candidate_reason(client, experiment_id, config))
    candidate = candidates[0]
    champion = alias_version(client, config.model_name, CHAMPION)
    if champion is not None and champion.run_id == candidate.info.run_id:
        return Decision(
            "none",
            "the best candidate is already the champion",
            candidate_run_id=candidate.info.run_id,
            version=str(champion.version),
        )
    if champion is None:
        decision = first_champion_gate(candidate, config)
    else:
        decision = gate(candidate, client.get_run(champion.run_id), config)
    if decision.action in ("promote", "force"):
        decision.version = str(register(client, candidate, config, champion).version)
    return decision


def no_candidate_reason(
    client: mlflow.MlflowClient, experiment_id: str, config: PromoteConfig
) -> str:
    """What promote looked for, and what the experiment holds instead."""
    finished = client.search_runs(
        [experiment_id], filter_string="attributes.status = 'FINISHED'", max_results=1000
    )
    # training runs: a logged model and an architecture (evaluate runs name a model_uri too)
    trained = [r for r in finished if {"model_uri", "architecture"} <= set(r.data.tags)]
    found = sorted({r.data.tags.get("architecture", "?") for r in trained})
    return (
        f"no candidate: looked for finished runs of {config.architectures} with a logged model "
        f"and the metric {config.metric} in experiment {experiment_id}; found "
        f"{len(trained)} finished training run(s)"
        + (f" of {found}" if found else "")
        + ". Train one (mlflow run . -e train --env-manager local -P model=resnet18) or pass "
        "-P architectures=... / -P candidate_experiment=..."
    )


def target_experiment_id(config: PromoteConfig, own_experiment_id: str) -> str:
    if not config.candidate_experiment:
        return own_experiment_id
    experiment = mlflow.get_experiment_by_name(config.candidate_experiment)
    if experiment is None:
        raise PromotionError(
            f"Experiment {config.candidate_experiment!r} does not exist; check the name in the UI."
        )
    return experiment.experiment_id


def run_promote(config: PromoteConfig) -> Decision:
    """The `promote` entry point: decide, act, and log the decision with its numbers."""
    client = mlflow.MlflowClient()
    with stage_run(
        "promote", config.experiment_name, "rollback" if config.rollback else "promote"
    ) as run:
        log_resolved_params(config_to_params(config))
        log_lineage({}, config_to_params(config))
        if config.rollback:
            decision = rollback(client, config)
        else:
            decision = decide(client, target_experiment_id(config, run.info.experiment_id), config)
        record = asdict(decision)
        mlflow.set_tags({"decision": decision.action, "decision_reason": decision.reason})
        mlflow.log_metrics(
            {k: float(v) for k, v in record.items() if isinstance(v, int | float)}
            | {"promoted": float(decision.action in ("promote", "force"))}
        )
        log_json(record, "decision.json")
        champion = decision.action in ("promote", "force", "rollback")
        print_summary(
            "rollback" if config.rollback else "promote",
            {"decision": decision.action, "why": decision.reason}
            | ({"version": f"{config.model_name} version {decision.version}"} if champion else {}),
            f"cifar10 serve --model-uri models:/{config.model_name}@{CHAMPION} --port 5001"
            if champion
            else "mlflow ui   (compare the candidates' validation accuracy)",
        )
    return decision
