"""Why the model gave a class: Grad-CAM maps over the 32x32 input, for any architecture.

The served pyfunc (its `explain` param), `evaluate`'s overlays and the page all explain through
here, with the grad-cam library on the registry's target layer. A map is computed for the network
without flip TTA: it explains the one forward pass a person can relate to the image they sent.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence

import numpy as np
import torch

from pipeline.model.architectures import gradcam_target_layer
from pipeline.model.decoding import InvalidImageError
from pipeline.model.imaging import encode_png


def target_classes(
    target: str | int | None, predicted: Sequence[int], class_names: Sequence[str]
) -> list[int]:
    """The class each image is explained for: `target` (a class name or index) for all of them,
    or each image's predicted class when no target is given."""
    if target is None or (isinstance(target, str) and not target.strip()):
        return [int(label) for label in predicted]
    text = str(target).strip()
    if text in class_names:
        index = list(class_names).index(text)
    elif text.lstrip("-").isdigit() and 0 <= int(text) < len(class_names):
        index = int(text)
    else:
        raise InvalidImageError(
            f"target '{text[:40]}' is not a class of this model; give one of "
            f"{', '.join(class_names)}, or an index from 0 to {len(class_names) - 1}."
        )
    return [index] * len(predicted)


def gradcam_maps(model: torch.nn.Module, batch: torch.Tensor, targets: Sequence[int]) -> np.ndarray:
    """One map per normalized NCHW image, each in [0, 1] at the input's size, for its target."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model.eval()
    with torch.enable_grad(), GradCAM(model, [gradcam_target_layer(model)]) as cam:
        maps = cam(input_tensor=batch, targets=[ClassifierOutputTarget(int(t)) for t in targets])
    return np.clip(np.nan_to_num(maps.astype(np.float32)), 0.0, 1.0)


def overlay(image: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """The map in colour over the uint8 RGB image it explains (red: what the class rests on)."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    return show_cam_on_image(image.astype(np.float32) / 255, heatmap, use_rgb=True)


def overlay_png_base64(image: np.ndarray, heatmap: np.ndarray) -> str:
    return base64.b64encode(encode_png(overlay(image, heatmap))).decode("ascii")
