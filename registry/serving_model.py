"""The logged and served model: encoded images in, label / class name / probabilities out.

A pyfunc that rebuilds the network from the model registry and its logged weights. It imports only
torch, the model registry, the normalization helper and image decoding, so a server starts quickly and
carries no training code. Every input problem becomes an MlflowException with INVALID_PARAMETER_VALUE,
which `mlflow models serve` answers with HTTP 400 and the message, and keeps serving.
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import io
import json
import queue
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import PIL
import torch
import torchvision
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types.schema import AnyType, Array, ColSpec, DataType, ParamSchema, ParamSpec, Schema
from PIL import Image

from pipeline.config import ServeConfig
from pipeline.imaging import encode_png, to_rgb_32
from pipeline.loader import normalize
from pipeline.models import build_model

IMAGE_COLUMN = "image"
MAX_IMAGES_PER_REQUEST = 1024
MAX_IMAGE_PIXELS = 4096 * 4096
# mallopt parameters from glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
SUPPORTED_FORMATS = ("PNG", "JPEG")
# Micro-batching, overridden at load time by model_config: the serve entry point's parameters, or
# MLFLOW_PYFUNC_INFERENCE_CONFIG='{"max_batch_images": 1}' for `mlflow models serve`. 1 turns it off.
MICRO_BATCH_DEFAULTS = {
    "max_batch_images": ServeConfig.max_batch_images,
    "batch_wait_ms": ServeConfig.batch_wait_ms,
}
PACKAGE_ROOT = Path(__file__).resolve().parent.parent


class InvalidImageError(MlflowException):
    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


def image_bytes(value: Any, index: int) -> bytes:
    """Raw bytes from what a caller sent: bytes in process, base64 text over REST.

    Line breaks are allowed in the base64 text (the `base64` tool and MLflow wrap at 76 columns);
    any other character outside the alphabet is an error, not silently skipped.
    """
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
    elif isinstance(value, str):
        try:
            raw = base64.b64decode("".join(value.split()), validate=True)
        except (binascii.Error, ValueError):
            raise InvalidImageError(
                f"image {index}: not valid base64. Send each image as the base64 text of its "
                "PNG or JPEG file (e.g. base64.b64encode(open('cat.png','rb').read()).decode())."
            ) from None
    else:
        raise InvalidImageError(
            f"image {index}: expected PNG/JPEG bytes or their base64 text, got {type(value).__name__}."
        )
    if not raw:
        raise InvalidImageError(f"image {index}: empty; send the bytes of a PNG or JPEG file.")
    return raw


def decode_image(value: Any, index: int = 0) -> np.ndarray:
    """One encoded image -> 32x32 RGB uint8, refusing oversized images before decoding pixels."""
    raw = image_bytes(value, index)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidImageError(
            f"image {index}: refused, its header declares more than {MAX_IMAGE_PIXELS:,} pixels."
        ) from None
    except (PIL.UnidentifiedImageError, OSError, ValueError):
        raise InvalidImageError(
            f"image {index}: the bytes are not a recognizable image; send a PNG or JPEG file."
        ) from None
    if image.format not in SUPPORTED_FORMATS:
        raise InvalidImageError(
            f"image {index}: {image.format} is not supported; send PNG or JPEG."
        )
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise InvalidImageError(
            f"image {index}: {width}x{height} is {width * height:,} pixels, over the limit of "
            f"{MAX_IMAGE_PIXELS:,}; downscale it before sending (the model sees 32x32)."
        )
    try:
        image.load()
    except (OSError, ValueError, SyntaxError):
        raise InvalidImageError(
            f"image {index}: the {image.format} data is truncated or corrupt."
        ) from None
    return to_rgb_32(image)


@torch.no_grad()
def predict_probabilities(
    model: torch.nn.Module,
    images: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    tta: bool = False,
    batch_size: int = 512,
) -> np.ndarray:
    """Softmax probabilities for uint8 NHWC images; `tta` averages with the mirrored image."""
    model.eval()
    device = next(model.parameters()).device
    outputs = []
    for start in range(0, len(images), batch_size):
        chunk = torch.from_numpy(images[start : start + batch_size]).permute(0, 3, 1, 2)
        batch = normalize(chunk.to(device), mean, std)
        probabilities = model(batch).float().softmax(dim=1)
        if tta:
            probabilities = (probabilities + model(batch.flip(-1)).float().softmax(dim=1)) / 2
        outputs.append(probabilities.cpu().numpy())
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


def keep_freed_memory() -> None:
    """Let glibc keep freed tensor memory for reuse instead of handing it back to the OS.

    By default each request's activations (256 KB and up) get fresh mmap'd pages, so every request
    pays hundreds of page faults (measured: ~700 for one image through ResNet-18, 1.5-5 ms on a
    2-core VM). The effect is process-wide and only on glibc; elsewhere this does nothing.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20)
    libc.mallopt(M_TRIM_THRESHOLD, 2**30)


