"""The model registry: one name -> one constructor, plus what training and Grad-CAM need to know.

Served models import this module to rebuild the network from its logged options, so it stays free of
MLflow and data code.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.errors import PipelineError


class WeightsUnavailableError(PipelineError):
    """Pretrained weights were asked for and cannot be had; the message says how to provide them."""


class UnknownModelError(PipelineError, ValueError):
    """A model name that is not in the registry."""


@dataclass(frozen=True)
class ModelSpec:
    build: Callable[..., nn.Module]
    # torchvision's name for the pretrained weights: torchvision, slow to import, is imported only by
    # the constructors that use it, not by every process that loads a model.
    weights: str | None = None
    frozen_part: str | None = None
    unfreeze_after_freeze_epochs: bool = False
    # Called once with the new model and normalized training images (NCHW float), before training:
    # fastnet sets its whitening layer from the data. A loaded model gets it from its weights.
    init_from_data: Callable[[nn.Module, torch.Tensor], None] | None = None
    # Each constructor option's --help text, beside the constructor that takes it.
    option_help: dict[str, str] = field(default_factory=dict)

    @property
    def options(self) -> dict[str, Any]:
        """The model's own options and their defaults: its constructor's keyword arguments (all but
        `num_classes`). Config, CLI, MLproject and logged models all take them from here."""
        return {
            name: parameter.default
            for name, parameter in inspect.signature(self.build).parameters.items()
            if name != "num_classes"
        }


MODELS: dict[str, ModelSpec] = {}


def register(
    name: str, **spec: Any
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def add(build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        model = ModelSpec(build=build, **spec)
        if undescribed := set(model.options) - set(model.option_help):
            raise TypeError(f"model {name}: options without option_help: {sorted(undescribed)}")
        MODELS[name] = model
        return build

    return add


def conv_block(in_ch: int, out_ch: int, batch_norm: bool, convs: int) -> nn.Sequential:
    """`convs` 3x3 convolutions (each with optional batch norm and ReLU), then a 2x2 max-pool."""
    layers: list[nn.Module] = []
    for i in range(convs):
        layers.append(
            nn.Conv2d(in_ch if i == 0 else out_ch, out_ch, 3, padding=1, bias=not batch_norm)
        )
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_ch))
        layers.append(nn.ReLU(inplace=True))
    layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


@register(
    "cnn",
    option_help={
        "width": "channels of the first conv block (then 2x, 4x)",
        "hidden_units": "width of the hidden fully connected layer",
        "dropout": "dropout before the classifier layers",
        "batch_norm": "batch norm after each convolution",
        "convs_per_block": "3x3 convolutions per block",
    },
)
def small_cnn(
    num_classes: int = 10,
    width: int = 32,
    hidden_units: int = 256,
    dropout: float = 0.2,
    batch_norm: bool = True,
    convs_per_block: int = 2,
) -> nn.Module:
    """The seed report's network: three conv blocks (width, 2x, 4x channels), one hidden FC layer."""
    return nn.Sequential(
        conv_block(3, width, batch_norm, convs_per_block),
        conv_block(width, 2 * width, batch_norm, convs_per_block),
        conv_block(2 * width, 4 * width, batch_norm, convs_per_block),
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(4 * width * 4 * 4, hidden_units),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(hidden_units, num_classes),
    )


@register("resnet18")
def resnet18_cifar(num_classes: int = 10) -> nn.Module:
    """ResNet-18 for 32x32 inputs: 3x3 stride-1 stem and no max-pool, trained from scratch."""
    from torchvision.models import resnet18

    model = resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


@register("resnet18_pretrained", weights="ResNet18_Weights.IMAGENET1K_V1")
def resnet18_imagenet(num_classes: int = 10) -> nn.Module:
    """torchvision ResNet-18 (ImageNet stem) with a new 10-class head."""
    from torchvision.models import resnet18

    model = resnet18()
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


def vgg16_cifar(num_classes: int = 10, dropout: float = 0.5) -> nn.Module:
    """VGG16 features with a 512-wide head on globally pooled features.

    At 32x32 the features end at 1x1, so the ImageNet classifier (25088 -> 4096, 100M weights) would
    only see one value copied 49 times; a small new head trains faster and fits on any machine.
    """
    from torchvision.models import vgg16

    model = vgg16()
    model.avgpool = nn.AdaptiveAvgPool2d(1)
    model.classifier = nn.Sequential(
        nn.Linear(512, 512), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(512, num_classes)
    )
    return model


