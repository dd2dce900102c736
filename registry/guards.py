"""The guards every request passes before a route sees it, each one small ASGI middleware (an
`HttpGuard` and its `handle`) that refuses by raising `Rejected`:

- `RequestContext` (outermost): the request's id (answered as `x-request-id`), its route's
  template, its count and time on /metrics; it answers a guard's refusal, and an unexpected error
  as a 500 whose trace goes to the log under the id;
- `BearerToken`: `Authorization: Bearer <token>` on everything but the health checks and the page;
- `RequestBody`: on the routes that take a body, its content type (415), a cap counted from the
  headers before reading and as chunks arrive (413, answered then lingered for, so every client
  reads it), the JSON nesting depth (400), and /invocations' own checks;
- `LoadLimit`: at most `max_inflight` scoring requests at once (503 with Retry-After).

`CleanErrors` is not in the stack: it wraps MLflow's scoring app, whose own errors it rewrites.
Adding a guard is one class here, one `Middleware` line in registry/gateway.py and its test.
"""

from __future__ import annotations

import hmac
import json
import random
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

import anyio
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Match, Mount

from registry import protocols
from registry.bodies import check_depth, parse_invocation, too_large
from registry.metrics import ServerMetrics
from registry.refusals import (
    REQUEST_ID,
    RETRY_AFTER_S,
    Rejected,
    clean_message,
    error_body,
    failure_response,
    internal_error,
    logger,
    refusal_response,
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Open: the health checks (load balancers and Kubernetes probes carry no token) and the page's own
# static files, which hold no model data (the page asks for everything else with the token).
OPEN_ROUTES = ("/ping", "/health", "/v2/health/live", "/v2/health/ready", "/", "/page")
# The routes whose POST carries a body, by the kind of body: MLflow's, v2's (JSON or binary), v1's.
BODY_ROUTES = {
    "/invocations": "mlflow",
    "/v2/models/{name}/infer": "v2",
    "/v2/models/{name}/versions/{version}/infer": "v2",
    "/v1/models/{name}:predict": "v1",
    "/v1/models/{name}:explain": "v1",
}
# A refused body is read on and dropped after its answer ("lingering close", as nginx does), so a
# client that sends the whole body before it reads gets the answer, not a reset: for at most this
# long and this many times the body cap.
LINGER_SECONDS = 1.0
LINGER_AT_MOST = 8


class GuardSettings(BaseModel):
    """What the guards hold every request to."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    max_body_bytes: int = Field(16 * 2**20, gt=0)
    max_json_depth: int = Field(32, ge=1)
    token: str | None = None
    max_inflight: int = Field(64, ge=1)


def route_template(routes: Sequence[BaseRoute], scope: Scope) -> str:
    """A low-cardinality label for the metrics and the guards: the route's template, never a
    model name ("other" for a path no route serves)."""
    for route in routes:
        match, _ = route.matches(scope)
        if match is not Match.NONE:
            return route.path if isinstance(route, Mount) else route.path_format
    return "other"


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


class RequestContext(HttpGuard):
    """Outermost: gives each request an id (answered as `x-request-id`) and its route's template,
    counts it and its time, answers a guard's `Rejected` as one JSON line, and turns anything
    unexpected into a 500 whose trace goes to the log under the request id."""

    def __init__(
        self,
        app: ASGIApp,
        metrics: ServerMetrics,
        routes: Sequence[BaseRoute],
        linger_bytes: int,
    ) -> None:
        super().__init__(app, metrics)
        self.routes, self.linger_bytes = routes, linger_bytes

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id = f"{random.getrandbits(64):016x}"  # unique enough to find in a log
        route = route_template(self.routes, scope)
        scope.setdefault("state", {}).update(request_id=request_id, route=route)
        REQUEST_ID.set(request_id)
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
            response = refusal_response(refusal, scope["path"], request_id)
            if refusal.linger:
                await answer_then_linger(response, receive, send_with_id, self.linger_bytes)
            else:
                await response(scope, receive, send_with_id)
        except Exception:
            logger.exception("request %s failed", request_id)
            if not status:
                await failure_response(scope["path"], request_id)(scope, receive, send_with_id)
        finally:
            self.metrics.requests.labels(route, str(status.get("code", 500))).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)


class BearerToken(HttpGuard):
    """`Authorization: Bearer <token>` on everything but /ping and /health, when a token is set."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, token: str | None) -> None:
        super().__init__(app, metrics)
        self.token = token

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.token and scope["state"]["route"] not in OPEN_ROUTES:
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


def body_kind(scope: Scope) -> str | None:
    """Which kind of body this request carries ("mlflow", "v2", "v1"), or None (no body taken)."""
    return BODY_ROUTES.get(scope["state"]["route"]) if scope["method"] == "POST" else None


class RequestBody(HttpGuard):
    """Every POST that carries a body (/invocations, v2 infer, v1 predict/explain): the content
    type it may have (415), a body cap counted from the headers and as chunks arrive (413), the
    JSON depth limit; /invocations also gets `parse_invocation`'s checks. The route behind gets
    the body already read."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, settings: GuardSettings) -> None:
        super().__init__(app, metrics)
        self.settings = settings

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = body_kind(scope)
        if kind:
            request = Request(scope, receive)
            self.check_content_type(request, binary_allowed=kind == "v2")
            body = await self.read(request)
            if kind == "mlflow":
                count, scope["state"]["invocation"] = parse_invocation(
                    body, self.settings.max_json_depth
                )
                self.metrics.images.observe(count)
            else:
                header = request.headers.get(protocols.BINARY_HEADER)
                json_part = body[: int(header)] if header and header.isdigit() else body
                check_depth(json_part, self.settings.max_json_depth)
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
        if body_kind(scope) is None:
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
    """Around MLflow's scoring app: its answers under 400 pass; the others become one clean JSON line (no trace,
    path or repr; an internal error is a 500 whose original goes to the log)."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id = scope["state"]["request_id"]
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
