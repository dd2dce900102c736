"""Grad-CAM for every architecture, and which class a request asks to explain."""

import numpy as np
import pytest
import torch

from pipeline.model.architectures import build_model, model_names
from pipeline.model.decoding import InvalidImageError
from pipeline.model.explaining import gradcam_maps, overlay, target_classes

NAMES = ("airplane", "cat", "dog")


@pytest.mark.parametrize("name", model_names())
def test_every_architecture_explains_one_image_for_two_classes_with_two_maps(name):
    model = build_model(name, num_classes=10)
    image = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    maps = gradcam_maps(model, image.repeat(2, 1, 1, 1), [3, 5])
    assert maps.shape == (2, 32, 32) and maps.min() >= 0 and maps.max() <= 1
    assert np.abs(maps[0] - maps[1]).max() > 1e-3


def test_the_target_is_the_predicted_class_unless_a_name_or_index_is_given():
    assert target_classes(None, [2, 0], NAMES) == [2, 0]
    assert target_classes("", [2, 0], NAMES) == [2, 0]
    assert target_classes("cat", [2, 0], NAMES) == [1, 1]
    assert target_classes("2", [0], NAMES) == [2]
    assert target_classes(0, [1], NAMES) == [0]


@pytest.mark.parametrize("target", ["zebra", "3", "-1", "1.5"])
def test_a_target_that_is_no_class_names_the_choices(target):
    with pytest.raises(InvalidImageError, match="airplane, cat, dog, or an index from 0 to 2"):
        target_classes(target, [0], NAMES)


def test_the_overlay_is_the_image_tinted_by_its_map():
    image = np.full((32, 32, 3), 128, np.uint8)
    heatmap = np.zeros((32, 32), np.float32)
    heatmap[:, 16:] = 1.0
    tinted = overlay(image, heatmap)
    assert tinted.shape == (32, 32, 3) and tinted.dtype == np.uint8
    assert tinted[:, 16:, 0].mean() > tinted[:, :16, 0].mean()  # hot half is redder