VGG16_SPEC = {
    "weights": "VGG16_Weights.IMAGENET1K_V1",
    "frozen_part": "features",
    "option_help": {"dropout": "dropout before the classifier layers"},
}
register("vgg16_transfer", **VGG16_SPEC)(vgg16_cifar)
register("vgg16_finetune", **VGG16_SPEC, unfreeze_after_freeze_epochs=True)(vgg16_cifar)


def fast_conv(in_ch: int, out_ch: int) -> nn.Conv2d:
    """A 3x3 convolution that starts as an identity on its first `in_ch` channels (Dirac init): an
    implicit residual connection at no cost."""
    conv = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False)
    nn.init.dirac_(conv.weight.data[: min(in_ch, out_ch)])
    return conv


def fast_norm(channels: int) -> nn.BatchNorm2d:
    """Batch norm with a fixed scale of 1 (the convolutions before it are scale-free, so a learnt
    scale only slows the high learning rate down) and fast-moving running statistics."""
    norm = nn.BatchNorm2d(channels, eps=1e-12, momentum=0.4)
    norm.weight.requires_grad_(False)
    return norm


class FastBlock(nn.Sequential):
    """conv 3x3 -> max-pool 2 -> BN -> GELU -> conv 3x3 -> BN -> GELU: the pool before the norm
    halves the work of everything after the first convolution."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(
            fast_conv(in_ch, out_ch),
            nn.MaxPool2d(2),
            fast_norm(out_ch),
            nn.GELU(),
            fast_conv(out_ch, out_ch),
            fast_norm(out_ch),
            nn.GELU(),
        )


class FastNet(nn.Module):
    """A network designed for speed, after the published ideas of KellerJordan/cifar10-airbench:
    a fixed 2x2 patch-whitening first layer (set from the training data, not trained), three wide
    blocks that pool early, a global max-pool and a linear head whose output is scaled down
    (a gentler start for the high learning rates its recipe uses).

    The blocks have `width`, then twice `width * width_multiplier` channels: 64/192/192 in its
    recipe (experiments/fastnet.yaml: 2 CPU cores train it in 14 minutes), airbench94's 64/256/256
    with `width_multiplier=4`."""

    def __init__(
        self,
        num_classes: int = 10,
        width: int = 64,
        width_multiplier: int = 2,
        head_scale: float = 1 / 9,
    ) -> None:
        super().__init__()
        self.whiten = nn.Conv2d(3, 24, kernel_size=2, bias=False)
        self.whiten.weight.requires_grad_(False)
        wide = width * width_multiplier
        self.blocks = nn.Sequential(
            FastBlock(24, width), FastBlock(width, wide), FastBlock(wide, wide)
        )
        self.head = nn.Linear(wide, num_classes, bias=False)
        self.head_scale = head_scale

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.blocks(nn.functional.gelu(self.whiten(images)))
        return self.head(features.amax(dim=(2, 3))) * self.head_scale


def fit_whitening(model: nn.Module, images: torch.Tensor, eps: float = 5e-4) -> None:
    """Set the 2x2 whitening filters from the training images' patch covariance: its 12
    eigenvectors scaled by 1/sqrt(eigenvalue), and their negatives (24 filters)."""
    patches = images[:5000].float().unfold(2, 2, 1).unfold(3, 2, 1)  # N, C, H', W', 2, 2
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, 12).double()
    patches = patches - patches.mean(dim=0)
    covariance = patches.T @ patches / len(patches)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    filters = (eigenvectors.T / torch.sqrt(eigenvalues + eps)[:, None]).view(12, 3, 2, 2)
    with torch.no_grad():
        model.whiten.weight.copy_(torch.cat([filters, -filters]).to(model.whiten.weight))


register(
    "fastnet",
    init_from_data=fit_whitening,
    option_help={
        "width": "channels of the first block (then width_multiplier x, twice)",
        "width_multiplier": "channels of blocks 2 and 3 over the first's (its recipe: 3; "
        "airbench94: 4)",
        "head_scale": "factor on the logits (small: a gentle start at a high learning rate)",
    },
)(FastNet)


def normalize(
    images: torch.Tensor,
    mean: Sequence[float] | torch.Tensor,
    std: Sequence[float] | torch.Tensor,
    dtype=torch.float32,
) -> torch.Tensor:
    """uint8 NCHW -> normalized float NCHW.

    Pass `mean`/`std` as tensors already on the device in a training loop: building them from Python
    floats is a blocking host-to-device copy, which would stall the GPU once per batch.
    """
    mean_t = torch.as_tensor(mean, device=images.device, dtype=dtype).view(1, 3, 1, 1) * 255
    std_t = torch.as_tensor(std, device=images.device, dtype=dtype).view(1, 3, 1, 1) * 255
    return (images.to(dtype) - mean_t) / std_t


def class_probabilities(model: nn.Module, images: torch.Tensor, tta: bool = False) -> torch.Tensor:
    """Softmax probabilities of a normalized batch; `tta` averages them with the mirrored images'
    (flip test-time augmentation). Validation, `evaluate` and the served model all call this, so
    a model's validation accuracy with TTA is what it serves with TTA."""
    probabilities = model(images).float().softmax(dim=1)
    if tta:
        probabilities = (probabilities + model(images.flip(-1)).float().softmax(dim=1)) / 2
    return probabilities