@dataclass
class PendingRequest:
    images: np.ndarray
    tta: bool
    answer: Future


class MicroBatcher:
    """The one thread that runs every torch call of a served model, batching waiting requests.

    Requests that arrive while a forward pass runs wait in a queue; when the thread is free it takes
    them all (up to `max_images`) and runs them as one pass, then hands each caller its own rows.
    It waits (at most `wait_s`) only for callers already inside `predict` and still decoding, so a
    lone request never waits. On 2 cores one ResNet-18 pass over 16 images costs far less than 16
    passes over one.
    """

    def __init__(
        self,
        build: Callable[[], Any],
        forward: Callable[[np.ndarray, bool], np.ndarray],
        max_images: int,
        wait_s: float,
    ) -> None:
        """Start the thread, which first runs `build` (loading the network) and keeps its result
        as `model`; a failure to build is raised here."""
        self.forward = forward
        self.max_images = max(1, int(max_images))
        self.wait_s = max(0.0, float(wait_s))
        self.pending: queue.SimpleQueue[PendingRequest] = queue.SimpleQueue()
        self.callers = 0
        self.callers_lock = threading.Lock()
        built: Future = Future()
        threading.Thread(
            target=self.serve_forever, args=(build, built), name="torch", daemon=True
        ).start()
        self.model = built.result()

    @contextmanager
    def caller(self) -> Iterator[None]:
        """Mark a request that will call `predict` soon (while it decodes), so a batch waits for it."""
        with self.callers_lock:
            self.callers += 1
        try:
            yield
        finally:
            with self.callers_lock:
                self.callers -= 1

    def predict(self, images: np.ndarray, tta: bool) -> np.ndarray:
        answer: Future = Future()
        self.pending.put(PendingRequest(images, tta, answer))
        return answer.result()

    def serve_forever(self, build: Callable[[], Any], built: Future) -> None:
        try:
            built.set_result(build())
        except Exception as error:
            built.set_exception(error)
            return
        while True:
            batch = self.collect(self.pending.get())
            for tta in (False, True):
                group = [request for request in batch if request.tta == tta]
                if group:
                    self.run_together(group, tta)

    def collect(self, first: PendingRequest) -> list[PendingRequest]:
        batch = [first]
        count = len(first.images)
        deadline = time.monotonic() + self.wait_s
        while count < self.max_images:
            still_decoding = self.callers > len(batch)
            timeout = deadline - time.monotonic() if still_decoding else 0.0
            try:
                item = (
                    self.pending.get(timeout=timeout) if timeout > 0 else self.pending.get_nowait()
                )
            except queue.Empty:
                break
            batch.append(item)
            count += len(item.images)
        return batch

    def run_together(self, group: list[PendingRequest], tta: bool) -> None:
        try:
            probabilities = self.forward(np.concatenate([r.images for r in group]), tta)
        except Exception as error:  # every caller of the batch gets the error, not just one
            for request in group:
                request.answer.set_exception(error)
            return
        start = 0
        for request in group:
            request.answer.set_result(probabilities[start : start + len(request.images)])
            start += len(request.images)


