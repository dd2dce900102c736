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

from registry.serving_model import MAX_IMAGES_PER_REQUEST

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
    if count > MAX_IMAGES_PER_REQUEST:
        raise Rejected(
            400,
            "too_many_images",
            f"{count} images in one request; the limit is {MAX_IMAGES_PER_REQUEST}. "
            "Split the request.",
        )
    return count


def clean_message(text: str) -> str:
    """One line of an error text, or "" when that line would show code, paths or reprs."""
    text = MLFLOW_PREDICT_PREFIX.sub("", text).strip()
    line = text.splitlines()[0].strip() if text else ""
    if not line or LEAKS.search(line):
        return ""
    return line if len(line) <= MAX_MESSAGE_CHARS else line[: MAX_MESSAGE_CHARS - 1] + "…"


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


async def answer(
    send: Send,
    status: int,
    payload: dict | bytes,
    request_id: str,
    content_type: str = "",
    close: bool = False,
) -> None:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    headers = [
        (b"content-type", (content_type or "application/json").encode()),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", request_id.encode()),
    ]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def error_body(status: int, message: str, request_id: str) -> dict[str, str]:
    return {
        "error_code": ERROR_CODES.get(status, "BAD_REQUEST" if status < 500 else "INTERNAL_ERROR"),
        "message": message,
        "request_id": request_id,
    }


class Gateway:
    """An ASGI app: the checks above, then MLflow's scoring app with the body already read."""

    def __init__(self, inner: ASGIApp, settings: GatewaySettings, metrics: ServerMetrics) -> None:
        self.inner = inner
        self.settings = settings
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.inner(scope, receive, send)
            return
        request_id = uuid.uuid4().hex[:16]
        route = scope["path"] if scope["path"] in ROUTES else "other"
        started = time.perf_counter()
        status: dict[str, int] = {}

        async def send_counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.handle(scope, receive, send_counted, request_id)
        except Rejected as refusal:
            self.metrics.rejected.labels(refusal.reason).inc()
            await answer(
                send_counted,
                refusal.status,
                error_body(refusal.status, refusal.message, request_id),
                request_id,
                close=refusal.close,
            )
        except Exception:
            logger.exception("request %s failed", request_id)
            if not status:
                await answer(send_counted, 500, self.internal_error(request_id), request_id)
        finally:
            self.metrics.requests.labels(route, str(status.get("code", 500))).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)

    def internal_error(self, request_id: str) -> dict[str, str]:
        return error_body(
            500, f"internal error; the server log has the details under request id {request_id}.",
            request_id,
        )  # fmt: skip

    async def handle(self, scope: Scope, receive: Receive, send: Send, request_id: str) -> None:
        path = scope["path"]
        if path not in OPEN_ROUTES:
            self.check_token(scope)
        if path == "/metrics":
            await answer(send, 200, self.metrics.exposition(), request_id, CONTENT_TYPE_LATEST)
            return
        if path == "/invocations" and scope["method"] == "POST":
            body = await self.read_invocation(scope, receive)
            self.metrics.images.observe(parse_invocation(body, self.settings))
            receive = replay(body, receive)
        await self.inner(scope, receive, self.rewriting_errors(send, request_id))

    def check_token(self, scope: Scope) -> None:
        expected = self.settings.token
        if not expected:
            return
        given = header(scope, b"authorization")
        if given is None or not given.startswith("Bearer "):
            raise Rejected(
                401,
                "no_token",
                "this server needs 'Authorization: Bearer <token>' on each request.",
            )
        if not hmac.compare_digest(given[len("Bearer ") :].strip().encode(), expected.encode()):
            raise Rejected(403, "wrong_token", "the bearer token is not this server's token.")

    async def read_invocation(self, scope: Scope, receive: Receive) -> bytes:
        content_type = (header(scope, b"content-type") or "").lower()
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
        declared = header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            # Answered at once. uvicorn then discards what the client still sends, without keeping
            # it, so an ordinary client (one that sends the whole body before reading) sees the 413
            # instead of a reset connection; a body that would take that long is cut off instead.
            close = int(declared) > DISCARD_AT_MOST * limit
            raise Rejected(413, "body_too_large", too_large(int(declared), limit), close)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise Rejected(400, "client_gone", "the client closed the connection mid-body.")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise Rejected(413, "body_too_large", too_large(size, limit))
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def rewriting_errors(self, send: Send, request_id: str) -> Send:
        """Pass answers under 400 through; rewrite the others to one clean JSON line."""
        started: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def send_rewritten(message: Message) -> None:
            if message["type"] == "http.response.start":
                if message["status"] < 400:
                    message["headers"] = [
                        *message["headers"],
                        (b"x-request-id", request_id.encode()),
                    ]
                    await send(message)
                else:
                    started.update(message)
                return
            if not started:
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            status, body = started["status"], b"".join(chunks)
            await answer(send, *self.rewritten(status, body, request_id), request_id)

        return send_rewritten

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
            return 500, self.internal_error(request_id)
        if not message:
            message = f"the request could not be processed (request id {request_id})."
        code = original.get("error_code")
        result = error_body(status, message, request_id)
        if isinstance(code, str) and code.isupper():
            result["error_code"] = code
        return status, result


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
