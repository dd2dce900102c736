"""The served model as a Starlette application, for a port the open network can reach.

MLflow's own scoring app (`mlflow.pyfunc.scoring_server`, what `mlflow models serve` runs) answers
its routes (`/ping`, `/health`, `/version`, and `/invocations` in every form MLflow reads); beside
them this app serves the Open Inference Protocol v2 (`/v2/...`), KServe's v1 `:predict` /
`:explain` (registry/protocols.py translates both), `/metrics`, the page at `/` and its model
card, all calling the same pyfunc. Every request first passes the guards (registry/guards.py:
request id, token, body cap and checks, load limit); each kind of refusal has one exception
handler that answers it as one clean JSON line (registry/refusals.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pandas as pd
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.convertors import Convertor, register_url_convertor
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from pipeline.model.classifier import IMAGE_COLUMN
from registry import protocols
from registry.batching import ImageError, RequestBatcher
from registry.guards import (
    LINGER_AT_MOST,
    ASGIApp,
    BearerToken,
    CleanErrors,
    GuardSettings,
    LoadLimit,
    Receive,
    RequestBody,
    RequestContext,
    Scope,
    Send,
)
from registry.metrics import ServerMetrics
from registry.protocols import ProtocolError, Records
from registry.refusals import Rejected, clean_message, refusal_response

PAGE_DIR = Path(__file__).with_name("page")
PAGE_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
        "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}
HTTP_REFUSALS = {404: "unknown_route", 405: "method_not_allowed"}


class V1ModelName(Convertor):
    """A model name in a v1 path, which ends at the `:predict` / `:explain` verb."""

    regex = "[^/:]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("v1_model", V1ModelName())


@dataclass
class ServedModel:
    """What the model routes answer with: the loaded pyfunc, the name and version clients address
    it by, and the model card the page shows."""

    model: Any
    name: str
    version: str
    class_names: list[str]
    card: dict[str, Any] = field(default_factory=dict)
    timeout_s: float = 60.0


class PageFiles(StaticFiles):
    """The page's static files, each with the headers that let a browser run nothing else."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers.update(PAGE_HEADERS)
        return response


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


class ModelRoutes:
    """The routes this project adds beside MLflow's. Each calls the served pyfunc's own `predict`
    (requests that wait together in one call, registry/batching.py), so every protocol gives the
    same probabilities."""

    def __init__(self, served: ServedModel, metrics: ServerMetrics) -> None:
        self.served, self.metrics = served, metrics
        self.batcher = RequestBatcher(
            lambda frame, params: served.model.predict(frame, params=params).to_dict(
                orient="records"
            )
        )

    def routes(self) -> list[BaseRoute]:
        v2, v1 = "/v2/models/{name}", "/v1/models/{name:v1_model}"
        version = v2 + "/versions/{version}"
        return [
            Route("/", self.page),
            Mount("/page", PageFiles(directory=PAGE_DIR)),
            Route("/model-card", self.model_card),
            Route("/v2", self.v2_server),
            Route("/v2/health/live", self.v2_health),
            Route("/v2/health/ready", self.v2_health),
            *(Route(path, self.v2_metadata) for path in (v2, version)),
            *(Route(path + "/ready", self.ready) for path in (v2, version)),
            *(Route(path + "/infer", self.v2_infer, methods=["POST"]) for path in (v2, version)),
            Route(v1, self.ready),
            Route(
                v1 + ":predict", functools.partial(self.v1_infer, explain=False), methods=["POST"]
            ),
            Route(
                v1 + ":explain", functools.partial(self.v1_infer, explain=True), methods=["POST"]
            ),
        ]

    async def page(self, request: Request) -> Response:
        return FileResponse(PAGE_DIR / "index.html", headers=PAGE_HEADERS)

    async def model_card(self, request: Request) -> Response:
        return JSONResponse(self.served.card)

    async def v2_server(self, request: Request) -> Response:
        return JSONResponse({"name": "cifar10-serve", "version": self.served.version,
                             "extensions": ["binary_tensor_data"]})  # fmt: skip

    async def v2_health(self, request: Request) -> Response:
        return JSONResponse({request.url.path.rsplit("/", 1)[1]: True})

    async def v2_metadata(self, request: Request) -> Response:
        self.check_model(request)
        served = self.served
        return JSONResponse(
            protocols.v2_model_metadata(served.name, served.version, served.class_names)
        )

    async def ready(self, request: Request) -> Response:
        self.check_model(request)
        return JSONResponse({"name": self.served.name, "ready": True})

    async def v2_infer(self, request: Request) -> Response:
        self.check_model(request)
        parsed = protocols.parse_v2_infer(
            await request.body(), request.headers.get(protocols.BINARY_HEADER)
        )
        result = await self.predict(parsed.images, parsed.params, request)
        body, headers = protocols.v2_infer_response(
            parsed, result, self.served.name, self.served.version
        )
        media_type = headers.pop("content-type")
        return Response(body, media_type=media_type, headers=headers)

    async def v1_infer(self, request: Request, explain: bool) -> Response:
        """KServe v1 `:predict`, or `:explain` (the same answer with the explanations)."""
        self.check_model(request)
        images, params = protocols.parse_v1(await request.body())
        result = await self.predict(images, params | {"explain": explain}, request)
        answer = {"predictions": protocols.v1_predictions(result)}
        if explain:
            answer["explanations"] = protocols.v1_explanations(result)
        return JSONResponse(answer)

    def check_model(self, request: Request) -> None:
        served = self.served
        name, version = request.path_params["name"], request.path_params.get("version")
        if name != served.name or (version is not None and version != served.version):
            asked = f"{name}" + (f" version {version}" if version else "")
            raise Rejected(
                404,
                "unknown_model",
                f"model {asked[:80]!r} is not served here; this server serves {served.name!r} "
                f"version {served.version} (GET /v2/models/{served.name}).",
            )

    async def invocation(self, scope: Scope) -> Response | None:
        """/invocations in its plain form, scored with the other requests waiting, answered as
        MLflow's app answers it (its own serializer); None: MLflow's app takes the request."""
        from mlflow.pyfunc.scoring_server import predictions_to_json

        plain = plain_invocation(scope["state"].get("invocation"))
        if plain is None:
            return None
        result = await self.scored(*plain, scope["state"]["request_id"])
        text = io.StringIO()
        predictions_to_json(result, text)
        return Response(text.getvalue(), media_type="application/json")

    async def predict(self, images: list[Any], params: dict[str, Any], request: Request) -> Records:
        self.metrics.images.observe(len(images))
        return await self.scored(images, params, request.state.request_id)

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


