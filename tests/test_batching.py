"""Requests that arrive together are scored in one call of the served pyfunc (registry/batching.py),
against the real server: each client gets the answer it would get alone, a bad image fails only
its own request with the message it would get alone, and /invocations answers exactly as MLflow's
own app answers the same images."""

import base64
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import requests

from pipeline.model.imaging import encode_png

PIXELS = np.random.default_rng(7).integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
PICTURES = [base64.b64encode(encode_png(image)).decode() for image in PIXELS]
NOT_AN_IMAGE = base64.b64encode(b"a text file, not a picture").decode()


def session_of(server) -> requests.Session:
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {server.token}"
    return session


def plain(pictures: list[str]) -> dict:
    return {"dataframe_split": {"columns": ["image"], "data": [[p] for p in pictures]}}


def as_records(pictures: list[str]) -> dict:
    """The same images in a form the server hands to MLflow's own app unchanged."""
    return {"dataframe_records": [{"image": p} for p in pictures]}


def v2(pictures: list[str]) -> dict:
    tensor = {"name": "image", "datatype": "BYTES", "shape": [len(pictures)], "data": pictures}
    return {"inputs": [tensor]}


def post(server, route: str, body: dict) -> requests.Response:
    with session_of(server) as session:
        return session.post(server.base + route, json=body, timeout=60)


def probabilities_of(answer: requests.Response) -> np.ndarray:
    assert answer.status_code == 200, answer.text
    payload = answer.json()
    if "predictions" in payload:
        return np.array([row["probabilities"] for row in payload["predictions"]])
    outputs = {o["name"]: o for o in payload["outputs"]}
    return np.array(outputs["probabilities"]["data"]).reshape(outputs["probabilities"]["shape"])


def model_calls(server) -> float:
    """How many calls the served model has had, from the server's own /metrics."""
    with session_of(server) as session:
        text = session.get(server.base + "/metrics", timeout=30).text
    return float(re.search(r"^cifar10_model_call_images_count (\S+)$", text, re.M).group(1))


def all_at_once(server, requests_to_send: list[tuple[str, dict]]) -> list[requests.Response]:
    with ThreadPoolExecutor(len(requests_to_send)) as pool:
        return list(pool.map(lambda r: post(server, *r), requests_to_send))


def test_concurrent_clients_are_scored_together_and_each_gets_its_own_answer(tiny_server):
    v2_route = f"/v2/models/{tiny_server.name}/infer"
    alone = [probabilities_of(post(tiny_server, "/invocations", plain([p])))[0] for p in PICTURES]
    before = model_calls(tiny_server)
    sent = [("/invocations", plain([p])) if i % 2 else (v2_route, v2([p]))
            for i, p in enumerate(PICTURES)]  # fmt: skip
    answers = all_at_once(tiny_server, sent)
    calls = model_calls(tiny_server) - before
    together = np.array([probabilities_of(answer)[0] for answer in answers])
    np.testing.assert_allclose(together, np.array(alone), rtol=0, atol=1e-6)
    assert calls < len(PICTURES), f"{len(PICTURES)} concurrent requests took {calls:.0f} calls"


def test_a_bad_image_among_concurrent_requests_fails_only_its_own_request(tiny_server):
    bad_body = plain([PICTURES[0], NOT_AN_IMAGE])
    alone = post(tiny_server, "/invocations", bad_body)
    assert alone.status_code == 400
    answers = all_at_once(tiny_server, [("/invocations", plain([p])) for p in PICTURES[:12]]
                          + [("/invocations", bad_body)])  # fmt: skip
    assert [a.status_code for a in answers] == [200] * 12 + [400]
    bad = answers[-1].json()
    assert bad["message"] == alone.json()["message"]
    assert (
        bad["message"].startswith("image 1: ") and bad["error_code"] == alone.json()["error_code"]
    )
    expected = [
        probabilities_of(post(tiny_server, "/invocations", plain([p])))[0] for p in PICTURES[:12]
    ]
    got = np.array([probabilities_of(a)[0] for a in answers[:12]])
    np.testing.assert_allclose(got, np.array(expected), rtol=0, atol=1e-6)


def test_invocations_answers_what_mlflows_own_app_answers(tiny_server):
    ours = post(tiny_server, "/invocations", plain(PICTURES[:5]))
    mlflows = post(tiny_server, "/invocations", as_records(PICTURES[:5]))
    assert ours.status_code == mlflows.status_code == 200
    assert ours.headers["content-type"] == mlflows.headers["content-type"]
    assert ours.json() == mlflows.json()
    with_params = {**plain(PICTURES[:2]), "params": {"tta": True}}
    mlflows_params = {**as_records(PICTURES[:2]), "params": {"tta": True}}
    assert post(tiny_server, "/invocations", with_params).json() == (
        post(tiny_server, "/invocations", mlflows_params).json()
    )
    ours_bad = post(tiny_server, "/invocations", plain([PICTURES[0], NOT_AN_IMAGE]))
    mlflows_bad = post(tiny_server, "/invocations", as_records([PICTURES[0], NOT_AN_IMAGE]))
    assert ours_bad.status_code == mlflows_bad.status_code == 400
    keep = ("error_code", "message")
    assert {k: ours_bad.json()[k] for k in keep} == {k: mlflows_bad.json()[k] for k in keep}
