"""What each uvicorn worker of `serve` builds: the logged model in MLflow's scoring app, behind the
gateway (registry/gateway.py).

uvicorn starts its workers by import string, so the `serve` command hands each one its settings
through the environment: one typed `WorkerSettings` (pydantic-settings, prefix `CIFAR10_SERVE_`),
written by the parent with `environment()` and read back, validated, in every worker.
"""

from __future__ import annotations

import ctypes
import json
import logging
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.applications import Starlette

# mallopt parameters from glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
ENV_PREFIX = "CIFAR10_SERVE_"
TOKEN_ENV = ENV_PREFIX + "TOKEN"


class WorkerSettings(BaseSettings):
    """Everything a worker needs, decided once by the `serve` command."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="ignore", frozen=True, protected_namespaces=()
    )
    model_path: str
    card: dict[str, Any]
    timeout_s: float = Field(gt=0)
    max_body_bytes: int = Field(gt=0)
    max_json_depth: int = Field(ge=1)
    max_inflight: int = Field(ge=1)
    pyfunc_config: dict[str, Any] = {}  # the pyfunc's model_config: batching, drift window
    inference_log: dict[str, Any] | None = None
    token: str | None = None  # never written by `environment()`: read from CIFAR10_SERVE_TOKEN

    def environment(self) -> dict[str, str]:
        """The variables that hand these settings to a worker (the token stays where it is)."""
        values = self.model_dump(exclude={"token"})
        return {
            ENV_PREFIX + name.upper(): value if isinstance(value, str) else json.dumps(value)
            for name, value in values.items()
        }


def keep_freed_memory() -> None:
    """Let glibc keep freed tensor memory for reuse instead of handing it back to the OS.

    By default each request's activations (256 KB and up) get fresh mmap'd pages, so every request
    pays hundreds of page faults (measured: ~700 for one image through ResNet-18, 1.5-5 ms on a
    2-core VM). The effect is process-wide, so only the server's own worker processes ask for it;
    elsewhere than glibc this does nothing.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20)
    libc.mallopt(M_TRIM_THRESHOLD, 2**30)


def app_from_environment() -> Starlette:
    """What each uvicorn worker builds (`factory=True`): the model loaded once, its metrics, drift
    window and inference log, and the gateway around MLflow's app."""
    from mlflow.pyfunc import load_model, scoring_server

    from registry.gateway import ServedModel, build_gateway
    from registry.guards import GuardSettings
    from registry.metrics import ServerMetrics, observe_model

    keep_freed_memory()
    settings = WorkerSettings()
    model = load_model(settings.model_path, model_config=settings.pyfunc_config)
    card = settings.card
    metrics = ServerMetrics()
    observe_model(model, metrics, card["class_names"])
    classifier = model.unwrap_python_model()
    if (drift := getattr(classifier, "drift", None)) is not None:
        metrics.watch_drift(drift)
    log = None
    if settings.inference_log:
        log = start_inference_log(classifier, settings.inference_log, card, metrics)
    served = ServedModel(
        model, card["name"], card["version"], card["class_names"], card, settings.timeout_s
    )
    guards = GuardSettings(
        max_body_bytes=settings.max_body_bytes,
        max_json_depth=settings.max_json_depth,
        max_inflight=settings.max_inflight,
        token=settings.token or None,
    )
    on_shutdown = log.close if log else None
    return build_gateway(scoring_server.init(model), guards, metrics, served, on_shutdown)


def start_inference_log(classifier: Any, settings: dict, card: dict, metrics: Any) -> Any:
    """The inference log, attached to the loaded classifier (None for a model logged before the
    classifier had observers)."""
    from registry.inference_log import InferenceLog, InferenceLogSettings
    from registry.refusals import request_id_of_row

    if not hasattr(classifier, "observers"):
        logging.getLogger(__name__).warning(
            "inference log off: this model was logged before the log existed; train it again "
            "(mlflow run . -e train) to log its answers."
        )
        return None
    log = InferenceLog(
        InferenceLogSettings(**settings),
        card["name"],
        str(card["version"]),
        request_id_of_row,
        metrics.inference_log,
    )
    classifier.observers.append(log.observe)
    return log
