"""The protocols inference clients speak, against a real server process: Open Inference Protocol v2
(by hand and through tritonclient, its binary extension included), KServe v1 :predict / :explain,
and explanations through plain `mlflow models serve` too. Each answers what /invocations answers."""

import base64
import os
import subprocess
from pathlib import Path

import mlflow
import numpy as np
import pytest
import requests
import tritonclient.http as triton

from pipeline.data.cifar_batches import BATCH_DIR, read_batch
from pipeline.model.imaging import encode_png
from registry.server import serve_command, wait_until_serving
from tests.conftest import REAL_SUBSET, free_port
from tests.hostile_requests import LEAK_MARKERS

PIXELS = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
PNGS = [encode_png(image) for image in PIXELS]


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def real_image() -> np.ndarray:
    """A real CIFAR-10 training image where the shared subset is present, else a pattern."""
    batch = REAL_SUBSET / BATCH_DIR / "data_batch_1"
    return read_batch(batch)[0][0] if batch.is_file() else PIXELS[0]


@pytest.fixture(scope="module")
def api(tiny_server):
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {tiny_server.token}"
    return tiny_server, session


def invocations(server, session, pngs) -> np.ndarray:
    body = {"dataframe_split": {"columns": ["image"], "data": [[b64(p)] for p in pngs]}}
    answer = session.post(f"{server.base}/invocations", json=body)
    assert answer.status_code == 200, answer.text
    return np.array([row["probabilities"] for row in answer.json()["predictions"]])


def v2_outputs(answer: requests.Response) -> dict:
    assert answer.status_code == 200, answer.text
    return {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in answer.json()["outputs"]}


def test_v2_health_and_metadata_describe_the_served_model(api):
    server, session = api
    assert requests.get(f"{server.base}/v2/health/live").json() == {"live": True}
    assert requests.get(f"{server.base}/v2/health/ready").json() == {"ready": True}
    assert session.get(f"{server.base}/v2").json()["extensions"] == ["binary_tensor_data"]
    assert session.get(f"{server.base}/v2/models/cifar10-tiny/ready").json()["ready"] is True
    metadata = session.get(f"{server.base}/v2/models/cifar10-tiny").json()
    assert metadata["name"] == "cifar10-tiny" and metadata["versions"] == ["1"]
    assert metadata["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert {o["name"]: o["shape"] for o in metadata["outputs"]}["probabilities"] == [-1, 10]
    versioned = session.get(f"{server.base}/v2/models/cifar10-tiny/versions/1").json()
    assert versioned == metadata


def test_v2_infer_answers_what_invocations_answers_for_bytes_and_pixels(api):
    server, session = api
    expected = invocations(server, session, PNGS)
    as_bytes = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [3],
                            "data": [b64(p) for p in PNGS]}], "id": "req-1"}  # fmt: skip
    answer = session.post(f"{server.base}/v2/models/cifar10-tiny/infer", json=as_bytes)
    assert answer.json()["id"] == "req-1" and answer.json()["model_version"] == "1"
    outputs = v2_outputs(answer)
    np.testing.assert_allclose(outputs["probabilities"], expected, rtol=0, atol=1e-7)
    assert outputs["label"].tolist() == expected.argmax(1).tolist()
    assert outputs["class_name"].shape == (3,)
    as_pixels = {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [3, 32, 32, 3],
                             "data": PIXELS.ravel().tolist()}]}  # fmt: skip
    pixels = v2_outputs(session.post(f"{server.base}/v2/models/cifar10-tiny/infer", json=as_pixels))
    np.testing.assert_allclose(pixels["probabilities"], expected, rtol=0, atol=1e-7)


