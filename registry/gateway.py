"""The hardened HTTP layer around MLflow's own scoring app, for a port the open network can reach.

`mlflow models serve` runs `mlflow.pyfunc.scoring_server` under uvicorn. That app keeps MLflow's
protocol (`dataframe_split`, `dataframe_records`, `instances`, `inputs`, `params`; `/ping`,
`/health`, `/version`, `/invocations`), and this layer keeps it too: it wraps the same app and adds
what a hostile client needs, before MLflow's parser sees a byte:

- a body cap (413, answered from Content-Length without reading the body);
- JSON only on /invocations (415), parsed here with a nesting-depth limit; every malformed body is a
  400 with a one-line message (MLflow's parser overflows on deep nesting and echoes the input back);
- no stack trace, file path or exception repr in any answer: errors are rewritten to
  `{"error_code", "message", "request_id"}`, an unexpected one is a 500 whose trace goes to the
  server log under the request id;
- `Authorization: Bearer <token>` on everything but /ping and /health when a token is set;
- Prometheus metrics on /metrics;
- beside MLflow's routes, `ModelRoutes`: the Open Inference Protocol v2 (`/v2/...`), KServe's v1
  `:predict` / `:explain` (registry/protocols.py translates them) and the page at `/` with its model
  card, all calling the same pyfunc, under the same token, caps and clean errors (`{"error": ...}`
  on the protocol routes, as their clients expect).

Each guard is one small ASGI middleware (an `HttpGuard` and its `handle`) on Starlette's request
and response types; `build_gateway` stacks them. A guard refuses by raising `Rejected`, which the outermost one (`Observed`) answers.
Adding a guard (a rate limit, say) is one class here, one line in `build_gateway` and its test.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import io
import json
import logging
import os
import random
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pandas as pd
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response

from pipeline.model.classifier import IMAGE_COLUMN, check_image_count
from pipeline.model.decoding import InvalidImageError
from pipeline.model.drift import MIN_WINDOW, DriftWindow
from registry import protocols
from registry.batching import ROW_REQUEST_IDS, ImageError, RequestBatcher
from registry.inference_log import LogCounters
from registry.protocols import ProtocolError, Records

Scope = MutableMapping[str, Any]
# The id of the request being answered, for what the model's predict reaches (the inference log):
# the threads MLflow and ModelRoutes predict on copy the request's context.
REQUEST_ID: ContextVar[str] = ContextVar("request_id", default="")
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

logger = logging.getLogger("cifar10.serve")

PAGE_DIR = Path(__file__).with_name("page")
# Open: the health checks (load balancers and Kubernetes probes carry no token) and the page's own
# static files, which hold no model data (the page asks for everything else with the token).
OPEN_ROUTES = ("/ping", "/health", "/v2/health/live", "/v2/health/ready", "/", "/page")
ROUTES = (*OPEN_ROUTES, "/version", "/invocations", "/metrics", "/model-card", "/v2")
V2_MODEL_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?(/ready|/infer)?$")
V1_MODEL_PATH = re.compile(r"^/v1/models/([^/:]+)(:predict|:explain)?$")
PAGE_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
        "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}
INPUT_KEYS = ("dataframe_split", "dataframe_records", "instances", "inputs")
MAX_MESSAGE_CHARS = 300
# An answer whose top class has less than this probability counts as low-confidence on /metrics.
LOW_CONFIDENCE = 0.5
IMAGE_COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
CONFIDENCE_BUCKETS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
# A refused body is read on and dropped after its answer ("lingering close", as nginx does), so a
# client that sends the whole body before it reads gets the answer, not a reset: for at most this
# long and this many times the body cap.
LINGER_SECONDS = 1.0
RETRY_AFTER_S = 1  # what an overloaded server asks a refused client to wait
LINGER_AT_MOST = 8
# What an answer must never show: traces, source locations, object reprs, absolute paths.
LEAKS = re.compile(r'Traceback|File "|\.py\b|site-packages|object at 0x|(?:/[\w.-]+){2,}')
# MLflow wraps a model's error as "Failed to predict data '<the whole DataFrame>'. \nError: <it>"
# (and a schema error as "Failed to enforce schema of data ...Error: <it>").
MLFLOW_PREDICT_PREFIX = re.compile(
    r"^(?:Failed to (?:predict|enforce schema of) data .*?Error: )+", re.DOTALL
)
STRING_LITERAL = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
ERROR_CODES = {
    400: "BAD_REQUEST",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    413: "REQUEST_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
    422: "BAD_REQUEST",
    500: "INTERNAL_ERROR",
    503: "UNAVAILABLE",
    504: "TIMEOUT",
}


@dataclass(frozen=True)
class GatewaySettings:
    max_body_bytes: int = 16 * 2**20
    max_json_depth: int = 32
    token: str | None = None
    max_inflight: int = 64


@dataclass
class ServedModel:
    """What `ModelRoutes` answers with: the loaded pyfunc, the name and version clients address
    it by, and the model card the page shows."""

    model: Any
    name: str
    version: str
    class_names: list[str]
    card: dict[str, Any] = field(default_factory=dict)
    timeout_s: float = 60.0


def route_of(path: str) -> str:
    """A low-cardinality label for the metrics: the route's template, never a model name."""
    if path in ROUTES:
        return path
    if path.startswith("/page/"):
        return "/page"
    if match := V2_MODEL_PATH.match(path):
        versions = "/versions/{version}" if match.group(2) else ""
        return f"/v2/models/{{name}}{versions}{match.group(3) or ''}"
    if match := V1_MODEL_PATH.match(path):
        return f"/v1/models/{{name}}{match.group(2) or ''}"
    return "other"


