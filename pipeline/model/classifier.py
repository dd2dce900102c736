"""The pyfunc every consumer loads: encoded images in, label / class name / probabilities out.

It rebuilds the network from the model registry and its logged weights, and imports only torch, the
model registry, normalization and decoding, so a server starts quickly and carries no training code.
Every input problem becomes an MlflowException with INVALID_PARAMETER_VALUE, which MLflow's scoring
app answers with HTTP 400 and the message. Loading it starts one thread (the micro-batcher) and
nothing process-wide; the thread ends when the model is released or `close()`d.
"""

from __future__ import annotations

import json
import logging
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from pipeline.model.architectures import build_model, class_probabilities, normalize
from pipeline.model.decoding import InvalidImageError, decode_image, image_bytes
from pipeline.model.drift import REFERENCE_ARTIFACT, DriftWindow, Reference, image_features
from pipeline.model.explaining import gradcam_maps, overlay_png_base64, target_classes
from pipeline.model.imaging import encode_png
from pipeline.model.micro_batcher import MICRO_BATCH_DEFAULTS, MicroBatcher

IMAGE_COLUMN = "image"
MAX_IMAGES_PER_REQUEST = 1024
logger = logging.getLogger(__name__)


def check_image_count(count: int) -> None:
    """The per-request limit, for the pyfunc and for the gateway in front of it."""
    if count > MAX_IMAGES_PER_REQUEST:
        raise InvalidImageError(
            f"{count} images in one request; the limit is {MAX_IMAGES_PER_REQUEST}. "
            "Split the request."
        )


@torch.no_grad()
def predict_probabilities(
    model: torch.nn.Module,
    images: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    tta: bool = False,
    batch_size: int = 512,
) -> np.ndarray:
    """Softmax probabilities for uint8 NHWC images (`class_probabilities`, in chunks)."""
    model.eval()
    device = next(model.parameters()).device
    outputs = []
    for start in range(0, len(images), batch_size):
        chunk = torch.from_numpy(images[start : start + batch_size]).permute(0, 3, 1, 2)
        batch = normalize(chunk.to(device), mean, std)
        outputs.append(class_probabilities(model, batch, tta).cpu().numpy())
    return np.concatenate(outputs) if outputs else np.zeros((0, 0), np.float32)


def predict_in_chunks(
    model: mlflow.pyfunc.PyFuncModel, images: np.ndarray, batch_size: int, tta: bool = False
) -> np.ndarray:
    """Probabilities for uint8 NHWC images through a logged model's own `predict`, PNG-encoded as a
    request would send them, in chunks within the per-request limit."""
    size = max(1, min(batch_size, MAX_IMAGES_PER_REQUEST))
    frames = [
        model.predict(
            pd.DataFrame({IMAGE_COLUMN: [encode_png(image) for image in images[i : i + size]]}),
            params={"tta": tta},
        )
        for i in range(0, len(images), size)
    ]
    return np.array([p for frame in frames for p in frame["probabilities"]], dtype=np.float64)


def load_network(meta: dict[str, Any], weights_path: str) -> torch.nn.Module:
    model = build_model(meta["architecture"], meta["options"], num_classes=len(meta["class_names"]))
    model.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
    return model.eval()


@dataclass(frozen=True)
class Observation:
    """One answered call, for what watches the served model (the drift window, the inference log):
    the request's rows and the answer row for row, and for the rows that were scored their pixels,
    encoded bytes (as sent), image statistics (drift.image_features) and top-class probability."""

    frame: pd.DataFrame
    result: pd.DataFrame
    images: np.ndarray
    encoded: list[bytes]
    features: np.ndarray
    confidence: np.ndarray
    seconds: float