class CifarClassifier(mlflow.pyfunc.PythonModel):
    """Classifies encoded images with the logged network, normalizing exactly as in training."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.meta = json.loads(Path(context.artifacts["meta"]).read_text())
        self.class_names = list(self.meta["class_names"])
        # Every torch call of this model, loading included, runs on this one thread. The scoring
        # server calls predict from a pool of threads; each calling thread gets its own OpenMP team,
        # and with more OpenMP threads than cores libgomp stops spinning between parallel regions:
        # ~190 sleeps and wake-ups per ResNet-18 forward, most of a 9-12 ms overhead per request on
        # 2 cores (benchmarks/RESULTS.md, Serving).
        settings = MICRO_BATCH_DEFAULTS | dict(context.model_config or {})
        self.torch_thread = MicroBatcher(
            lambda: self.build_network(context),
            self.forward,
            settings["max_batch_images"],
            float(settings["batch_wait_ms"]) / 1000,
        )
        self.model = self.torch_thread.model
        keep_freed_memory()

    def build_network(self, context: mlflow.pyfunc.PythonModelContext) -> torch.nn.Module:
        model = build_model(
            self.meta["architecture"], self.meta["options"], num_classes=len(self.class_names)
        )
        state = torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        return model.eval()

    def forward(self, images: np.ndarray, tta: bool) -> np.ndarray:
        return predict_probabilities(self.model, images, self.meta["mean"], self.meta["std"], tta)

    # MLflow infers no signature from a DataFrame hint; the logged signature stays the explicit one.
    def predict(
        self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if IMAGE_COLUMN not in frame.columns:
            raise InvalidImageError(
                f"missing column '{IMAGE_COLUMN}' (got {list(frame.columns)}); send "
                '{"dataframe_split": {"columns": ["image"], "data": [["<base64 PNG/JPEG>"]]}}.'
            )
        if len(frame) > MAX_IMAGES_PER_REQUEST:
            raise InvalidImageError(
                f"{len(frame)} images in one request; the limit is {MAX_IMAGES_PER_REQUEST}. "
                "Split the request."
            )
        if len(frame) == 0:
            return pd.DataFrame({"label": [], "class_name": [], "probabilities": []})
        tta = bool((params or {}).get("tta", False))
        with self.torch_thread.caller():
            images = np.stack([decode_image(v, i) for i, v in enumerate(frame[IMAGE_COLUMN])])
            probabilities = self.torch_thread.predict(images, tta)
        labels = probabilities.argmax(axis=1)
        return pd.DataFrame(
            {
                "label": labels.astype(np.int64),
                "class_name": [self.class_names[i] for i in labels],
                "probabilities": [row.astype(float).tolist() for row in probabilities],
            }
        )


SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec(AnyType(), IMAGE_COLUMN)]),
    outputs=Schema(
        [
            ColSpec(DataType.long, "label"),
            ColSpec(DataType.string, "class_name"),
            ColSpec(Array(DataType.double), "probabilities"),
        ]
    ),
    params=ParamSchema([ParamSpec("tta", DataType.boolean, False)]),
)


def log_classifier(
    model: torch.nn.Module,
    architecture: str,
    options: dict[str, Any],
    mean: Sequence[float],
    std: Sequence[float],
    class_names: Sequence[str],
    example_image: np.ndarray,
) -> ModelInfo:
    """Log `model` under the artifact name `model` in the active run, with everything to serve it."""
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
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PACKAGE_ROOT / "registry" / "served_model.py"),
            artifacts={"weights": str(weights), "meta": str(meta_path)},
            code_paths=[str(PACKAGE_ROOT / "pipeline"), str(PACKAGE_ROOT / "registry")],
            signature=SIGNATURE,
            model_config=MICRO_BATCH_DEFAULTS,
            input_example=pd.DataFrame({IMAGE_COLUMN: [encode_png(example_image)]}),
            pip_requirements=[
                f"mlflow=={mlflow.__version__}",
                f"torch=={torch.__version__.split('+')[0]}",
                f"torchvision=={torchvision.__version__.split('+')[0]}",
                f"pillow=={PIL.__version__}",
                f"pandas=={pd.__version__}",
                f"numpy=={np.__version__}",
            ],
            metadata={"architecture": architecture, "class_names": list(class_names)},
        )
