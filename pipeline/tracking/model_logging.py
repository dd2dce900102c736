"""Logging a trained network as the project's pyfunc: weights, normalization, classes, signature."""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import PIL
import torch
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.types.schema import AnyType, Array, ColSpec, DataType, ParamSchema, ParamSpec, Schema

from pipeline.model.classifier import IMAGE_COLUMN, predict_probabilities
from pipeline.model.drift import (
    REFERENCE_ARTIFACT,
    TRAINING_ONLY,
    Reference,
    reference_sample,
)
from pipeline.model.imaging import encode_png
from pipeline.model.micro_batcher import MICRO_BATCH_DEFAULTS

PIPELINE_DIR = Path(__file__).resolve().parents[1]
# What the served model imports: the `pipeline.model` package and the error base it raises from.
SERVED_CODE = ("__init__.py", "errors.py", "model")
OUTPUT_SCHEMA = Schema(
    [
        ColSpec(DataType.long, "label"),
        ColSpec(DataType.string, "class_name"),
        ColSpec(Array(DataType.double), "probabilities"),
        # with params={"explain": true} (pipeline/model/explaining.py)
        ColSpec(DataType.long, "explained_label", required=False),
        ColSpec(DataType.string, "explained_class", required=False),
        ColSpec(Array(Array(DataType.double)), "heatmap", required=False),
        ColSpec(DataType.string, "heatmap_png", required=False),
    ]
)


def classifier_signature(tta: bool) -> ModelSignature:
    """Encoded images in; label, class name and probabilities out. The `tta` param defaults to
    what the model's validation used, so a request without params gets the validated behaviour."""
    return ModelSignature(
        inputs=Schema([ColSpec(AnyType(), IMAGE_COLUMN)]),
        outputs=OUTPUT_SCHEMA,
        params=ParamSchema(
            [
                ParamSpec("tta", DataType.boolean, tta),
                ParamSpec("on_error", DataType.string, "raise"),
                ParamSpec("explain", DataType.boolean, False),
                ParamSpec("target", DataType.string, ""),
            ]
        ),
    )


def default_tta(model: mlflow.pyfunc.PyFuncModel) -> bool:
    """The `tta` a logged model applies when a request does not say (False for models logged
    before it had a default)."""
    params = model.metadata.get_params_schema()
    defaults = {spec.name: spec.default for spec in params.params} if params else {}
    return bool(defaults.get("tta", False))


def served_code(destination: Path) -> Path:
    """A `pipeline` folder holding only what the served model imports, to log as its code."""
    target = destination / "pipeline"
    target.mkdir(parents=True)
    for name in SERVED_CODE:
        source = PIPELINE_DIR / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target / name)
    return target


def served_requirements() -> list[str]:
    """What the served model imports, pinned to the versions it was logged with."""
    return [
        f"mlflow=={mlflow.__version__}",
        f"torch=={torch.__version__.split('+')[0]}",
        f"torchvision=={version('torchvision').split('+')[0]}",
        f"pillow=={PIL.__version__}",
        f"pandas=={pd.__version__}",
        f"numpy=={np.__version__}",
        f"scipy=={version('scipy')}",  # the drift test
        f"grad-cam=={version('grad-cam')}",  # params={"explain": true}
    ]


def drift_reference(
    model: torch.nn.Module,
    mean: Sequence[float],
    std: Sequence[float],
    train_images: np.ndarray,
    val_images: np.ndarray,
    val_labels: np.ndarray,
    tta: bool,
) -> Reference:
    """The image statistics of, and the network's outputs on, a seeded sample of (up to 2,000)
    `val_images` drawn across the split by class (of `train_images` where there is no validation
    split)."""
    sample = reference_sample(val_labels)
    if not len(sample):
        return dataclasses.replace(Reference.from_images(train_images), sampling=TRAINING_ONLY)
    held_out = val_images[sample]
    probabilities = predict_probabilities(model, held_out, mean, std, tta)
    reference = Reference.from_images(held_out, len(held_out), probabilities=probabilities)
    return dataclasses.replace(reference, sample=sample)


def mlmodel_metadata(
    architecture: str, class_names: Sequence[str], reference: Reference, val_images: int
) -> dict[str, Any]:
    """What the MLmodel file says of the model, read without loading it (the server's card)."""
    held_out = 0 if reference.sampling == TRAINING_ONLY else len(reference.sample)
    return {
        "architecture": architecture,
        "class_names": list(class_names),
        "drift_reference": {
            "images": len(reference.features),
            "held_out_images": held_out,
            "validation_images": val_images,
            "sampling": reference.sampling,
            "digest": reference.digest,
        },
    }


def log_classifier(
    model: torch.nn.Module,
    architecture: str,
    options: dict[str, Any],
    mean: Sequence[float],
    std: Sequence[float],
    class_names: Sequence[str],
    example_image: np.ndarray,
    train_images: np.ndarray,
    val_images: np.ndarray,
    val_labels: np.ndarray,
    tta: bool = False,
) -> ModelInfo:
    """Log `model` under the artifact name `model` in the active run, with everything to serve it.
    The model carries `pipeline/model/` (and the error base) as its code: no training, tracking or
    serving code travels with it, and the drift reference the server watches against
    (`drift_reference`)."""
    reference = drift_reference(model, mean, std, train_images, val_images, val_labels, tta)
    meta = {
        "architecture": architecture,
        "options": options,
        "mean": list(mean),
        "std": list(std),
        "class_names": list(class_names),
        "image_size": 32,
    }
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "weights.pt"
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, weights)
        meta_path = Path(tmp) / "meta.json"
        meta_path.write_text(json.dumps(meta, indent=2))
        reference_path = Path(tmp) / "drift_reference.npz"
        reference.save(reference_path)
        code = served_code(Path(tmp) / "code")
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=str(code / "model" / "classifier_entry.py"),
            artifacts={
                "weights": str(weights),
                "meta": str(meta_path),
                REFERENCE_ARTIFACT: str(reference_path),
            },
            code_paths=[str(code)],
            signature=classifier_signature(tta),
            # Drift watching is off unless a server turns it on (MLflow takes only logged keys).
            model_config={**MICRO_BATCH_DEFAULTS, "drift_window": 0},
            input_example=pd.DataFrame({IMAGE_COLUMN: [encode_png(example_image)]}),
            pip_requirements=served_requirements(),
            metadata=mlmodel_metadata(architecture, class_names, reference, len(val_images)),
        )