def is_protocol_route(path: str) -> bool:
    """The v1/v2 routes answer errors as `{"error": ...}`, the shape their clients read."""
    return path.startswith(("/v1/", "/v2/")) or path == "/v2"


def body_route(path: str) -> str | None:
    """Which kind of body a POST to `path` carries: "mlflow", "v2", "v1" or None (no body taken)."""
    if path == "/invocations":
        return "mlflow"
    if (match := V2_MODEL_PATH.match(path)) and match.group(3) == "/infer":
        return "v2"
    if (match := V1_MODEL_PATH.match(path)) and match.group(2):
        return "v1"
    return None


class Rejected(Exception):
    """A request refused by the layer: its status, a reason label for the metrics, a message, and
    whether the client may still be sending a body the answer should linger for."""

    def __init__(
        self,
        status: int,
        reason: str,
        message: str,
        linger: bool = False,
        error_code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.reason, self.message, self.linger = status, reason, message, linger
        self.error_code = error_code


class ServerMetrics:
    """The counters behind /metrics. With several uvicorn workers (PROMETHEUS_MULTIPROC_DIR set),
    every worker writes its values to that folder and /metrics adds them up."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        multiprocess = "PROMETHEUS_MULTIPROC_DIR" in os.environ
        own = None if multiprocess else self.registry
        if multiprocess:
            from prometheus_client.multiprocess import MultiProcessCollector

            MultiProcessCollector(self.registry)
        self.requests = Counter(
            "cifar10_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=own,
        )
        self.latency = Histogram(
            "cifar10_request_seconds",
            "Time from the request's arrival to the end of its answer",
            ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=own,
        )
        self.images = Histogram(
            "cifar10_images_per_request",
            "Images in each accepted /invocations request",
            buckets=IMAGE_COUNT_BUCKETS,
            registry=own,
        )
        self.call_images = Histogram(
            "cifar10_model_call_images",
            "Images in each call of the served model (requests that wait together share one)",
            buckets=IMAGE_COUNT_BUCKETS,
            registry=own,
        )
        self.rejected = Counter(
            "cifar10_rejected_requests", "Requests refused by the layer", ["reason"], registry=own
        )
        self.predictions = Counter(
            "cifar10_predictions", "Images answered, by predicted class", ["class"], registry=own
        )
        self.confidence = Histogram(
            "cifar10_prediction_confidence",
            "Probability of the predicted class, per answered image",
            buckets=CONFIDENCE_BUCKETS,
            registry=own,
        )
        self.low_confidence = Counter(
            "cifar10_low_confidence_predictions",
            f"Answered images whose predicted class has a probability below {LOW_CONFIDENCE}",
            registry=own,
        )
        self.inflight = Gauge(
            "cifar10_inflight_requests",
            "Scoring requests being answered now",
            registry=own,
            multiprocess_mode="livesum",
        )
        self.inference_log = LogCounters(
            Counter(
                "cifar10_inference_log_rows", "Rows written to the inference log", registry=own
            ),
            Counter(
                "cifar10_inference_log_dropped_rows",
                "Inference-log rows not written, by reason (queue_full, write_failed)",
                ["reason"],
                registry=own,
            ),
            Counter(
                "cifar10_inference_log_removed_files",
                "Oldest inference-log files removed to keep the folder under its cap",
                registry=own,
            ),
        )

    def watch_drift(self, window: DriftWindow) -> None:
        """Test the model's window of recent images against its training reference at each scrape."""
        self.registry.register(DriftCollector(window))

    def observe_answers(self, result: Any, class_names: list[str]) -> None:
        """What the model answered, per scored image (a row that failed to decode has label -1)."""
        for label, probabilities in zip(result["label"], result["probabilities"], strict=True):
            if label < 0:
                continue
            top = float(np.max(probabilities))
            self.predictions.labels(class_names[label]).inc()
            self.confidence.observe(top)
            if top < LOW_CONFIDENCE:
                self.low_confidence.inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class DriftCollector:
    """Drift gauges computed when /metrics is read (a 200-image test takes ~10 ms, so requests
    never wait for it). With several workers each tests its own window and a scrape sees one."""

    def __init__(self, window: DriftWindow) -> None:
        self.window = window

    def collect(self):
        window = self.window
        reference = InfoMetricFamily(
            "cifar10_drift_reference", "The training reference recent images are compared with"
        )
        reference.add_metric([], {"digest": window.reference.digest, "window": str(window.size),
                                  "alpha": f"{window.alpha:g}"})  # fmt: skip
        yield reference
        yield GaugeMetricFamily(
            "cifar10_drift_window_images", "Recent images in the drift window", value=len(window)
        )
        if len(window) < MIN_WINDOW:
            return
        result = window.test()
        p_values = GaugeMetricFamily(
            "cifar10_drift_p_value", "KS test p-value per image statistic", labels=["statistic"]
        )
        distances = GaugeMetricFamily(
            "cifar10_drift_ks_statistic", "KS distance per image statistic", labels=["statistic"]
        )
        for name in result.p_values:
            p_values.add_metric([name], result.p_values[name])
            distances.add_metric([name], result.statistics[name])
        yield p_values
        yield distances
        yield GaugeMetricFamily(
            "cifar10_drift_combined_p_value",
            "Bonferroni-combined p-value of the statistics; drift below alpha",
            value=result.p_value,
        )
        yield GaugeMetricFamily(
            "cifar10_drift_detected",
            "1 while recent images differ from the training reference at alpha",
            value=float(result.drift),
        )


def json_depth(body: bytes) -> int:
    """Deepest nesting of arrays/objects, counted without recursion (strings removed first)."""
    structure = np.frombuffer(STRING_LITERAL.sub(b'""', body), dtype=np.uint8)
    steps = np.zeros(len(structure), dtype=np.int32)
    steps[(structure == ord("[")) | (structure == ord("{"))] = 1
    steps[(structure == ord("]")) | (structure == ord("}"))] = -1
    return int(np.cumsum(steps).max(initial=0))


def images_in(payload: dict[str, Any]) -> int:
    """How many rows a request carries, whichever of MLflow's input keys it uses."""
    data = payload[next(key for key in INPUT_KEYS if key in payload)]
    if isinstance(data, dict) and "data" in data:
        data = data["data"]
    if isinstance(data, dict):
        return max((len(v) for v in data.values() if isinstance(v, list)), default=1)
    return len(data) if isinstance(data, list) else 1


def check_depth(body: bytes, settings: GatewaySettings) -> None:
    """Refuse JSON nested deeper than the limit; a body with fewer brackets than that (any body
    of base64 images) cannot be, and is not scanned."""
    brackets = body.count(b"[") + body.count(b"{")
    if brackets > settings.max_json_depth and json_depth(body) > settings.max_json_depth:
        raise Rejected(
            400,
            "json_too_deep",
            f"the JSON is nested deeper than {settings.max_json_depth} levels; "
            'send {"dataframe_split": {"columns": ["image"], "data": [["<base64>"], ...]}}.',
        )


def parse_invocation(body: bytes, settings: GatewaySettings) -> tuple[int, dict[str, Any]]:
    """Check an /invocations body the way MLflow will read it; its number of images and the
    parsed JSON."""
    check_depth(body, settings)
    try:
        payload = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise Rejected(400, "malformed_json", "the body is not UTF-8 text.") from None
    except json.JSONDecodeError as error:
        raise Rejected(400, "malformed_json", f"the body is not valid JSON: {error}.") from None
    keys = [key for key in INPUT_KEYS if isinstance(payload, dict) and key in payload]
    if len(keys) != 1:
        raise Rejected(
            400,
            "bad_input_format",
            f"the JSON must be an object with exactly one of {', '.join(INPUT_KEYS)}; "
            'e.g. {"dataframe_split": {"columns": ["image"], "data": [["<base64>"]]}}.',
        )
    count = images_in(payload)
    try:
        check_image_count(count)
    except InvalidImageError as error:
        raise Rejected(400, "too_many_images", str(error)) from None
    return count, payload


def plain_invocation(payload: dict[str, Any] | None) -> tuple[list[str], dict] | None:
    """The images and params of an /invocations body in the form this project's clients send
    (`dataframe_split` of one `image` column of base64 text, `params` without `explain`), or None
    for any other form, which MLflow's app reads as it always has."""
    if not payload or set(payload) - {"dataframe_split", "params"}:
        return None
    split, params = payload.get("dataframe_split"), payload.get("params", {})
    if not isinstance(split, dict) or set(split) != {"columns", "data"}:
        return None
    rows = split["data"]
    if split["columns"] != [IMAGE_COLUMN] or not isinstance(rows, list) or not rows:
        return None
    if not all(isinstance(row, list) and len(row) == 1 and isinstance(row[0], str) for row in rows):
        return None
    if not isinstance(params, dict) or params.get("explain"):
        return None
    return [row[0] for row in rows], params


def clean_message(text: str) -> str:
    """One line of an error text, or "" when that line would show code, paths or reprs."""
    text = MLFLOW_PREDICT_PREFIX.sub("", text).strip()
    line = text.splitlines()[0].strip() if text else ""
    if not line or LEAKS.search(line):
        return ""
    return line if len(line) <= MAX_MESSAGE_CHARS else line[: MAX_MESSAGE_CHARS - 1] + "…"


def error_body(status: int, message: str, request_id: str) -> dict[str, str]:
    return {
        "error_code": ERROR_CODES.get(status, "BAD_REQUEST" if status < 500 else "INTERNAL_ERROR"),
        "message": message,
        "request_id": request_id,
    }


def request_id_of(scope: Scope) -> str:
    return scope["state"]["request_id"]


def request_id_of_row(row: int) -> str:
    """The id of the request that sent row `row` of the call being scored: a batched call knows
    each row's, any other call is one request's."""
    ids = ROW_REQUEST_IDS.get()
    return ids[row] if row < len(ids) else REQUEST_ID.get()


def internal_error(request_id: str) -> dict[str, str]:
    return error_body(
        500, f"internal error; the server log has the details under request id {request_id}.",
        request_id,
    )  # fmt: skip


class HttpGuard:
    """One guard around `app`: `handle` sees each HTTP request; anything else passes through."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.handle(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        raise NotImplementedError


class Observed(HttpGuard):
    """Outermost: gives each request an id (answered as `x-request-id`), counts it and its time,
    answers a `Rejected` as one JSON line, and turns anything unexpected into a 500 whose trace goes
    to the log under the request id."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, linger_bytes: int) -> None:
        super().__init__(app, metrics)
        self.linger_bytes = linger_bytes

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id = f"{random.getrandbits(64):016x}"  # unique enough to find in a log
        scope.setdefault("state", {})["request_id"] = request_id
        REQUEST_ID.set(request_id)
        route = route_of(scope["path"])
        protocol = is_protocol_route(scope["path"])
        started = time.perf_counter()
        status: dict[str, int] = {}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Rejected as refusal:
            self.metrics.rejected.labels(refusal.reason).inc()
            headers = {"www-authenticate": "Bearer"} if refusal.status == 401 else {}
            if refusal.status == 503:
                headers["retry-after"] = str(RETRY_AFTER_S)
            if refusal.linger:
                headers["connection"] = "close"
            body = error_body(refusal.status, refusal.message, request_id)
            if refusal.error_code:
                body["error_code"] = refusal.error_code
            if protocol:
                body = {"error": refusal.message}
            response = JSONResponse(body, refusal.status, headers)
            if refusal.linger:
                await answer_then_linger(response, receive, send_with_id, self.linger_bytes)
            else:
                await response(scope, receive, send_with_id)
        except Exception:
            logger.exception("request %s failed", request_id)
            if not status:
                body = internal_error(request_id)
                if protocol:
                    body = {"error": body["message"]}
                await JSONResponse(body, 500)(scope, receive, send_with_id)
        finally:
            self.metrics.requests.labels(route, str(status.get("code", 500))).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)


