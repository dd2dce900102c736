"""The `promote` stage: the best ResNet run becomes the `champion` of a registered model, if it earns it.

Candidates are ranked by a validation metric, never by test scores. A challenger replaces the current
champion only when it is better on the same validation split by at least `min_delta` and McNemar's
exact test on the two models' validation predictions says the difference is real (`alpha`); `force`
skips the gate. The old champion keeps the alias `previous`, and `rollback` swaps the two back.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import mlflow
import numpy as np
import pandas as pd
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from scipy.stats import binomtest

from pipeline.config import PromoteConfig, config_to_params
from pipeline.data import load_training_set, stratified_split
from pipeline.errors import PipelineError
from pipeline.tracking import git_commit, log_json, log_resolved_params, stage_run
from registry.serving_model import MAX_IMAGES_PER_REQUEST, encode_png

CHAMPION = "champion"
PREVIOUS = "previous"


class PromotionError(PipelineError):
    """Promotion cannot proceed as asked (nothing to roll back to, unknown experiment, ...)."""


def rolled_back_tag(model_name: str) -> str:
    """Run tag that keeps a rolled-back run from being promoted to `model_name` again."""
    return f"rolled_back.{model_name}"


def run_param(run: Run, key: str) -> str | None:
    """The value a run really used: `resolved.<key>` where `mlflow run` logged something else."""
    params = run.data.params
    return params.get(f"resolved.{key}", params.get(key))


def split_key(run: Run) -> tuple[str | None, ...]:
    """What fixes a run's validation split: data source, fraction and seed."""
    return (
        run.data.tags.get("data_source"),
        run_param(run, "val_fraction"),
        run_param(run, "seed"),
    )


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


def validation_predictions(run: Run, model_uris: list[str], batch_size: int):
    """Labels of the run's validation split and each model's predicted labels on it."""
    data_source, val_fraction, seed = split_key(run)
    data = load_training_set(data_source, download=False)
    _, val_index = stratified_split(data.labels, float(val_fraction), int(seed))
    encoded = [encode_png(image) for image in data.images[val_index]]
    predictions = []
    for uri in model_uris:
        model = mlflow.pyfunc.load_model(uri)
        labels = [
            model.predict(pd.DataFrame({"image": encoded[i : i + batch_size]}))["label"]
            for i in range(0, len(encoded), batch_size)
        ]
        predictions.append(np.concatenate(labels))
    return data.labels[val_index], predictions


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
    if split_key(candidate) != split_key(champion):
        return Decision(
            "force" if config.force else "keep",
            "trained on different validation splits, so not comparable"
            + ("; forced" if config.force else "; pass force=true to promote anyway"),
            **ids,
        )
    batch = min(config.batch_size, MAX_IMAGES_PER_REQUEST)
    labels, (new, old) = validation_predictions(
        candidate, [model_uri_of(candidate), model_uri_of(champion)], batch
    )
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


def register(
    client: mlflow.MlflowClient,
    candidate: Run,
    config: PromoteConfig,
    champion: ModelVersion | None,
) -> ModelVersion:
    """Register the candidate's model, move `champion` to it and `previous` to the old one."""
    version = mlflow.register_model(model_uri_of(candidate), config.model_name)
    metric = candidate.data.metrics[config.metric]
    tags = {
        "source_run_id": candidate.info.run_id,
        "architecture": candidate.data.tags.get("architecture", ""),
        "selection_metric": config.metric,
        "selection_value": f"{metric:.6f}",
        "data_source": candidate.data.tags.get("data_source", ""),
        "git_commit": candidate.data.tags.get("git_commit", git_commit()),
    }
    for key, value in tags.items():
        client.set_model_version_tag(config.model_name, version.version, key, value)
    client.update_model_version(
        config.model_name,
        version.version,
        description=(
            f"{tags['architecture']} from run {candidate.info.run_id}: {config.metric}={metric:.4f} "
            f"on data {tags['data_source']} at commit {tags['git_commit']}."
        ),
    )
    if champion is not None:
        client.set_registered_model_alias(config.model_name, PREVIOUS, champion.version)
    client.set_registered_model_alias(config.model_name, CHAMPION, version.version)
    return version


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
        return Decision("none", f"no finished {config.architectures} run with {config.metric}")
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
        decision = Decision("promote", "no champion yet", candidate_run_id=candidate.info.run_id)
    else:
        decision = gate(candidate, client.get_run(champion.run_id), config)
    if decision.action in ("promote", "force"):
        decision.version = str(register(client, candidate, config, champion).version)
    return decision


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
    with stage_run(config.experiment_name, "rollback" if config.rollback else "promote") as run:
        log_resolved_params(config_to_params(config))
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
    return decision
