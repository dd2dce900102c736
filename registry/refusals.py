"""What the server answers when it says no: one JSON line, never a trace, a path or a repr.

MLflow's routes answer `{"error_code", "message", "request_id"}` (MLflow's own error shape plus the
id); the v1 / v2 protocol routes answer `{"error": ...}`, the shape their clients read. Every
refusal is a `Rejected` (or a `ProtocolError` from registry/protocols.py, or Starlette's own 404 /
405), and each kind has one handler in registry/gateway.py that turns it into that line.
"""

from __future__ import annotations

import logging
import re
from contextvars import ContextVar

from starlette.responses import JSONResponse

from registry.batching import ROW_REQUEST_IDS

logger = logging.getLogger("cifar10.serve")

# The id of the request being answered, for what the model's predict reaches (the inference log):
# the threads the routes predict on copy the request's context.
REQUEST_ID: ContextVar[str] = ContextVar("request_id", default="")
MAX_MESSAGE_CHARS = 300
RETRY_AFTER_S = 1  # what an overloaded server asks a refused client to wait
# What an answer must never show: traces, source locations, object reprs, absolute paths.
LEAKS = re.compile(r'Traceback|File "|\.py\b|site-packages|object at 0x|(?:/[\w.-]+){2,}')
# MLflow wraps a model's error as "Failed to predict data '<the whole DataFrame>'. \nError: <it>"
# (and a schema error as "Failed to enforce schema of data ...Error: <it>").
MLFLOW_PREDICT_PREFIX = re.compile(
    r"^(?:Failed to (?:predict|enforce schema of) data .*?Error: )+", re.DOTALL
)
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


class Rejected(Exception):
    """A request refused by the server: its status, a reason label for the metrics, a message, and
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


def internal_error(request_id: str) -> dict[str, str]:
    return error_body(
        500, f"internal error; the server log has the details under request id {request_id}.",
        request_id,
    )  # fmt: skip


def is_protocol_route(path: str) -> bool:
    """The v1/v2 routes answer errors as `{"error": ...}`, the shape their clients read."""
    return path.startswith(("/v1/", "/v2/")) or path == "/v2"


def refusal_response(refusal: Rejected, path: str, request_id: str) -> JSONResponse:
    """`refusal` as the route's clients read an error, with the headers its status asks for."""
    headers = {"www-authenticate": "Bearer"} if refusal.status == 401 else {}
    if refusal.status == 503:
        headers["retry-after"] = str(RETRY_AFTER_S)
    if refusal.linger:
        headers["connection"] = "close"
    body = error_body(refusal.status, refusal.message, request_id)
    if refusal.error_code:
        body["error_code"] = refusal.error_code
    if is_protocol_route(path):
        body = {"error": refusal.message}
    return JSONResponse(body, refusal.status, headers)


def failure_response(path: str, request_id: str) -> JSONResponse:
    """An unexpected error: a 500 that names the request id its trace is logged under."""
    body = internal_error(request_id)
    if is_protocol_route(path):
        body = {"error": body["message"]}
    return JSONResponse(body, 500)


def request_id_of_row(row: int) -> str:
    """The id of the request that sent row `row` of the call being scored: a batched call knows
    each row's, any other call is one request's."""
    ids = ROW_REQUEST_IDS.get()
    return ids[row] if row < len(ids) else REQUEST_ID.get()
