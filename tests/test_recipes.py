"""The rule that scales a recipe's batch size and learning rate to the training-set size."""

import pytest

from pipeline.config import resolve_train_config
from pipeline.training.recipes import MIN_STEPS_PER_EPOCH, scaled_to_data


def test_a_recipe_scales_its_batch_and_lr_to_a_small_training_set_only():
    resnet = resolve_train_config({"model": "resnet18"})
    assert (resnet.batch_size, resnet.lr, resnet.from_recipe) == (512, 0.2, ["batch_size", "lr"])
    small = scaled_to_data(resnet, 1_350)  # 2 steps an epoch at 512
    assert small.batch_size == 16 and small.lr == pytest.approx(0.2 * 16 / 512)  # SGD: linear
    assert 1_350 // small.batch_size >= MIN_STEPS_PER_EPOCH and small.from_recipe == []
    assert scaled_to_data(resnet, 45_000).batch_size == 512  # the size the recipe was written for
    cnn = scaled_to_data(resolve_train_config({"model": "cnn"}), 810)
    assert cnn.batch_size == 16 and cnn.lr == pytest.approx(0.004 * (16 / 256) ** 0.5)  # AdamW
    assert scaled_to_data(resolve_train_config({"model": "cnn"}), 200).batch_size == 16


def test_an_explicit_batch_size_or_lr_is_never_scaled(tmp_path):
    chosen = scaled_to_data(resolve_train_config({"model": "resnet18", "batch_size": "512"}), 1_350)
    assert (chosen.batch_size, chosen.lr) == (512, 0.2)
    lr_given = scaled_to_data(resolve_train_config({"model": "resnet18", "lr": "0.05"}), 1_350)
    assert (lr_given.batch_size, lr_given.lr) == (16, 0.05)
    best = tmp_path / "best.yaml"
    best.write_text("model: cnn\nbatch_size: 256\n")
    from_file = scaled_to_data(resolve_train_config({"config": str(best)}), 810)
    assert from_file.batch_size == 256