class BearerToken(HttpGuard):
    """`Authorization: Bearer <token>` on everything but /ping and /health, when a token is set."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, token: str | None) -> None:
        super().__init__(app, metrics)
        self.token = token

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        is_open = path in OPEN_ROUTES or path.startswith("/page/")
        if self.token and not is_open:
            given = Request(scope).headers.get("authorization")
            if given is None or not given.startswith("Bearer "):
                raise Rejected(
                    401,
                    "no_token",
                    "this server needs 'Authorization: Bearer <token>' on each request.",
                )
            if not hmac.compare_digest(
                given[len("Bearer ") :].strip().encode(), self.token.encode()
            ):
                raise Rejected(403, "wrong_token", "the bearer token is not this server's token.")
        await self.app(scope, receive, send)


class MetricsRoute(HttpGuard):
    """Prometheus exposition on /metrics (behind the token, like everything but the health checks)."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] == "/metrics":
            response = Response(self.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class RequestBody(HttpGuard):
    """Every POST that carries a body (/invocations, v2 infer, v1 predict/explain): the content
    type it may have (415), a body cap counted from the headers and as chunks arrive (413), the
    JSON depth limit; /invocations also gets `parse_invocation`'s checks. The route behind gets
    the body already read."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, settings: GatewaySettings) -> None:
        super().__init__(app, metrics)
        self.settings = settings

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = body_route(scope["path"]) if scope["method"] == "POST" else None
        if kind:
            request = Request(scope, receive)
            self.check_content_type(request, binary_allowed=kind == "v2")
            body = await self.read(request)
            if kind == "mlflow":
                count, scope["state"]["invocation"] = parse_invocation(body, self.settings)
                self.metrics.images.observe(count)
            else:
                header = request.headers.get(protocols.BINARY_HEADER)
                json_part = body[: int(header)] if header and header.isdigit() else body
                check_depth(json_part, self.settings)
            receive = replay(body, receive)
        await self.app(scope, receive, send)

    def check_content_type(self, request: Request, binary_allowed: bool) -> None:
        content_type = request.headers.get("content-type", "").lower()
        mime, _, parameters = content_type.partition(";")
        charset = parameters.replace(" ", "").removeprefix("charset=")
        if binary_allowed and mime.strip() in ("", "application/octet-stream"):
            return
        if mime.strip() != "application/json" or (parameters and charset != "utf-8"):
            raise Rejected(
                415,
                "not_json",
                f"send 'Content-Type: application/json' (got '{content_type[:60]}'); this server "
                "takes JSON only"
                f"{' (or the binary tensor extension, application/octet-stream)' if binary_allowed else ''}.",
            )

    async def read(self, request: Request) -> bytes:
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            # Answered at once, without reading the body; Observed then lingers for the rest.
            raise Rejected(413, "body_too_large", too_large(int(declared), limit), linger=True)
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise Rejected(413, "body_too_large", too_large(size, limit), linger=True)
                chunks.append(chunk)
        except ClientDisconnect:
            raise Rejected(
                400, "client_gone", "the client closed the connection mid-body."
            ) from None
        return b"".join(chunks)


class LoadLimit(HttpGuard):
    """At most `max_inflight` scoring requests in this worker at once (their bodies read and
    checked); one more is refused at once with 503 and `Retry-After`, so that over its capacity the
    server answers fast refusals instead of growing a queue that ends in timeouts."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, max_inflight: int) -> None:
        super().__init__(app, metrics)
        self.max_inflight, self.inflight = max_inflight, 0

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] != "POST" or body_route(scope["path"]) is None:
            await self.app(scope, receive, send)
            return
        if self.inflight >= self.max_inflight:
            raise Rejected(
                503, "overloaded", f"the server is scoring {self.inflight} requests, its limit; "
                f"retry in {RETRY_AFTER_S} s (Retry-After), or add replicas."
            )  # fmt: skip
        self.inflight += 1  # one event loop per worker: no lock needed
        self.metrics.inflight.inc()
        try:
            await self.app(scope, receive, send)
        finally:
            self.inflight -= 1
            self.metrics.inflight.dec()


