import mlflow
import numpy as np
import pytest
from PIL import Image

from pipeline.config import PromoteConfig, resolve_train_config
from pipeline.train import run_train
from registry.promote import PromotionError, mcnemar_p_value, run_promote
from tests.conftest import write_image_tree

# Every candidate must reach its accuracy in float32 and bfloat16 alike (CI runs these twice).
pytestmark = pytest.mark.accuracy

# The recipe's batch and learning rate as given, not scaled to these small sets: the candidates
# below are meant to be bad, mediocre and good.
SYNTHETIC = {"data_dir": "synthetic", "width": 16, "seed": 0, "batch_size": 256, "lr": 0.004}


def train_in(experiment: str, **overrides) -> str:
    config = resolve_train_config({**SYNTHETIC, "experiment_name": experiment} | overrides)
    return run_train(config).run_id


def promote(model_name: str, experiment: str, **overrides):
    config = PromoteConfig(
        **{"model_name": model_name, "experiment_name": experiment, "architectures": ["cnn"]}
        | overrides
    )
    return run_promote(config)


def aliases(model_name: str) -> dict[str, str]:
    model = mlflow.MlflowClient().get_registered_model(model_name)
    return {alias: str(version) for alias, version in model.aliases.items()}


def versions(model_name: str) -> int:
    return len(mlflow.MlflowClient().search_model_versions(f"name = '{model_name}'"))


@pytest.fixture(scope="module")
def candidates(tmp_path_factory):
    """Three experiments: a model that learned nothing, a good one and an equally good twin."""
    root = tmp_path_factory.mktemp("promote")
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        runs = {
            "bad": train_in("bad", epochs=1, lr=1e-9, schedule="constant", max_train_images=256),
            "good": train_in("good", epochs=4, max_train_images=2000),
            # 0.780 in float32, 0.787 in bfloat16 (seed 1: 0.497 / 0.473); 2 epochs gave 0.17 /
            # 0.25, an outcome of the CPU's number format.
            "mediocre": train_in("mediocre", epochs=3, max_train_images=1000),
            "twin": train_in("twin", epochs=4, max_train_images=1990),
        }
        yield runs, patch


def test_promotion_lifecycle(candidates):
    runs, patch = candidates
    name = "lifecycle"

    refused = promote(name, "bad")
    assert refused.action == "keep" and refused.p_value >= 0.05
    assert (
        "refused as first champion" in refused.reason and "against chance 0.100" in refused.reason
    )
    assert not mlflow.MlflowClient().search_registered_models(f"name = '{name}'")
    first = promote(name, "bad", force=True)
    assert first.action == "force" and aliases(name) == {"champion": "1"}

    again = promote(name, "bad")
    assert again.action == "none" and versions(name) == 1 and aliases(name) == {"champion": "1"}

    better = promote(name, "good")
    assert better.action == "promote" and better.p_value < 0.05
    assert better.candidate_val_accuracy > 0.9 > better.champion_val_accuracy
    assert aliases(name) == {"champion": "2", "previous": "1"}
    version = mlflow.MlflowClient().get_model_version(name, "2")
    assert version.tags["source_run_id"] == runs["good"] and version.run_id == runs["good"]
    assert "best_val_accuracy" in version.description

    equal = promote(name, "twin")
    assert equal.action == "keep" and equal.p_value >= 0.05
    worse = promote(name, "bad")
    assert worse.action == "keep" and worse.champion_val_accuracy > worse.candidate_val_accuracy
    assert versions(name) == 2 and aliases(name) == {"champion": "2", "previous": "1"}

    forced = promote(name, "bad", force=True)
    assert forced.action == "force" and aliases(name) == {"champion": "3", "previous": "2"}

    rolled = promote(name, "bad", rollback=True)
    assert rolled.action == "rollback" and aliases(name) == {"champion": "2", "previous": "3"}
    after = promote(name, "bad")
    assert after.action == "none" and aliases(name) == {"champion": "2", "previous": "3"}

    logged = mlflow.search_runs(experiment_names=["bad"], filter_string="tags.decision = 'keep'")
    assert len(logged) == 2 and (logged["metrics.promoted"] == 0).all()  # refused first, worse
    assert logged["metrics.champion_val_accuracy"].iloc[0] == worse.champion_val_accuracy
    assert "not better enough" in logged["tags.decision_reason"].iloc[0]


def test_first_champion_must_beat_chance_and_min_accuracy(candidates, capsys):
    first = promote("first", "mediocre", min_accuracy=0.9)
    assert first.action == "keep" and "min_accuracy 0.9" in first.reason
    assert "below min_accuracy 0.9" in first.reason and "not learned" not in first.reason
    assert 0.2 < first.candidate_val_accuracy < 0.9 and first.p_value < 1e-6
    assert "refused as first champion" in capsys.readouterr().out
    assert promote("first", "mediocre").action == "promote"
    assert aliases("first") == {"champion": "1"}
    assert "next: cifar10 serve --model-uri models:/first@champion" in capsys.readouterr().out


def test_no_candidate_says_what_it_looked_for_and_found(candidates):
    decision = promote("nothing", "good", architectures=["resnet18"])
    assert decision.action == "none"
    assert "looked for finished runs of ['resnet18']" in decision.reason
    assert "found 1 finished training run(s) of ['cnn']" in decision.reason


def test_min_delta_blocks_a_small_gain(candidates):
    name = "min-delta"
    promote(name, "bad", force=True)
    blocked = promote(name, "good", min_delta=0.99)
    assert blocked.action == "keep" and "min_delta" in blocked.reason
    assert aliases(name) == {"champion": "1"}


def test_different_validation_splits_are_not_compared(candidates):
    name = "splits"
    promote(name, "good")
    train_in("other-split", epochs=1, max_train_images=256, val_fraction=0.2)
    refused = promote(name, "other-split")
    assert refused.action == "keep" and "validation splits of different content" in refused.reason
    assert promote(name, "other-split", force=True).action == "force"


def test_rollback_needs_a_previous_version(candidates):
    promote("single", "good")
    with pytest.raises(PromotionError, match="Nothing to roll back"):
        promote("single", "good", rollback=True)


def test_mcnemar_counts_only_discordant_pairs():
    new = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0, 1], bool)
    old = np.array([0, 0, 0, 0, 0, 0, 0, 0, 0, 1], bool)
    p, new_only, old_only = mcnemar_p_value(new, old)
    assert (new_only, old_only) == (8, 0)
    assert p == pytest.approx(2 * 0.5**8)
    assert mcnemar_p_value(old, old)[0] == 1.0


def test_promote_refuses_to_compare_after_the_candidates_data_changed(tracking, tmp_path):
    """The validation split is rebuilt from the candidate's data path; when the files there are no
    longer the ones it was trained on, no accuracy is computed on them and nothing is registered."""
    tree = write_image_tree(tmp_path / "pets", per_class=30)
    run_id = train_in(tracking, data_dir=str(tree), epochs=1, width=8, batch_size=16)
    for path in (tree / "train" / "cat").iterdir():
        with Image.open(path) as image:
            flipped = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        flipped.save(path)
    decision = promote("changed-data", tracking)
    assert decision.action == "keep" and decision.candidate_run_id == run_id
    logged = mlflow.get_run(run_id).data.tags["lineage.data.val"]
    assert f"run {run_id} logged {logged}" in decision.reason
    assert "these are not the images it was trained on" in decision.reason
    assert f"retrain on them (mlflow run . -e train --env-manager local -P data_dir={tree}" in (
        decision.reason
    )
    assert not mlflow.MlflowClient().search_registered_models("name = 'changed-data'")