class CifarClassifier(mlflow.pyfunc.PythonModel):
    """Classifies encoded images with the logged network, normalizing exactly as in training."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.meta = json.loads(Path(context.artifacts["meta"]).read_text())
        self.class_names = list(self.meta["class_names"])
        mean, std = self.meta["mean"], self.meta["std"]
        # Every torch call of this model, loading included, runs on one thread. The scoring server
        # calls predict from a pool of threads; each calling thread gets its own OpenMP team, and
        # with more OpenMP threads than cores libgomp stops spinning between parallel regions:
        # ~190 sleeps and wake-ups per ResNet-18 forward, most of a 9-12 ms overhead per request on
        # 2 cores (benchmarks/RESULTS.md, Serving).
        settings = MICRO_BATCH_DEFAULTS | dict(context.model_config or {})
        meta, weights = self.meta, context.artifacts["weights"]
        self.batcher = MicroBatcher(
            lambda: load_network(meta, weights),
            lambda network, images, tta: predict_probabilities(network, images, mean, std, tta),
            settings["max_batch_images"],
            float(settings["batch_wait_ms"]) / 1000,
        )
        self.close = weakref.finalize(self, self.batcher.stop)
        # The server watches its inputs for drift (model_config drift_window); scoring a folder
        # does not. A model logged before the reference existed has none to watch.
        reference = context.artifacts.get(REFERENCE_ARTIFACT)
        window = int(settings.get("drift_window", 0))
        self.reference = Reference.load(Path(reference)) if reference else None
        self.drift = DriftWindow(self.reference, window) if window and reference else None
        self.observers: list[Callable[[Observation], None]] = []
        if (drift := self.drift) is not None:
            self.observers.append(lambda seen: drift.add(seen.features, seen.confidence))

    @property
    def model(self) -> torch.nn.Module:
        """The network itself (Grad-CAM needs its layers)."""
        return self.batcher.model

    # MLflow infers no signature from a DataFrame hint; the logged signature stays the explicit one.
    def predict(
        self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """`params`: `tta` (flip test-time augmentation); `on_error`: "raise" (a request with a
        bad image is refused whole, as the server answers) or "report" (batch scoring: a bad image
        gets its message in an `error` column, the others are scored); `explain`: add a Grad-CAM
        map per image for `target` (a class name or index; default: the predicted class) as
        `explained_label`, `explained_class`, `heatmap` (32x32 in [0, 1]) and `heatmap_png` (the
        map over the image, base64 PNG)."""
        params = params or {}
        report = params.get("on_error", "raise") == "report"
        try:
            started = time.perf_counter()
            result, images, encoded = self.classify(
                model_input, bool(params.get("tta", False)), report
            )
            if self.observers and len(images):
                self.notify(model_input, result, images, encoded, time.perf_counter() - started)
            if params.get("explain", False):
                self.explain(result, images, params.get("target") or None)
            return result
        except InvalidImageError as error:
            raise MlflowException(str(error), error_code=INVALID_PARAMETER_VALUE) from None

    def notify(
        self,
        frame: pd.DataFrame,
        result: pd.DataFrame,
        images: np.ndarray,
        encoded: list[bytes],
        seconds: float,
    ) -> None:
        """Tell each observer about this answer; one that fails is logged, never the request's
        problem."""
        scored = result["probabilities"][result["label"].to_numpy() >= 0]
        seen = Observation(
            frame,
            result,
            images,
            encoded,
            image_features(images),
            np.array([max(p) for p in scored], dtype=np.float64),
            seconds,
        )
        for observer in self.observers:
            try:
                observer(seen)
            except Exception:
                logger.exception("an observer of the served model failed; the answer stands")

    def explain(self, result: pd.DataFrame, images: np.ndarray, target: str | None) -> None:
        """Grad-CAM columns for the scored rows of `result` (whose pixels are `images`), computed
        on the model's thread."""
        scored = np.flatnonzero(result["label"].to_numpy() >= 0)
        targets = target_classes(target, result["label"].to_numpy()[scored], self.class_names)
        mean, std = self.meta["mean"], self.meta["std"]

        def maps_of(network: torch.nn.Module) -> np.ndarray:
            batch = normalize(torch.from_numpy(images).permute(0, 3, 1, 2), mean, std)
            return gradcam_maps(network, batch, targets)

        heatmaps = self.batcher.call(maps_of) if len(scored) else np.zeros((0, 32, 32))
        labels, names = [-1] * len(result), [""] * len(result)
        maps, pictures = [[] for _ in range(len(result))], [""] * len(result)
        for row, image, heatmap, label in zip(scored, images, heatmaps, targets, strict=True):
            labels[row], names[row] = label, self.class_names[label]
            maps[row] = np.round(heatmap, 4).tolist()
            pictures[row] = overlay_png_base64(image, heatmap)
        result["explained_label"] = np.array(labels, dtype=np.int64)
        result["explained_class"] = names
        result["heatmap"] = maps
        result["heatmap_png"] = pictures

    def classify(
        self, model_input: pd.DataFrame, tta: bool, report: bool
    ) -> tuple[pd.DataFrame, np.ndarray, list[bytes]]:
        """The answer for each row, and the pixels and encoded bytes of the rows that decoded."""
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if IMAGE_COLUMN not in frame.columns:
            raise InvalidImageError(
                f"missing column '{IMAGE_COLUMN}' (got {list(frame.columns)}); send "
                '{"dataframe_split": {"columns": ["image"], "data": [["<base64 PNG/JPEG>"]]}}.'
            )
        check_image_count(len(frame))
        errors = [""] * len(frame)
        with self.batcher.caller():
            images, encoded = [], []
            for i, value in enumerate(frame[IMAGE_COLUMN]):
                try:
                    raw = image_bytes(value, i)
                    images.append(decode_image(raw, i))
                    encoded.append(raw)
                except InvalidImageError as error:
                    if not report:
                        raise
                    errors[i] = str(error).removeprefix(f"image {i}: ")
            pixels = np.stack(images) if images else np.zeros((0, 32, 32, 3), np.uint8)
            scored = self.batcher.predict(pixels, tta) if images else None
        labels, names, rows, next_scored = [], [], [], 0
        for error in errors:
            if error:
                labels.append(-1)
                names.append("")
                rows.append([])
                continue
            probabilities = scored[next_scored]
            next_scored += 1
            labels.append(int(probabilities.argmax()))
            names.append(self.class_names[labels[-1]])
            rows.append(probabilities.astype(float).tolist())
        result = pd.DataFrame(
            {
                "label": np.array(labels, dtype=np.int64),
                "class_name": names,
                "probabilities": rows,
            }
        )
        if report:
            result["error"] = errors
        return result, pixels, encoded