class Invocations:
    """/invocations: the plain form through `ModelRoutes` (batched), every other form through
    MLflow's app, which reads the body the guards already read."""

    def __init__(self, mlflow_app: ASGIApp, model_routes: ModelRoutes | None) -> None:
        self.mlflow_app, self.model_routes = mlflow_app, model_routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        answer = await self.model_routes.invocation(scope) if self.model_routes else None
        if answer is None:
            await self.mlflow_app(scope, receive, send)
        else:
            await answer(scope, receive, send)


def refusal_handlers(metrics: ServerMetrics) -> dict[Any, Callable]:
    """One handler per kind of refusal a route raises (a guard's are answered by
    `RequestContext`, which may also linger for the rest of a refused body)."""

    async def rejected(request: Request, refusal: Rejected) -> Response:
        metrics.rejected.labels(refusal.reason).inc()
        return refusal_response(refusal, request.url.path, request.state.request_id)

    async def protocol_error(request: Request, error: ProtocolError) -> Response:
        return await rejected(request, Rejected(error.status, error.reason, error.message))

    async def http_error(request: Request, error: HTTPException) -> Response:
        reason = HTTP_REFUSALS.get(error.status_code, "bad_request")
        if error.status_code == 405:
            allowed = sorted(set(error.headers["Allow"].split(", ")) - {"HEAD"})
            message = f"use {' or '.join(allowed)} on this route."
        elif error.status_code == 404:
            message = "no such route; see GET /v2 and /v2/models/<name>, or POST /invocations."
        else:
            message = clean_message(str(error.detail)) or "the request could not be processed."
        return await rejected(request, Rejected(error.status_code, reason, message))

    return {Rejected: rejected, ProtocolError: protocol_error, HTTPException: http_error}


def request_threads(threads: int, on_shutdown: Callable[[], None] | None = None):
    """A lifespan: `threads` worker threads for the requests scored at once (sized at startup,
    `on_shutdown` called on a thread when the server stops).

    MLflow's app runs each prediction in the event loop's default executor, which Python sizes at
    cpu_count + 4 threads: 6 on 2 cores, so at most 6 requests could wait for one micro-batch
    however many were in flight (measured: batches of 3 images at 64 concurrent clients). uvicorn
    re-raises SIGTERM once it has stopped, so atexit handlers never run, but the lifespan's end
    does."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        pool = ThreadPoolExecutor(max_workers=threads + 4, thread_name_prefix="request")
        asyncio.get_running_loop().set_default_executor(pool)
        anyio.to_thread.current_default_thread_limiter().total_tokens = threads + 4
        yield
        if on_shutdown is not None:
            await anyio.to_thread.run_sync(on_shutdown)

    return lifespan


def build_gateway(
    mlflow_app: ASGIApp,
    settings: GuardSettings,
    metrics: ServerMetrics,
    served: ServedModel | None = None,
    on_shutdown: Callable[[], None] | None = None,
) -> Starlette:
    """MLflow's scoring app and, with `served`, the model routes beside it, behind the guards."""
    model_routes = ModelRoutes(served, metrics) if served is not None else None
    mlflow_routes = CleanErrors(mlflow_app, metrics)

    async def exposition(request: Request) -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    routes = [
        *(Route(path, mlflow_routes, methods=["GET"]) for path in ("/ping", "/health", "/version")),
        Route("/invocations", Invocations(mlflow_routes, model_routes), methods=["POST"]),
        Route("/metrics", exposition),
        *(model_routes.routes() if model_routes else []),
    ]
    guards = [
        Middleware(RequestContext, metrics, routes, LINGER_AT_MOST * settings.max_body_bytes),
        Middleware(BearerToken, metrics, settings.token),
        Middleware(RequestBody, metrics, settings),
        Middleware(LoadLimit, metrics, settings.max_inflight),
    ]
    return Starlette(
        routes=routes,
        middleware=guards,
        exception_handlers=refusal_handlers(metrics),
        lifespan=request_threads(settings.max_inflight, on_shutdown),
    )
