import json
import time

import mlflow
import numpy as np
import pytest

from pipeline.config import PreprocessConfig
from pipeline.data.cifar_batches import BATCH_DIR, DataIntegrityError, read_batch, write_batch
from pipeline.data.sources import BadDataError
from pipeline.preprocess import run_preprocess
from tests.conftest import write_cifar_dir, write_image_tree

PLOTS = {
    "plots/class_distribution.png",
    "plots/samples_per_class.png",
    "plots/pixel_histograms.png",
}


def artifact_paths(run_id: str) -> set[str]:
    client = mlflow.MlflowClient()
    paths, stack = set(), [None]
    while stack:
        for item in client.list_artifacts(run_id, stack.pop()):
            (stack.append(item.path) if item.is_dir else paths.add(item.path))
    return paths


def load_json(run_id: str, name: str):
    return json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/{name}"))


def test_preprocess_logs_counts_integrity_stats_and_plots(tracking, tmp_path):
    root = write_cifar_dir(tmp_path, per_batch=100, batches=2, test_images=40)
    batch_dir = root / BATCH_DIR
    images, labels = read_batch(batch_dir / "data_batch_1")
    duplicated = np.concatenate([images, images[:3]])
    write_batch(batch_dir / "data_batch_1", duplicated, np.concatenate([labels, labels[:3]]))
    test_images, test_labels = read_batch(batch_dir / "test_batch")
    test_images[:2] = images[10:12]
    write_batch(batch_dir / "test_batch", test_images, test_labels)

    result = run_preprocess(
        PreprocessConfig(data_dir=str(root), val_fraction=0.2, seed=3, experiment_name=tracking)
    )
    run = mlflow.get_run(result.run_id)
    metrics = run.data.metrics
    assert run.data.params["val_fraction"] == "0.2" and run.data.params["seed"] == "3"
    assert metrics["train_images"] + metrics["val_images"] == 203 and metrics["test_images"] == 40
    assert metrics["val_images"] == pytest.approx(0.2 * 203, abs=1)
    assert metrics["duplicates_within_train"] >= 3
    assert metrics["duplicates_train_test"] >= 1
    assert metrics["unreadable_files"] == 0 and metrics["num_classes"] == 10
    assert (
        sum(metrics[f"train_count_{c}"] for c in result.stats["class_names"])
        == metrics["train_images"]
    )
    assert PLOTS | {"stats.json", "integrity.json"} <= artifact_paths(result.run_id)
    stats = load_json(result.run_id, "stats.json")
    assert len(stats["mean"]) == len(stats["std"]) == 3 and all(0 < m < 1 for m in stats["mean"])
    assert stats["counts"]["test"] == 40
    assert load_json(result.run_id, "integrity.json") == []
    dataset = run.inputs.dataset_inputs[0].dataset
    assert dataset.name == root.name and dataset.digest == stats["train_digest"]


def test_unreadable_file_is_reported_then_fails_the_run(tracking, tmp_path):
    root = write_cifar_dir(tmp_path, per_batch=100, batches=2, test_images=0)
    (root / BATCH_DIR / "data_batch_2").write_bytes(b"\x00garbage")
    with pytest.raises(DataIntegrityError, match="data_batch_2"):
        run_preprocess(PreprocessConfig(data_dir=str(root), experiment_name=tracking))
    run = mlflow.search_runs(experiment_names=[tracking]).iloc[0]
    assert run["status"] == "FAILED" and run["metrics.unreadable_files"] == 1
    integrity = {e["file"]: e for e in load_json(run["run_id"], "integrity.json")}
    assert integrity["data_batch_2"]["kind"] == "unreadable"
    assert run["metrics.train_images"] + run["metrics.val_images"] == 100


def test_real_subset_statistics_in_well_under_a_minute(tracking, real_subset):
    started = time.perf_counter()
    result = run_preprocess(PreprocessConfig(data_dir=str(real_subset), experiment_name=tracking))
    assert time.perf_counter() - started < 60
    stats = result.stats
    assert (
        stats["counts"]["train"] + stats["counts"]["val"] == 5085 and "test" not in stats["counts"]
    )
    np.testing.assert_allclose(stats["mean"], (0.491, 0.482, 0.447), atol=0.01)
    train_counts = stats["class_counts"]["train"]
    val_counts = stats["class_counts"]["val"]
    for name in stats["class_names"]:
        share = val_counts[name] / (train_counts[name] + val_counts[name])
        assert share == pytest.approx(0.1, abs=0.01)


def test_image_folder_problems_are_listed_then_fail_unless_skipped(tracking, tmp_path):
    tree = write_image_tree(tmp_path / "pets", per_class=20, test_per_class=4)
    (tree / "train" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 no")
    (tree / "train" / "bird").mkdir()
    (tree / "test" / "horse").mkdir()
    (tree / "test" / "horse" / "0.png").write_bytes(
        (tree / "test" / "cat" / "0000.png").read_bytes()
    )
    with pytest.raises(BadDataError, match="broken.jpg"):
        run_preprocess(PreprocessConfig(data_dir=str(tree), experiment_name=tracking))
    run = mlflow.search_runs(experiment_names=[tracking]).iloc[0]
    assert run["status"] == "FAILED"
    assert run["metrics.unreadable_files"] == 1 and run["metrics.empty_class_files"] == 1
    problems = load_json(run["run_id"], "integrity.json")
    assert {(p["split"], p["kind"], p["file"]) for p in problems} == {
        ("train", "unreadable", "cat/broken.jpg"),
        ("train", "empty_class", "bird/"),
        ("test", "unknown_class", "horse/"),
    }
    result = run_preprocess(
        PreprocessConfig(data_dir=str(tree), skip_bad_images=True, experiment_name=tracking)
    )
    assert result.stats["class_names"] == ["cat", "dog", "frog"]
    assert result.stats["counts"]["test"] == 12