class CleanErrors(HttpGuard):
    """Innermost: MLflow's answers under 400 pass; the others become one clean JSON line (no trace,
    path or repr; an internal error is a 500 whose original goes to the log)."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id = request_id_of(scope)
        started: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def send_clean(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] >= 400:
                started.update(message)
                return
            if not started:
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                status, answer = self.rewritten(started["status"], b"".join(chunks), request_id)
                await JSONResponse(answer, status)(scope, receive, send)

        await self.app(scope, receive, send_clean)

    def rewritten(self, status: int, body: bytes, request_id: str) -> tuple[int, dict]:
        text = body.decode("utf-8", errors="replace")
        try:
            original = json.loads(text)
        except json.JSONDecodeError:
            original = {"message": text}
        if not isinstance(original, dict):
            original = {"message": text}
        message = clean_message(str(original.get("message") or original.get("detail") or ""))
        internal = status >= 500 and status != 504  # MLflow's timeout answer stays a 504
        if internal or not message:
            logger.error("request %s answered %s: %s", request_id, status, text[:4000])
        if internal:
            self.metrics.rejected.labels("internal_error").inc()
            return 500, internal_error(request_id)
        if not message:
            message = f"the request could not be processed (request id {request_id})."
        code = original.get("error_code")
        result = error_body(status, message, request_id)
        if isinstance(code, str) and code.isupper():
            result["error_code"] = code
        return status, result


class ModelRoutes(HttpGuard):
    """The routes this project adds beside MLflow's: v2, KServe v1, the page and its model card.
    Each calls the served pyfunc's own `predict` on a worker thread (as MLflow's app does), so
    every protocol gives the same probabilities; anything else goes on to MLflow's app."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, served: ServedModel) -> None:
        super().__init__(app, metrics)
        self.served = served
        self.batcher = RequestBatcher(
            lambda frame, params: self.served.model.predict(frame, params=params).to_dict(
                orient="records"
            )
        )
        self.page_files = {f"/page/{p.name}": p for p in PAGE_DIR.iterdir() if p.is_file()}

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        path, method = scope["path"], scope["method"]
        try:
            answer = await self.answer(path, method, Request(scope, receive))
        except ProtocolError as error:
            raise Rejected(error.status, error.reason, error.message) from None
        if answer is None:
            await self.app(scope, receive, send)
        else:
            await answer(scope, receive, send)

    async def answer(self, path: str, method: str, request: Request) -> Response | None:
        served = self.served
        if path == "/invocations":
            return await self.invocation(request) if method == "POST" else None
        if path == "/" or path in self.page_files:
            allow(method, "GET")
            page = self.page_files.get(path, PAGE_DIR / "index.html")
            return FileResponse(page, headers=PAGE_HEADERS)
        if path == "/model-card":
            allow(method, "GET")
            return JSONResponse(served.card)
        if path == "/v2":
            allow(method, "GET")
            return JSONResponse({"name": "cifar10-serve", "version": served.version,
                                 "extensions": ["binary_tensor_data"]})  # fmt: skip
        if path in ("/v2/health/live", "/v2/health/ready"):
            allow(method, "GET")
            return JSONResponse({path.rsplit("/", 1)[1]: True})
        if match := V2_MODEL_PATH.match(path):
            self.check_model(match.group(1), match.group(2))
            if match.group(3) == "/infer":
                allow(method, "POST")
                return await self.v2_infer(request)
            allow(method, "GET")
            if match.group(3) == "/ready":
                return JSONResponse({"name": served.name, "ready": True})
            return JSONResponse(
                protocols.v2_model_metadata(served.name, served.version, served.class_names)
            )
        if match := V1_MODEL_PATH.match(path):
            self.check_model(match.group(1), None)
            if not match.group(2):
                allow(method, "GET")
                return JSONResponse({"name": served.name, "ready": True})
            allow(method, "POST")
            images, params = protocols.parse_v1(await request.body())
            explain = match.group(2) == ":explain"
            result = await self.predict(images, params | {"explain": explain}, request)
            answer = {"predictions": protocols.v1_predictions(result)}
            if explain:
                answer["explanations"] = protocols.v1_explanations(result)
            return JSONResponse(answer)
        return None

    def check_model(self, name: str, version: str | None) -> None:
        served = self.served
        if name != served.name or (version is not None and version != served.version):
            asked = f"{name}" + (f" version {version}" if version else "")
            raise Rejected(
                404,
                "unknown_model",
                f"model {asked[:80]!r} is not served here; this server serves {served.name!r} "
                f"version {served.version} (GET /v2/models/{served.name}).",
            )

    async def v2_infer(self, request: Request) -> Response:
        parsed = protocols.parse_v2_infer(
            await request.body(), request.headers.get(protocols.BINARY_HEADER)
        )
        result = await self.predict(parsed.images, parsed.params, request)
        body, headers = protocols.v2_infer_response(
            parsed, result, self.served.name, self.served.version
        )
        media_type = headers.pop("content-type")
        return Response(body, media_type=media_type, headers=headers)

    async def invocation(self, request: Request) -> Response | None:
        """/invocations in its plain form, scored with the other requests waiting, answered as
        MLflow's app answers it (its own serializer); None: MLflow's app takes the request."""
        from mlflow.pyfunc.scoring_server import predictions_to_json

        plain = plain_invocation(request.scope["state"].get("invocation"))
        if plain is None:
            return None
        result = await self.scored(*plain, request_id_of(request.scope))
        text = io.StringIO()
        predictions_to_json(result, text)
        return Response(text.getvalue(), media_type="application/json")

    async def predict(self, images: list[Any], params: dict[str, Any], request: Request) -> Records:
        self.metrics.images.observe(len(images))
        return await self.scored(images, params, request_id_of(request.scope))

    async def scored(self, images: list[Any], params: dict[str, Any], request_id: str) -> Records:
        """The pyfunc's answer within the server's request timeout: scored together with the
        requests waiting beside it (registry/batching.py), or, for explanations, in a call of its
        own on a worker thread (as MLflow's app calls it)."""
        from mlflow.exceptions import MlflowException

        timeout = self.served.timeout_s
        try:
            if images and not params.get("explain"):  # (asyncio's timeout: anyio's costs more)
                batched = self.batcher.score(images, params, request_id)
                return await asyncio.wait_for(batched, timeout)
            frame = pd.DataFrame({IMAGE_COLUMN: images})
            work = functools.partial(self.served.model.predict, frame, params=params)
            with anyio.fail_after(timeout):
                result = await anyio.to_thread.run_sync(work, abandon_on_cancel=True)
        except (TimeoutError, asyncio.TimeoutError):  # one class from Python 3.11
            raise Rejected(
                504, "timeout", f"the model did not answer within {timeout:g} s; "
                "send fewer images per request."
            ) from None  # fmt: skip
        except (MlflowException, ImageError) as error:
            message = clean_message(str(getattr(error, "message", error)))
            code = getattr(error, "error_code", "INVALID_PARAMETER_VALUE")
            raise Rejected(
                400, "bad_image", message or "the request could not be scored.", error_code=code
            ) from None
        if params.get("explain") and "heatmap" not in result:
            raise Rejected(
                400, "cannot_explain", "this model was logged before explanations existed; "
                "train it again (`mlflow run . -e train`) to explain its answers."
            )  # fmt: skip
        return result.to_dict(orient="records")


