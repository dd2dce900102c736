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
- Prometheus metrics on /metrics.

Each guard is one small ASGI middleware (an `HttpGuard` and its `handle`) on Starlette's request
and response types; `build_gateway` stacks them. A guard refuses by raising `Rejected`, which the outermost one (`Observed`) answers.
Adding a guard (a rate limit, say) is one class here, one line in `build_gateway` and its test.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from pipeline.model.classifier import check_image_count
from pipeline.model.decoding import InvalidImageError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

logger = logging.getLogger("cifar10.serve")

OPEN_ROUTES = ("/ping", "/health")
ROUTES = (*OPEN_ROUTES, "/version", "/invocations", "/metrics")
INPUT_KEYS = ("dataframe_split", "dataframe_records", "instances", "inputs")
MAX_MESSAGE_CHARS = 300
DISCARD_AT_MOST = 8  # times the body cap: beyond that, a refused body closes the connection
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
    504: "TIMEOUT",
}


@dataclass(frozen=True)
class GatewaySettings:
    max_body_bytes: int = 16 * 2**20
    max_json_depth: int = 32
    token: str | None = None


class Rejected(Exception):
    """A request refused by the layer: its status, a reason label for the metrics, a message, and
    whether to close the connection instead of letting the server discard the rest of the body."""

    def __init__(self, status: int, reason: str, message: str, close: bool = False) -> None:
        super().__init__(message)
        self.status, self.reason, self.message, self.close = status, reason, message, close


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
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
            registry=own,
        )
        self.rejected = Counter(
            "cifar10_rejected_requests", "Requests refused by the layer", ["reason"], registry=own
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


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


def parse_invocation(body: bytes, settings: GatewaySettings) -> int:
    """Check an /invocations body the way MLflow will read it; return its number of images."""
    if json_depth(body) > settings.max_json_depth:
        raise Rejected(
            400,
            "json_too_deep",
            f"the JSON is nested deeper than {settings.max_json_depth} levels; "
            'send {"dataframe_split": {"columns": ["image"], "data": [["<base64>"], ...]}}.',
        )
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
    return count


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

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id = uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = request_id
        route = scope["path"] if scope["path"] in ROUTES else "other"
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
            if refusal.close:
                headers["connection"] = "close"
            body = error_body(refusal.status, refusal.message, request_id)
            await JSONResponse(body, refusal.status, headers)(scope, receive, send_with_id)
        except Exception:
            logger.exception("request %s failed", request_id)
            if not status:
                await JSONResponse(internal_error(request_id), 500)(scope, receive, send_with_id)
        finally:
            self.metrics.requests.labels(route, str(status.get("code", 500))).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)


class BearerToken(HttpGuard):
    """`Authorization: Bearer <token>` on everything but /ping and /health, when a token is set."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, token: str | None) -> None:
        super().__init__(app, metrics)
        self.token = token

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.token and scope["path"] not in OPEN_ROUTES:
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


class InvocationBody(HttpGuard):
    """/invocations: JSON only (415), a body cap counted from the headers and as chunks arrive
    (413), then `parse_invocation`'s checks; MLflow's app gets the body already read."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, settings: GatewaySettings) -> None:
        super().__init__(app, metrics)
        self.settings = settings

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] == "/invocations" and scope["method"] == "POST":
            body = await self.read(Request(scope, receive))
            self.metrics.images.observe(parse_invocation(body, self.settings))
            receive = replay(body, receive)
        await self.app(scope, receive, send)

    async def read(self, request: Request) -> bytes:
        content_type = request.headers.get("content-type", "").lower()
        mime, _, parameters = content_type.partition(";")
        charset = parameters.replace(" ", "").removeprefix("charset=")
        if mime.strip() != "application/json" or (parameters and charset != "utf-8"):
            raise Rejected(
                415,
                "not_json",
                f"send 'Content-Type: application/json' (got '{content_type[:60]}'); this server "
                "takes JSON only.",
            )
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            # Answered at once. uvicorn then discards what the client still sends, without keeping
            # it, so an ordinary client (one that sends the whole body before reading) sees the 413
            # instead of a reset connection; a body that would take that long is cut off instead.
            close = int(declared) > DISCARD_AT_MOST * limit
            raise Rejected(413, "body_too_large", too_large(int(declared), limit), close)
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise Rejected(413, "body_too_large", too_large(size, limit))
                chunks.append(chunk)
        except ClientDisconnect:
            raise Rejected(
                400, "client_gone", "the client closed the connection mid-body."
            ) from None
        return b"".join(chunks)


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


def build_gateway(inner: ASGIApp, settings: GatewaySettings, metrics: ServerMetrics) -> ASGIApp:
    """MLflow's scoring app behind the guards, outermost first."""
    app = CleanErrors(inner, metrics)
    app = InvocationBody(app, metrics, settings)
    app = MetricsRoute(app, metrics)
    app = BearerToken(app, metrics, settings.token)
    return Observed(app, metrics)


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
