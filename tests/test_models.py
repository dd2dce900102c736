import urllib.error

import pytest
import torch
from torchvision import models as tv_models

from pipeline.config import EXPERIMENTS_DIR
from pipeline.model.architectures import (
    WeightsUnavailableError,
    build_model,
    gradcam_target_layer,
    is_frozen,
    model_names,
    set_frozen,
)


def test_every_registered_model_has_a_recipe_and_a_search_space():
    recipes = {p.stem for p in EXPERIMENTS_DIR.glob("*.yaml")}
    spaces = {p.stem for p in (EXPERIMENTS_DIR / "search_spaces").glob("*.yaml")}
    assert set(model_names()) == recipes == spaces
    assert {"cnn", "resnet18", "vgg16_transfer", "vgg16_finetune"} <= set(model_names())


@pytest.mark.parametrize("name", model_names())
@pytest.mark.parametrize("num_classes", [3, 10])
def test_models_map_32x32_images_to_one_logit_per_class(name, num_classes):
    model = build_model(name, num_classes=num_classes).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, num_classes)
    assert isinstance(gradcam_target_layer(model), torch.nn.Conv2d)


def test_cnn_options_change_the_network():
    small = build_model(
        "cnn", {"width": 8, "hidden_units": 32, "dropout": 0.0, "batch_norm": False}
    )
    large = build_model(
        "cnn", {"width": 16, "hidden_units": 64, "dropout": 0.5, "batch_norm": True}
    )
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(small) < count(large)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in small.modules())


def test_resnet18_has_a_cifar_stem():
    model = build_model("resnet18")
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)


def test_missing_weights_fail_with_instructions(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no internet")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsUnavailableError) as error:
        build_model("resnet18_pretrained", pretrained=True)
    message = str(error.value)
    assert "resnet18-f37072fd.pth" in message and str(tmp_path) in message
    assert "weights_path" in message and "pretrained=false" in message


def test_weights_path_loads_everything_but_the_new_head(tmp_path):
    imagenet = tv_models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(imagenet.state_dict(), path)
    model = build_model("resnet18_pretrained", pretrained=True, weights_path=str(path))
    assert torch.equal(model.conv1.weight, imagenet.conv1.weight)
    assert torch.equal(model.layer4[1].conv2.weight, imagenet.layer4[1].conv2.weight)
    assert model.fc.out_features == 10


def test_transfer_freezes_features_and_finetune_unfreezes_later():
    model = build_model("vgg16_finetune")
    assert is_frozen("vgg16_transfer", 9, freeze_epochs=5)
    assert is_frozen("vgg16_finetune", 4, 5) and not is_frozen("vgg16_finetune", 5, 5)
    assert not is_frozen("resnet18", 0, 5)
    set_frozen(model, "vgg16_finetune", True)
    assert not any(p.requires_grad for p in model.features.parameters())
    assert all(p.requires_grad for p in model.classifier.parameters())
    set_frozen(model, "vgg16_finetune", False)
    assert all(p.requires_grad for p in model.features.parameters())


def test_unknown_model_lists_the_choices():
    with pytest.raises(ValueError, match="choose one of"):
        build_model("resnet50")