def test_tritonclient_talks_to_it_in_binary_and_json(api):
    server, session = api
    expected = invocations(server, session, PNGS)
    client = triton.InferenceServerClient(server.base.removeprefix("http://"))

    def headers() -> dict:  # tritonclient writes into the dict it is given
        return {"Authorization": f"Bearer {server.token}"}

    assert client.is_server_live(headers=headers()) and client.is_model_ready(
        "cifar10-tiny", headers=headers()
    )
    images = triton.InferInput("image", [3], "BYTES")
    images.set_data_from_numpy(np.array(PNGS, dtype=object))  # binary tensor extension
    result = client.infer("cifar10-tiny", [images], headers=headers())
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, rtol=0, atol=1e-7)
    assert result.as_numpy("class_name").shape == (3,)
    pixels = triton.InferInput("pixels", [3, 32, 32, 3], "UINT8")
    pixels.set_data_from_numpy(PIXELS, binary_data=False)
    wanted = [triton.InferRequestedOutput("probabilities", binary_data=False),
              triton.InferRequestedOutput("heatmap")]  # fmt: skip
    explained = client.infer(
        "cifar10-tiny", [pixels], outputs=wanted, parameters={"explain": True}, headers=headers()
    )
    np.testing.assert_allclose(explained.as_numpy("probabilities"), expected, rtol=0, atol=1e-7)
    heatmap = explained.as_numpy("heatmap")
    assert heatmap.shape == (3, 32, 32) and heatmap.min() >= 0 and heatmap.max() <= 1
    with pytest.raises(triton.InferenceServerException, match="not served here"):
        client.infer("another-model", [images], headers=headers())


def test_explain_the_same_real_image_for_two_classes_gives_two_maps(api):
    server, session = api
    image = b64(encode_png(real_image()))
    url = f"{server.base}/v1/models/cifar10-tiny:explain"
    cat = session.post(url, json={"instances": [image], "parameters": {"target": "cat"}}).json()
    ship = session.post(url, json={"instances": [{"b64": image}], "parameters": {"target": 8}})
    ship = ship.json()
    assert cat["predictions"] == ship["predictions"]
    assert cat["explanations"][0]["target_class"] == "cat"
    assert ship["explanations"][0]["target_class"] == "ship"
    cat_map, ship_map = (np.array(a["explanations"][0]["heatmap"]) for a in (cat, ship))
    assert cat_map.shape == (32, 32)
    assert np.abs(cat_map - ship_map).max() > 0.05
    picture = base64.b64decode(cat["explanations"][0]["heatmap_png"])
    assert picture.startswith(b"\x89PNG")
    predicted = session.post(url, json={"instances": [image]}).json()
    top = predicted["predictions"][0]["class_name"]
    assert predicted["explanations"][0]["target_class"] == top
    plain = session.post(url.replace(":explain", ":predict"), json={"instances": [image]}).json()
    assert set(plain) == {"predictions"} and plain["predictions"] == predicted["predictions"]


@pytest.mark.parametrize(
    ("path", "body", "status", "words"),
    [
        ("/v2/models/other/infer", {"inputs": []}, 404, "not served here"),
        ("/v2/models/cifar10-tiny/versions/7/infer", {"inputs": []}, 404, "version 7"),
        ("/v2/models/cifar10-tiny/infer", {"inputs": []}, 400, "exactly one tensor"),
        ("/v2/models/cifar10-tiny/infer",
         {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}]}, 400,
         "datatype 'FP32' is not taken"),
        ("/v2/models/cifar10-tiny/infer",
         {"inputs": [{"name": "x", "datatype": "BYTES", "shape": [2], "data": ["aGk="]}]}, 400,
         "shape [2] says 2 images, got 1"),
        ("/v2/models/cifar10-tiny/infer",
         {"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": ["aGk="]}]}, 400,
         "not a recognizable image"),
        ("/v2/models/cifar10-tiny/infer",
         {"inputs": [{"name": "x", "datatype": "UINT8", "shape": [1, 8, 8, 3], "data": [0]}]},
         400, "shape [N, 32, 32, 3]"),
        ("/v2/models/cifar10-tiny/infer",
         {"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": ["aGk="]}],
          "outputs": [{"name": "heatmap"}]}, 400, "parameters.explain=true"),
        ("/v1/models/cifar10-tiny:explain", {"instances": []}, 400, "non-empty \"instances\""),
        ("/v1/models/cifar10-tiny:explain", {"instances": [b64(PNGS[0])],
                                             "parameters": {"target": "zebra"}}, 400,
         "not a class of this model"),
        ("/v1/models/cifar10-tiny:explain", {"instances": [3]}, 400, "not a base64 image"),
    ],
)  # fmt: skip
def test_protocol_errors_are_one_line_in_the_error_shape(api, path, body, status, words):
    server, session = api
    answer = session.post(f"{server.base}{path}", json=body)
    assert answer.status_code == status, answer.text
    assert set(answer.json()) == {"error"} and words in answer.json()["error"], answer.json()
    assert not any(marker in answer.text for marker in LEAK_MARKERS)
    assert session.get(f"{server.base}/v2/health/ready").status_code == 200


