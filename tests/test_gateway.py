"""The hardened layer's own rules, driven as an ASGI app around small inner apps that misbehave the
way MLflow's scoring app can (a crash, a trace in a 400, a timeout)."""

import asyncio
import json
import logging

import pytest

from registry.bodies import json_depth
from registry.gateway import build_gateway
from registry.guards import GuardSettings
from registry.metrics import ServerMetrics
from registry.refusals import clean_message


def call(app, path: str = "/invocations", body: bytes = b'{"inputs": ["x"]}', headers=None):
    """One request through `app`; returns (status, headers, parsed JSON body)."""
    sent = []
    headers = headers or [(b"content-type", b"application/json")]

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": headers}
    asyncio.run(app(scope, receive, send))
    start = sent[0]
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return start["status"], dict(start["headers"]), json.loads(body)


def gateway(inner, **settings):
    return build_gateway(inner, GuardSettings(**settings), ServerMetrics())


def answering(status: int, body: bytes):
    async def inner(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": body})

    return inner


async def crashing(scope, receive, send):
    raise RuntimeError("boom in /srv/app/secret_module.py")


def test_an_unexpected_error_is_a_500_with_a_request_id_and_the_trace_in_the_log(caplog):
    with caplog.at_level(logging.ERROR, logger="cifar10.serve"):
        status, headers, answer = call(gateway(crashing))
    assert status == 500 and answer["error_code"] == "INTERNAL_ERROR"
    request_id = answer["request_id"]
    assert headers[b"x-request-id"] == request_id.encode() and request_id in answer["message"]
    assert "boom" not in json.dumps(answer) and "secret_module" not in json.dumps(answer)
    assert request_id in caplog.text and "boom in /srv/app/secret_module.py" in caplog.text


def test_an_inner_400_with_a_stack_trace_loses_the_trace_and_keeps_the_message():
    inner = answering(
        400,
        json.dumps(
            {
                "error_code": "BAD_REQUEST",
                "message": "Failed to predict data 'frame'. \nError: image 0: not valid base64.",
                "stack_trace": 'Traceback (most recent call last):\n  File "/x/y.py", line 1',
            }
        ).encode(),
    )
    status, _, answer = call(gateway(inner))
    assert status == 400 and answer["message"] == "image 0: not valid base64."
    assert set(answer) == {"error_code", "message", "request_id"}


def test_a_message_that_would_show_paths_or_code_is_replaced():
    inner = answering(400, b'{"message": "cannot open /usr/lib/python3/site-packages/x.py"}')
    _, _, answer = call(gateway(inner))
    assert "could not be processed" in answer["message"] and "/usr" not in answer["message"]
    inner_5xx = answering(503, b"upstream said: Traceback ...")
    status, _, answer = call(gateway(inner_5xx))
    assert status == 500 and "Traceback" not in answer["message"]


def test_mlflows_timeout_stays_a_504_in_the_same_json_shape():
    status, _, answer = call(gateway(answering(504, b"Request processing time exceeded limit")))
    assert status == 504 and answer["error_code"] == "TIMEOUT"
    assert answer["message"] == "Request processing time exceeded limit"


@pytest.mark.parametrize(
    ("text", "depth"),
    [
        (b'{"a": [1, {"b": []}]}', 4),
        (b'{"a": "[[[[[[[[ inside a string ]]"}', 1),
        (b'["\\"[[[["]', 1),
        (b"[" * 100_000, 100_000),
        (b"", 0),
    ],
)
def test_json_depth_counts_structure_not_strings(text, depth):
    assert json_depth(text) == depth


def test_clean_message_keeps_one_line_and_drops_leaks():
    assert clean_message("first line\nsecond") == "first line"
    assert clean_message('Traceback (most recent call last):\n  File "x"') == ""
    assert clean_message("<Foo object at 0x7f00>") == ""
    assert len(clean_message("x" * 1000)) == 300


def test_the_body_cap_counts_a_chunked_body_as_it_arrives():
    chunks = [b'{"inputs": ["', b"A" * 600, b'"]}']

    async def receive():
        chunk = chunks.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/invocations",
             "headers": [(b"content-type", b"application/json")]}  # fmt: skip
    asyncio.run(gateway(answering(200, b"{}"), max_body_bytes=500)(scope, receive, send))
    assert sent[0]["status"] == 413 and b"limit of 500" in sent[1]["body"]
    assert (
        sent[1]["more_body"]
        and chunks == []
        and sent[2] == {"type": "http.response.body", "body": b"", "more_body": False}
    )  # the answer first, then the rest of the body read and dropped, then the end