def allow(method: str, expected: str) -> None:
    if method != expected and not (expected == "GET" and method == "HEAD"):
        raise Rejected(405, "method_not_allowed", f"use {expected} on this route.")


def observe_model(model: Any, metrics: ServerMetrics, class_names: list[str]) -> None:
    """Count every answer of this loaded model on /metrics, whichever route asked: MLflow's
    /invocations and the v2 / v1 routes all call this one object's `predict`."""
    predict = model.predict

    @functools.wraps(predict)
    def observed(data: Any, params: dict[str, Any] | None = None) -> Any:
        metrics.call_images.observe(len(data))
        result = predict(data, params=params)
        metrics.observe_answers(result, class_names)
        return result

    model.predict = observed


def build_gateway(
    inner: ASGIApp,
    settings: GatewaySettings,
    metrics: ServerMetrics,
    served: ServedModel | None = None,
) -> ASGIApp:
    """MLflow's scoring app behind the guards, outermost first; with `served`, the v2 / v1
    routes and the page beside it."""
    app = CleanErrors(inner, metrics)
    if served is not None:
        app = ModelRoutes(app, metrics, served)
    app = LoadLimit(app, metrics, settings.max_inflight)
    app = RequestBody(app, metrics, settings)
    app = MetricsRoute(app, metrics)
    app = BearerToken(app, metrics, settings.token)
    return Observed(app, metrics, LINGER_AT_MOST * settings.max_body_bytes)


async def answer_then_linger(
    response: Response, receive: Receive, send: Send, at_most: int
) -> None:
    """Send the whole answer, then read and drop what the client still sends (at most `at_most`
    bytes, for at most LINGER_SECONDS) before the connection closes. A client that sends its whole
    body before reading (urllib, `Connection: close`) thus gets the answer rather than a reset,
    one that reads while sending (requests, a slow sender) has it at once, and nothing is kept."""
    await send(
        {"type": "http.response.start", "status": response.status_code,
         "headers": response.raw_headers}
    )  # fmt: skip
    await send({"type": "http.response.body", "body": response.body, "more_body": True})
    dropped = 0
    with anyio.move_on_after(LINGER_SECONDS):
        while dropped <= at_most:
            message = await receive()
            if message["type"] != "http.request":
                break
            dropped += len(message.get("body", b""))
            if not message.get("more_body", False):
                break
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def too_large(size: int, limit: int) -> str:
    return (
        f"the body is {size:,} bytes or more, over this server's limit of {limit:,}; "
        "send fewer images per request."
    )


def replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that hands MLflow's app the body already read, then the server's own events
    (a disconnect, once there is one)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
