"""Batch scoring: folders, archives and globs into one table, on this machine and on Spark."""

import base64
import io
import shutil
import tarfile

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.config import ConfigError, PredictConfig, resolve_train_config
from pipeline.data.image_folder import UnsafeArchiveError
from pipeline.data.inputs import InputError
from pipeline.predict import run_predict
from pipeline.train import run_train
from tests.conftest import write_image_tree


@pytest.fixture
def model_uri(tracking, tmp_path) -> str:
    tree = write_image_tree(tmp_path / "pets", per_class=20)
    config = resolve_train_config(
        {"data_dir": str(tree), "epochs": 1, "width": 8, "experiment_name": tracking}
    )
    return run_train(config).model_uri


@pytest.fixture
def photos(tmp_path):
    """Unlabelled photos: nested folders, a corrupt file, a text file and hidden files."""
    source = write_image_tree(tmp_path / "source", per_class=4)
    root = tmp_path / "photos"
    for index, image in enumerate(sorted((source / "train").rglob("*.*"))):
        target = root / ("holiday/day2" if index % 3 else "") / f"{index:02d}{image.suffix}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(image, target)
    (root / "holiday" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    (root / "notes.txt").write_text("not an image")
    (root / ".DS_Store").write_bytes(b"\0\0")
    (root / "_SUCCESS").write_bytes(b"")
    return root


def scored(model_uri, tracking, location, output, **settings) -> pd.DataFrame:
    config = PredictConfig(
        model_uri=model_uri, input=str(location), output=str(output),
        experiment_name=tracking, **settings,
    )  # fmt: skip
    result = run_predict(config)
    assert result.output == output.resolve()
    return pd.read_parquet(output) if output.suffix == ".parquet" else pd.read_csv(output)


def test_a_folder_is_scored_row_per_file_and_a_bad_file_gets_its_error(
    model_uri, tracking, photos, tmp_path, capsys
):
    table = scored(model_uri, tracking, photos, tmp_path / "out" / "predictions.parquet")
    assert len(table) == 12 + 2  # twelve images, the corrupt one, the text file; no hidden files
    assert list(table.columns) == [
        "path", "class_name", "label", "confidence", "p_cat", "p_dog", "p_frog", "error",
    ]  # fmt: skip
    assert "holiday/day2/01.jpg" in set(table["path"]) and "notes.txt" in set(table["path"])
    bad = table.set_index("path").loc[["holiday/broken.jpg", "notes.txt"]]
    assert bad["error"].str.contains("not a recognizable image").all()
    assert bad["label"].isna().all() and bad["p_cat"].isna().all()
    good = table[table["error"].isna() | (table["error"] == "")]
    assert len(good) == 12 and good["class_name"].isin(["cat", "dog", "frog"]).all()
    probabilities = good[["p_cat", "p_dog", "p_frog"]].to_numpy()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    assert (good["confidence"] == probabilities.max(axis=1)).all()

    run = mlflow.search_runs(experiment_names=[tracking], filter_string="tags.engine = 'local'")
    metrics = run.iloc[0]
    assert metrics["metrics.input_files"] == 14 and metrics["metrics.error_files"] == 2
    assert (
        metrics["metrics.count_cat"] + metrics["metrics.count_dog"] + metrics["metrics.count_frog"]
        == 12
    )
    artifacts = mlflow.MlflowClient().list_artifacts(metrics["run_id"])
    assert "predictions.parquet" in {a.path for a in artifacts}
    out = capsys.readouterr()
    assert "scored: 12 of 14 files (2 not readable images" in out.out
    assert "scored 14 of 14 files" in out.err  # the log-file progress line


def test_explain_adds_each_images_grad_cam_overlay_and_leaves_bad_files_without_one(
    model_uri, tracking, photos, tmp_path
):
    table = scored(model_uri, tracking, photos, tmp_path / "explained.parquet", explain=True)
    assert list(table.columns)[-3:] == ["explained_class", "heatmap_png", "error"]
    good = table[table["error"].isna() | (table["error"] == "")]
    assert (good["explained_class"] == good["class_name"]).all()
    overlay = Image.open(io.BytesIO(base64.b64decode(good["heatmap_png"].iloc[0])))
    assert overlay.size == (32, 32)
    bad = table.set_index("path").loc[["holiday/broken.jpg", "notes.txt"]]
    assert (bad["heatmap_png"].fillna("") == "").all()


def test_spark_gives_the_same_table_row_for_row(model_uri, tracking, photos, tmp_path):
    pytest.importorskip("pyspark")
    if shutil.which("java") is None:
        pytest.skip("Spark needs Java")
    local = scored(model_uri, tracking, photos, tmp_path / "local.parquet")
    spark = scored(
        model_uri, tracking, photos, tmp_path / "spark.parquet",
        engine="spark", spark_master="local[2]",
    )  # fmt: skip
    pd.testing.assert_frame_equal(
        local.drop(columns=local.columns[3:-1]), spark.drop(columns=spark.columns[3:-1])
    )
    np.testing.assert_allclose(
        local.iloc[:, 3:-1].to_numpy(float), spark.iloc[:, 3:-1].to_numpy(float), atol=1e-5
    )
    glob = f"{photos}/**/*.jpg"
    local_glob = scored(model_uri, tracking, glob, tmp_path / "local-glob.parquet")
    spark_glob = scored(
        model_uri, tracking, glob, tmp_path / "spark-glob.parquet",
        engine="spark", spark_master="local[2]",
    )  # fmt: skip
    assert list(spark_glob["path"]) == list(local_glob["path"])
    assert list(spark_glob["class_name"]) == list(local_glob["class_name"])


def test_an_archive_and_a_glob_score_like_the_folder_into_csv(
    model_uri, tracking, photos, tmp_path
):
    folder = scored(model_uri, tracking, photos, tmp_path / "folder.csv")
    archive = tmp_path / "photos.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(photos, arcname="photos")
    packed = scored(model_uri, tracking, archive, tmp_path / "archive.csv")
    assert list(packed["path"]) == [f"photos/{path}" for path in folder["path"]]  # member names
    np.testing.assert_allclose(packed["confidence"], folder["confidence"], atol=1e-6)
    globbed = scored(model_uri, tracking, f"{photos}/**/*.jpg", tmp_path / "glob.csv")
    assert set(globbed["path"]) == {p for p in folder["path"] if p.endswith(".jpg")}


def test_an_archive_member_outside_its_folder_is_refused_and_nothing_written(
    model_uri, tracking, tmp_path
):
    archive = tmp_path / "evil.tar"
    payload = tmp_path / "x.png"
    payload.write_bytes(b"x")
    with tarfile.open(archive, "w") as tar:
        tar.add(payload, arcname="../escape.png")
    output = tmp_path / "out.csv"
    with pytest.raises(UnsafeArchiveError, match=r"\.\./escape\.png"):
        scored(model_uri, tracking, archive, output)
    assert not output.exists() and not (tmp_path.parent / "escape.png").exists()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"output": "predictions.json"}, "output must end in .csv or .parquet"),
        ({"input": ""}, "input is required"),
        ({"engine": "dask"}, "engine must be local or spark"),
        ({"engine": "spark", "explain": True}, "explain works with engine=local"),
    ],
)
def test_bad_settings_name_the_fix(settings, message):
    values = {"model_uri": "runs:/x/model", "input": "photos", "output": "p.csv"} | settings
    with pytest.raises(ConfigError, match=message):
        PredictConfig(**values)


def test_a_missing_input_is_one_clear_error(model_uri, tracking, tmp_path):
    with pytest.raises(InputError, match="does not exist; pass a folder of images"):
        scored(model_uri, tracking, tmp_path / "nowhere", tmp_path / "p.csv")