def model_names() -> list[str]:
    return sorted(MODELS)


def get_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise UnknownModelError(f"Unknown model {name!r}; choose one of {model_names()}.")
    return MODELS[name]


def described_option(option: str) -> str:
    """A model option's help, with the models that take it ("cnn: ...; fastnet: ...")."""
    takers: dict[str, list[str]] = {}
    for name in model_names():
        if option in MODELS[name].options:
            takers.setdefault(MODELS[name].option_help[option], []).append(name)
    return "; ".join(f"{', '.join(names)}: {text}" for text, names in takers.items())


def option_owners() -> dict[str, list[str]]:
    """Every model option of the registry -> the models that take it."""
    owners: dict[str, list[str]] = {}
    for name in model_names():
        for option in MODELS[name].options:
            owners.setdefault(option, []).append(name)
    return owners


def pretrained_state_dict(name: str, weights_path: str | None) -> dict[str, torch.Tensor]:
    """ImageNet weights from `weights_path` or torchvision's cache/download (honours TORCH_HOME)."""
    spec = get_spec(name)
    if spec.weights is None:
        raise WeightsUnavailableError(
            f"{name} has no pretrained weights; use pretrained=false or resnet18_pretrained."
        )
    if weights_path:
        path = Path(weights_path)
        if not path.is_file():
            raise WeightsUnavailableError(f"weights_path {path} does not exist.")
        return torch.load(path, map_location="cpu", weights_only=True)
    from torchvision.models import get_weight

    weights = get_weight(spec.weights)
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as error:
        file_name = Path(weights.url).name
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        raise WeightsUnavailableError(
            f"Could not get ImageNet weights for {name} from {weights.url} "
            f"({type(error).__name__}: {error}).\n"
            f"Provide them in one of three ways:\n"
            f"  1. copy {file_name} into {cache} (set TORCH_HOME to use another cache);\n"
            f"  2. pass -P weights_path=/path/to/{file_name};\n"
            f"  3. train from random weights with -P pretrained=false."
        ) from None


def load_matching(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Copy every pretrained tensor whose name and shape match; the new head stays random."""
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(usable, strict=False)
    return sorted(set(own) - set(usable))


def build_model(
    name: str,
    options: dict[str, Any] | None = None,
    pretrained: bool = False,
    weights_path: str | None = None,
    num_classes: int = 10,
) -> nn.Module:
    model = get_spec(name).build(num_classes=num_classes, **(options or {}))
    if pretrained:
        load_matching(model, pretrained_state_dict(name, weights_path))
    return model


def is_frozen(name: str, epoch: int, freeze_epochs: int) -> bool:
    """Transfer models keep their features frozen; fine-tuned ones for the first `freeze_epochs`."""
    spec = get_spec(name)
    if spec.frozen_part is None:
        return False
    return not spec.unfreeze_after_freeze_epochs or epoch < freeze_epochs


def set_frozen(model: nn.Module, name: str, frozen: bool) -> None:
    """Freeze or unfreeze the pretrained part of a transfer model (a no-op for the others)."""
    part = get_spec(name).frozen_part
    if part is not None:
        for parameter in getattr(model, part).parameters():
            parameter.requires_grad_(not frozen)


def gradcam_target_layer(model: nn.Module, image_size: int = 32) -> nn.Module:
    """The deepest convolution whose output still has a spatial map (more than 1x1) for a 32x32
    input, for any architecture: on an ImageNet-stem ResNet the last convolution sees 1x1 there,
    and a map of one cell explains nothing."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError("Grad-CAM needs a model with at least one Conv2d layer.")
    cells: dict[nn.Module, int] = {}
    hooks = [
        conv.register_forward_hook(
            lambda module, _, output: cells.__setitem__(module, output.shape[-2] * output.shape[-1])
        )
        for conv in convs
    ]
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            device = next(model.parameters()).device
            model(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        model.train(training)
        for hook in hooks:
            hook.remove()
    spatial = [conv for conv in convs if cells.get(conv, 0) > 1]
    return spatial[-1] if spatial else convs[-1]