def test_every_new_route_refuses_a_missing_token_and_an_oversized_body(api):
    server, session = api
    routes = [
        ("GET", "/v2"), ("GET", "/v2/models/cifar10-tiny"), ("GET", "/v2/models/cifar10-tiny/ready"),
        ("POST", "/v2/models/cifar10-tiny/infer"), ("GET", "/v1/models/cifar10-tiny"),
        ("POST", "/v1/models/cifar10-tiny:predict"), ("POST", "/v1/models/cifar10-tiny:explain"),
        ("GET", "/model-card"),
    ]  # fmt: skip
    for method, path in routes:
        answer = requests.request(method, f"{server.base}{path}", json={"instances": []})
        assert answer.status_code == 401, (path, answer.text)
        wrong = {"Authorization": "Bearer nope"}
        assert requests.request(method, f"{server.base}{path}", headers=wrong).status_code == 403
    big = b"{" + b" " * (2 * 2**20) + b"}"  # the fixture's server caps bodies at 1 MB
    for path in ("/v2/models/cifar10-tiny/infer", "/v1/models/cifar10-tiny:explain"):
        answer = session.post(
            f"{server.base}{path}", data=big, headers={"Content-Type": "application/json"}
        )
        assert answer.status_code == 413 and "over this server's limit" in answer.json()["error"]
    too_many = {"instances": ["aGk="] * 1025}
    answer = session.post(f"{server.base}/v1/models/cifar10-tiny:explain", json=too_many)
    assert answer.status_code == 400 and "the limit is 1024" in answer.json()["error"]
    text = session.post(
        f"{server.base}/v1/models/cifar10-tiny:explain",
        data=b"x",
        headers={"Content-Type": "text/plain"},
    )
    assert text.status_code == 415


def test_metrics_count_the_new_routes_by_template(api):
    server, session = api
    session.get(f"{server.base}/v2/models/cifar10-tiny")
    session.post(
        f"{server.base}/v1/models/cifar10-tiny:predict", json={"instances": [b64(PNGS[0])]}
    )
    metrics = session.get(f"{server.base}/metrics").text
    assert 'cifar10_requests_total{route="/v2/models/{name}",status="200"}' in metrics
    assert 'route="/v1/models/{name}:predict",status="200"' in metrics
    assert "cifar10-tiny" not in metrics  # model names never become label values


def test_the_start_line_names_the_v2_route_and_the_page(tiny_server):
    log = (tiny_server.root / "server.log").read_text()
    assert "serving cifar10-tiny version 1 (alias champion), cnn" in log
    assert (
        f"{tiny_server.base}/v2/models/cifar10-tiny/infer and the page {tiny_server.base}/" in log
    )


