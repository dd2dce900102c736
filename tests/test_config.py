import pytest

from pipeline.config import (
    ConfigError,
    PromoteConfig,
    TrainConfig,
    build_config,
    config_to_params,
    resolve_train_config,
)


def test_model_yaml_then_config_file_then_overrides(tmp_path):
    base = resolve_train_config({"model": "resnet18"})
    assert (base.optimizer, base.lr, base.epochs) == ("sgd", 0.2, 50)
    config_file = tmp_path / "best.yaml"
    config_file.write_text("model: resnet18\nlr: 0.05\nepochs: 7\n")
    from_file = resolve_train_config({"config": str(config_file)})
    assert (from_file.model, from_file.lr, from_file.epochs, from_file.optimizer) == (
        "resnet18",
        0.05,
        7,
        "sgd",
    )
    overridden = resolve_train_config({"config": str(config_file), "epochs": "3", "lr": "1e-3"})
    assert (overridden.epochs, overridden.lr) == (3, 0.001)


def test_strings_from_mlproject_are_coerced():
    config = build_config(
        TrainConfig, {"epochs": "5", "pretrained": "False", "weights_path": "", "lr": "0.01"}
    )
    assert config.epochs == 5 and config.pretrained is False
    assert config.weights_path is None and config.lr == 0.01
    assert build_config(
        PromoteConfig, {"architectures": "resnet18, resnet18_pretrained"}
    ).architectures == [
        "resnet18",
        "resnet18_pretrained",
    ]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"epochs": "ten"}, "epochs must be a int"),
        ({"epochs": "0"}, "epochs must be at least 1"),
        ({"pretrained": "maybe"}, "pretrained must be true or false"),
        ({"val_fraction": "1.5"}, "val_fraction must be between 0 and 1"),
        ({"optimizer": "adam"}, "optimizer must be one of"),
        ({"lerning_rate": "0.1"}, "Unknown parameter 'lerning_rate'"),
    ],
)
def test_bad_values_name_the_problem(values, message):
    with pytest.raises(ConfigError, match=message):
        build_config(TrainConfig, values)


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_train_config({"config": str(tmp_path / "nope.yaml")})


def test_params_show_none_as_empty():
    params = config_to_params(TrainConfig())
    assert params["weights_path"] == "" and params["model"] == "cnn"


def test_a_model_declares_its_own_options_and_no_other_model_takes_them():
    cnn = resolve_train_config({"model": "cnn", "width": "48", "batch_norm": "false"})
    assert cnn.options == {
        "width": 48,
        "hidden_units": 256,
        "dropout": 0.2,
        "batch_norm": False,
        "convs_per_block": 2,
    }
    assert config_to_params(cnn)["width"] == 48 and "options" not in config_to_params(cnn)
    assert resolve_train_config({"model": "resnet18"}).options == {}
    with pytest.raises(ConfigError, match="'width' is an option of cnn, fastnet, not of resnet18"):
        resolve_train_config({"model": "resnet18", "width": "48"})


def test_a_new_architecture_with_one_option_needs_only_its_constructor(monkeypatch):
    from torch import nn

    from pipeline.model import architectures as models

    def toy(num_classes: int = 10, depth: int = 2) -> nn.Module:
        return nn.Sequential(nn.Flatten(), *[nn.LazyLinear(8) for _ in range(depth)])

    monkeypatch.setitem(models.MODELS, "toy", models.ModelSpec(build=toy))
    config = resolve_train_config({"model": "toy", "depth": "3"})
    assert config.options == {"depth": 3}
    assert len(models.build_model("toy", config.options)) == 4