def test_plain_mlflow_models_serve_explains_through_the_same_pyfunc(tiny_server, tmp_path):
    port = free_port()
    env = os.environ | {"MLFLOW_TRACKING_URI": tiny_server.tracking_uri}
    with (tmp_path / "mlflow-serve.log").open("w") as log:
        process = subprocess.Popen(
            serve_command(tiny_server.model_uri, "127.0.0.1", port), env=env, stdout=log,
            stderr=subprocess.STDOUT, cwd=Path(__file__).parents[1],
        )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_serving(base, process)
        body = {"dataframe_split": {"columns": ["image"], "data": [[b64(PNGS[0])]]},
                "params": {"explain": True, "target": "frog"}}  # fmt: skip
        answer = requests.post(f"{base}/invocations", json=body)
        assert answer.status_code == 200, answer.text
        row = answer.json()["predictions"][0]
        assert row["explained_class"] == "frog" and np.array(row["heatmap"]).shape == (32, 32)
        assert base64.b64decode(row["heatmap_png"]).startswith(b"\x89PNG")
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_the_logged_signature_declares_explain_and_target(tiny_server):
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tiny_server.tracking_uri)
    try:
        params = mlflow.models.get_model_info(tiny_server.model_uri).signature.params
    finally:
        mlflow.set_tracking_uri(previous)
    defaults = {param.name: param.default for param in params.params}
    assert defaults["explain"] is False and defaults["target"] == ""


def model_metrics(server, session) -> dict[str, float]:
    """Answered images, their confidence count and the low-confidence count, from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    values = {"predictions": 0.0}
    for family in text_string_to_metric_families(session.get(f"{server.base}/metrics").text):
        for sample in family.samples:
            if sample.name == "cifar10_predictions_total":
                values["predictions"] += sample.value
                values[f"class:{sample.labels['class']}"] = sample.value
            elif sample.name in ("cifar10_prediction_confidence_count",
                                 "cifar10_low_confidence_predictions_total"):  # fmt: skip
                values[sample.name] = sample.value
    return values


def test_metrics_count_every_answered_image_by_class_and_confidence_on_every_route(api):
    server, session = api
    before = model_metrics(server, session)
    probabilities = invocations(server, session, PNGS)
    v2 = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2],
                      "data": [b64(p) for p in PNGS[:2]]}]}  # fmt: skip
    session.post(f"{server.base}/v2/models/cifar10-tiny/infer", json=v2).raise_for_status()
    after = model_metrics(server, session)
    assert after["predictions"] - before["predictions"] == 5
    assert after["cifar10_prediction_confidence_count"] - before.get(
        "cifar10_prediction_confidence_count", 0) == 5  # fmt: skip
    names = session.get(f"{server.base}/model-card").json()["class_names"]
    first = f"class:{names[int(probabilities[0].argmax())]}"
    assert after[first] - before.get(first, 0) >= 2  # PNGS[0] went through both routes
    low = int((probabilities.max(1) < 0.5).sum() + (probabilities[:2].max(1) < 0.5).sum())
    assert after["cifar10_low_confidence_predictions_total"] - before.get(
        "cifar10_low_confidence_predictions_total", 0) == low  # fmt: skip


def test_metrics_watch_recent_images_against_the_training_reference_the_model_carries(api):
    from mlflow.models import get_model_info
    from prometheus_client.parser import text_string_to_metric_families

    server, session = api

    def drift() -> dict:
        text = session.get(f"{server.base}/metrics").text
        return {(s.name, s.labels.get("statistic", "")): s for f in
                text_string_to_metric_families(text) for s in f.samples if "drift" in s.name}  # fmt: skip

    black = b64(encode_png(np.zeros((32, 32, 3), np.uint8)))
    body = {"dataframe_split": {"columns": ["image"], "data": [[black]] * 100}}
    session.post(f"{server.base}/invocations", json=body).raise_for_status()
    after = drift()
    assert after[("cifar10_drift_window_images", "")].value >= 100
    info = after[("cifar10_drift_reference_info", "")].labels
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(server.tracking_uri)
    try:
        carried = get_model_info(server.model_uri).metadata["drift_reference"]
    finally:
        mlflow.set_tracking_uri(previous)
    assert info["digest"] == carried["digest"] and info["window"] == "200"
    assert after[("cifar10_drift_detected", "")].value == 1.0
    assert after[("cifar10_drift_combined_p_value", "")].value < 0.01
    assert after[("cifar10_drift_p_value", "mean_r")].value < 0.01
