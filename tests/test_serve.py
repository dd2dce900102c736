"""The hardened server (`cifar10 serve`) serving the promoted champion as a real process, fed good,
bad and hostile requests; plain `mlflow models serve` for a folder-trained model."""

import base64
import contextlib
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import numpy as np
import psutil
import pytest
import requests
from PIL import Image

from pipeline.config import EvaluateConfig, PromoteConfig, resolve_train_config
from pipeline.data.sources import BadDataError, load_test_set
from pipeline.evaluate import run_evaluate
from pipeline.model.classifier import MAX_IMAGES_PER_REQUEST
from pipeline.model.imaging import encode_png
from pipeline.train import run_train
from registry.promote import run_promote
from registry.server import TOKEN_ENV, hardened_command, serve_command, wait_until_serving
from tests.conftest import free_port, write_image_tree
from tests.hostile_requests import LEAK_MARKERS, hostile_requests

TOKEN = "test-token-5f1c2a"
AUTHORIZED = {"Authorization": f"Bearer {TOKEN}"}


def post(
    url: str, body: bytes, content_type: str = "application/json", headers: dict | None = None
) -> tuple[int, dict]:
    headers = AUTHORIZED if headers is None else headers
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": content_type} | headers
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def assert_clean(answer: dict) -> None:
    """An error answer: one line with a request id, and nothing of the server's insides."""
    assert set(answer) == {"error_code", "message", "request_id"}, answer
    assert "\n" not in answer["message"]
    assert not any(marker in json.dumps(answer) for marker in LEAK_MARKERS), answer


def images_request(values: list) -> bytes:
    return json.dumps(
        {"dataframe_split": {"columns": ["image"], "data": [[v] for v in values]}}
    ).encode()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def png_of(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    previous_cwd = Path.cwd()
    os.chdir(root)
    mlflow.set_tracking_uri(uri)
    try:
        config = resolve_train_config(
            {
                "model": "resnet18",
                "data_dir": "synthetic",
                "epochs": 1,
                "max_train_images": 64,
                "batch_size": 32,
                "experiment_name": "serve-test",
            }
        )
        trained = run_train(config)
        # A one-epoch ResNet is near chance, which the first-champion gate refuses: forced here,
        # the serving tests need a champion, not a good one.
        decision = run_promote(PromoteConfig(experiment_name="serve-test", force=True))
        assert decision.action in ("promote", "force") and decision.version == "1"
        port = free_port()
        env = os.environ | {"MLFLOW_TRACKING_URI": uri, TOKEN_ENV: TOKEN}
        log = (root / "server.log").open("w")
        process = subprocess.Popen(
            [sys.executable, "-m", *hardened_command("models:/cifar10-resnet@champion", port)],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).parents[1],
        )  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        wait_until_serving(base, process)
        yield base, trained, root / "server.log"
    finally:
        if "process" in locals():
            process.terminate()
            process.wait(timeout=30)
        os.chdir(previous_cwd)


def test_real_pngs_get_labels_class_names_and_probabilities(server):
    base, trained, _ = server
    test = load_test_set("synthetic")
    status, body = post(
        f"{base}/invocations", images_request([b64(encode_png(i)) for i in test.images[:5]])
    )
    assert status == 200
    rows = body["predictions"]
    assert len(rows) == 5
    expected = mlflow.pyfunc.load_model(trained.model_uri).predict(
        __import__("pandas").DataFrame({"image": [encode_png(i) for i in test.images[:5]]})
    )
    assert [r["label"] for r in rows] == expected["label"].tolist()
    for row in rows:
        assert 0 <= row["label"] <= 9 and isinstance(row["class_name"], str)
        assert len(row["probabilities"]) == 10 and abs(sum(row["probabilities"]) - 1) < 1e-4


def test_other_formats_and_modes_are_converted(server):
    base, _, _ = server
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (300, 200, 3), dtype=np.uint8))
    values = [
        b64(png_of(rgb, "JPEG")),
        b64(png_of(rgb.convert("L"))),
        b64(png_of(rgb.convert("RGBA"))),
        b64(png_of(rgb.convert("P"))),
    ]
    status, body = post(f"{base}/invocations", images_request(values))
    assert status == 200 and len(body["predictions"]) == 4
    records = json.dumps({"dataframe_records": [{"image": values[0]}]}).encode()
    status, body = post(f"{base}/invocations", records)
    assert status == 200 and len(body["predictions"]) == 1


def test_tta_param_is_accepted(server):
    base, _, _ = server
    body = json.loads(images_request([b64(encode_png(np.zeros((32, 32, 3), np.uint8)))]))
    status, answer = post(
        f"{base}/invocations", json.dumps(body | {"params": {"tta": True}}).encode()
    )
    assert status == 200 and len(answer["predictions"]) == 1


def test_no_rows_get_an_empty_answer(server):
    base, _, _ = server
    assert post(f"{base}/invocations", images_request([])) == (200, {"predictions": []})


BAD_REQUESTS = {
    "invalid base64": (images_request(["@@@ not base64 @@@"]), "not valid base64"),
    "not an image": (images_request([b64(b"just some text")]), "not a recognizable image"),
    "truncated": (
        images_request([b64(png_of(Image.new("RGB", (64, 64), "red"))[:60])]),
        "truncated or corrupt",
    ),
    "unsupported format": (
        images_request([b64(png_of(Image.new("RGB", (8, 8)), "BMP"))]),
        "BMP is not supported",
    ),
    "missing column": (
        json.dumps({"dataframe_split": {"columns": ["picture"], "data": [["x"]]}}).encode(),
        "image",
    ),
    "too many images": (
        images_request([b64(png_of(Image.new("RGB", (1, 1))))] * (MAX_IMAGES_PER_REQUEST + 1)),
        f"the limit is {MAX_IMAGES_PER_REQUEST}",
    ),
    "decompression bomb": (
        images_request([b64(png_of(Image.new("1", (20_000, 20_000))))]),
        "pixels",
    ),
    "20 megapixel photo": (
        images_request([b64(png_of(Image.new("RGB", (5472, 3648), (90, 60, 30)), "JPEG"))]),
        "over the limit",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_is_a_400_naming_the_problem_and_the_server_keeps_serving(server, case):
    base, _, _ = server
    body, message = BAD_REQUESTS[case]
    status, answer = post(f"{base}/invocations", body)
    assert status == 400, answer
    assert message in answer["message"]
    assert_clean(answer)
    ok = images_request([b64(encode_png(np.zeros((32, 32, 3), np.uint8)))])
    assert post(f"{base}/invocations", ok)[0] == 200


def one_image_request() -> bytes:
    return images_request([b64(encode_png(np.zeros((32, 32, 3), np.uint8)))])


def raw_request(base: str, method: str, path: str, body: bytes, headers: dict) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection(base.removeprefix("http://"), timeout=60)
    try:
        connection.request(method, path, body, headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_a_body_over_the_cap_is_413_whether_its_length_is_declared_or_not(server):
    """Answered from the headers (or once the cap is passed, for a chunked body); requests, like most
    clients, reads that answer even while it is still sending."""
    base, _, _ = server
    big = b'{"inputs": ["' + b"A" * (17 * 2**20) + b'"]}'
    headers = AUTHORIZED | {"Content-Type": "application/json"}
    declared = requests.post(f"{base}/invocations", data=big, headers=headers, timeout=60)
    assert declared.status_code == 413
    assert "over this server's limit of 16,777,216" in declared.json()["message"]
    assert_clean(declared.json())
    chunks = (big[i : i + 2**20] for i in range(0, len(big), 2**20))
    chunked = requests.post(f"{base}/invocations", data=chunks, headers=headers, timeout=60)
    assert chunked.status_code == 413
    assert post(f"{base}/invocations", one_image_request())[0] == 200


def send_slowly(base: str, size: int) -> tuple[bytes, float]:
    """A client that declares `size` bytes, sends 64 KiB every 50 ms and reads as it sends."""
    port = int(base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        head = (f"POST /invocations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {size}\r\n\r\n")  # fmt: skip
        connection.sendall(head.encode())
        started = time.perf_counter()
        connection.setblocking(False)
        answer = b""
        while b"}" not in answer and time.perf_counter() - started < 5:
            with contextlib.suppress(BlockingIOError, BrokenPipeError, ConnectionResetError):
                connection.send(b"A" * 65536)
            with contextlib.suppress(BlockingIOError):
                answer += connection.recv(65536)
            time.sleep(0.05)
        return answer, time.perf_counter() - started


@pytest.mark.parametrize("client", ["urllib", "chunked", "slow"])
def test_every_kind_of_client_reads_its_413_within_a_second(server, client):
    """urllib sends `Connection: close` and its whole body before it reads: the server answers,
    then reads on and drops the rest (lingering close) instead of resetting the connection."""
    base, _, _ = server
    size = 17 * 2**20
    started = time.perf_counter()
    if client == "urllib":
        request = urllib.request.Request(
            f"{base}/invocations", b"A" * size,
            AUTHORIZED | {"Content-Type": "application/json", "Connection": "close"},
        )  # fmt: skip
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        status, answer = refused.value.code, json.loads(refused.value.read())
    elif client == "chunked":
        chunks = (b"A" * 2**20 for _ in range(17))
        response = requests.post(f"{base}/invocations", data=chunks, timeout=10,
                                 headers=AUTHORIZED | {"Content-Type": "application/json"})  # fmt: skip
        status, answer = response.status_code, response.json()
    else:
        raw, _ = send_slowly(base, size)
        status = int(raw.split(b" ", 2)[1])
        answer = json.loads(raw.split(b"\r\n\r\n", 1)[1])
    assert time.perf_counter() - started < 1.5
    assert status == 413 and "limit of 16,777,216" in answer["message"]


def test_a_refused_body_does_not_grow_the_server(server):
    import psutil

    base, _, _ = server
    port = int(base.rsplit(":", 1)[1])
    listening = next(c.pid for c in psutil.net_connections("tcp")
                     if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN)  # fmt: skip
    workers = [psutil.Process(listening)]
    before = sum(w.memory_info().rss for w in workers)
    for _ in range(3):
        request = urllib.request.Request(
            f"{base}/invocations", b"A" * (100 * 2**20),
            AUTHORIZED | {"Content-Type": "application/json"},
        )  # fmt: skip
        with pytest.raises((urllib.error.HTTPError, ConnectionError)):
            urllib.request.urlopen(request, timeout=30)
    grown = sum(w.memory_info().rss for w in workers) - before
    assert grown < 30 * 2**20, f"the server grew by {grown / 2**20:.0f} MiB"
    assert post(f"{base}/invocations", one_image_request())[0] == 200


@pytest.mark.parametrize(
    "content_type", ["text/csv", "application/vnd.apache.parquet", "text/plain"]
)
def test_only_json_is_accepted(server, content_type):
    base, _, _ = server
    status, answer = post(f"{base}/invocations", b"image\nAAAA\n", content_type)
    assert status == 415 and "application/json" in answer["message"]
    assert_clean(answer)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested deeper than 32"),
        (b'{"dataframe_split": {"columns": ["image"], "data": [[', "not valid JSON"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b"[1, 2]", "exactly one of"),
    ],
    ids=["deep", "truncated", "not-utf8", "a-list"],
)
def test_malformed_json_is_a_400_with_one_line(server, body, message):
    base, _, _ = server
    status, answer = post(f"{base}/invocations", body)
    assert status == 400 and message in answer["message"]
    assert_clean(answer)


def test_the_token_is_checked_everywhere_but_the_health_checks(server):
    base, _, _ = server
    request = urllib.request.Request(f"{base}/invocations", data=one_image_request(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(request, timeout=30)
    assert missing.value.code == 401 and missing.value.headers["WWW-Authenticate"] == "Bearer"
    status, answer = post(
        f"{base}/invocations", one_image_request(), headers={"Authorization": "Bearer guess"}
    )
    assert status == 403 and "not this server's token" in answer["message"]
    assert post(f"{base}/invocations", one_image_request())[0] == 200
    for path in ("/ping", "/health"):
        assert raw_request(base, "GET", path, b"", {})[0] == 200
    for path in ("/version", "/metrics"):
        assert raw_request(base, "GET", path, b"", {})[0] == 401
        assert raw_request(base, "GET", path, b"", AUTHORIZED)[0] == 200


def test_metrics_count_requests_images_and_refusals(server):
    base, _, _ = server
    post(
        f"{base}/invocations",
        images_request([b64(encode_png(np.zeros((32, 32, 3), np.uint8)))] * 3),
    )
    post(f"{base}/invocations", b"{", headers=AUTHORIZED)
    post(f"{base}/invocations", one_image_request(), headers={})
    status, text = raw_request(base, "GET", "/metrics", b"", AUTHORIZED)
    metrics = text.decode()
    assert status == 200
    assert 'cifar10_requests_total{route="/invocations",status="200"}' in metrics
    assert 'cifar10_rejected_requests_total{reason="malformed_json"}' in metrics
    assert 'cifar10_rejected_requests_total{reason="no_token"}' in metrics
    assert "cifar10_images_per_request_bucket" in metrics
    assert 'cifar10_request_seconds_count{route="/invocations"}' in metrics


def test_concurrent_callers_each_get_their_own_answers(server):
    """24 callers at once, each with different images: micro-batching runs them together, and
    every answer matches what the logged model predicts for that caller's images alone."""
    base, trained, _ = server
    images = load_test_set("synthetic").images[:48]
    requests = [[images[i], images[i + 24]] for i in range(24)]
    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(
            lambda pair: post(f"{base}/invocations", images_request([b64(encode_png(i)) for i in pair])),
            requests,
        ))  # fmt: skip
    model = mlflow.pyfunc.load_model(trained.model_uri)
    for pair, (status, body) in zip(requests, answers, strict=True):
        assert status == 200
        for image, row in zip(pair, body["predictions"], strict=True):
            alone = model.predict(__import__("pandas").DataFrame({"image": [encode_png(image)]}))
            assert row["label"] == alone["label"][0]
            np.testing.assert_allclose(row["probabilities"], alone["probabilities"][0], atol=1e-5)


def test_seeded_hostile_requests_get_no_5xx_and_no_insides(server):
    """300 requests shaped like MLflow's protocol with something wrong: deep nesting, wrong types,
    huge numbers, broken images, bad headers. Plain `mlflow models serve` answered 39 of the first
    500 of these with a 500 and many with a stack trace."""
    base, _, log = server
    started = time.monotonic()
    statuses = []
    good = images_request([b64(png_of(Image.new("RGB", (32, 32), "red")))])
    for number, request in enumerate(hostile_requests(seed=7, count=300, token=TOKEN)):
        if number % 50 == 0:  # a good request among the bad ones is still answered
            headers = AUTHORIZED | {"Content-Type": "application/json"}
            statuses.append(raw_request(base, "POST", "/invocations", good, headers)[0])
        headers = {k: v for k, v in request.headers.items() if v}
        status, body = raw_request(base, request.method, request.path, request.body, headers)
        statuses.append(status)
        assert status < 500, (request, body[:300])
        if status >= 400:
            assert_clean(json.loads(body))
    assert time.monotonic() - started < 120
    assert statuses.count(200) > 0 and len(set(statuses)) >= 5
    assert raw_request(base, "GET", "/ping", b"", {})[0] == 200
    assert "Traceback" not in log.read_text()


def test_a_public_host_without_a_token_is_refused_before_loading_anything(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "serve", "--host", "0.0.0.0",
         "--model-uri", "models:/does-not-matter@champion"],
        env=env, capture_output=True, text=True, timeout=60, cwd=Path(__file__).parents[1],
    )  # fmt: skip
    assert result.returncode == 2
    assert "no token is set" in result.stderr and "--allow-unauthenticated=true" in result.stderr
    assert "Traceback" not in result.stderr
    missing = tmp_path / "absent-token"
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "serve", "--host", "0.0.0.0",
         "--token-file", str(missing)],
        env=env, capture_output=True, text=True, timeout=60, cwd=Path(__file__).parents[1],
    )  # fmt: skip
    assert result.returncode == 2 and f"token_file {missing} cannot be read" in result.stderr


def test_three_class_tree_trains_evaluates_and_serves_its_folder_names(tracking, tmp_path):
    tree = write_image_tree(tmp_path / "pets", per_class=40, test_per_class=6)
    config = resolve_train_config(
        {"model": "cnn", "data_dir": str(tree), "epochs": 2, "width": 8, "batch_size": 32}
        | {"experiment_name": tracking}
    )
    trained = run_train(config)
    evaluated = run_evaluate(
        EvaluateConfig(model_uri=trained.model_uri, data_dir=str(tree), gradcam_per_class=1)
    )
    assert {f"test_f1_{name}" for name in ("cat", "dog", "frog")} <= set(evaluated.metrics)
    with pytest.raises(BadDataError, match=r"knows the classes \['cat', 'dog', 'frog'\]"):
        run_evaluate(EvaluateConfig(model_uri=trained.model_uri, data_dir="synthetic"))
    files = sorted((tree / "test").rglob("*.*"))
    expected = mlflow.pyfunc.load_model(trained.model_uri).predict(
        __import__("pandas").DataFrame({"image": [f.read_bytes() for f in files]})
    )
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", *serve_command(trained.model_uri, "127.0.0.1", port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_serving(base, process)
        status, body = post(
            f"{base}/invocations", images_request([b64(f.read_bytes()) for f in files])
        )
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert status == 200
    answers = body["predictions"]
    assert [a["class_name"] for a in answers] == expected["class_name"].tolist()
    assert {a["class_name"] for a in answers} <= {"cat", "dog", "frog"}
    assert all(len(a["probabilities"]) == 3 for a in answers)


def test_a_port_in_use_is_refused_at_once_naming_who_holds_it(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        log = tmp_path / "serve.log"
        with log.open("w") as out:
            code = subprocess.call(
                [sys.executable, "-m", "pipeline.cli", "serve", "--port", str(port),
                 "--model-uri", "models:/does-not-matter@champion"],
                stdout=out, stderr=subprocess.STDOUT, timeout=60, cwd=Path(__file__).parents[1],
            )  # fmt: skip
    printed = log.read_text()
    assert code == 2 and "Traceback" not in printed
    assert f"error: port {port} on 127.0.0.1 is in use by pid {os.getpid()} (" in printed
    assert f"--port={port + 1}" in printed and "no model at" not in printed


def test_several_workers_share_the_cores_and_add_up_their_metrics(
    tiny_server, tmp_path, monkeypatch
):
    """`--workers 2`: each worker's torch gets its share of the cores (not one OpenMP team as
    large as the machine each), the start line says so, and /metrics counts every worker."""
    from registry.server import threads_per_worker

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # set for the test process under xdist
    share = threads_per_worker(2)
    port = free_port()
    log = tmp_path / "server.log"
    process = subprocess.Popen(
        [sys.executable, "-m", *hardened_command(tiny_server.model_uri, port, "--workers", "2")],
        env=os.environ | {"MLFLOW_TRACKING_URI": tiny_server.tracking_uri, TOKEN_ENV: TOKEN},
        stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=Path(__file__).parents[1],
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    picture = b64(png_of(Image.new("RGB", (32, 32), (200, 30, 30))))
    try:
        wait_until_serving(base, process)
        workers = [
            child.environ().get("OMP_NUM_THREADS")
            for child in psutil.Process(process.pid).children(recursive=True)
            if "spawn_main" in " ".join(child.cmdline())
        ]
        with ThreadPoolExecutor(8) as pool:
            answers = list(
                pool.map(
                    lambda _: post(f"{base}/invocations", images_request([picture])), range(24)
                )
            )
        metrics = requests.get(f"{base}/metrics", headers=AUTHORIZED, timeout=30).text
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert 1 <= share <= max(1, os.cpu_count() // 2)
    assert f"2 workers, {share} torch thread{'s' * (share != 1)} each" in log.read_text()
    assert workers == [str(share)] * 2
    assert all(status == 200 for status, _ in answers)
    assert 'cifar10_requests_total{route="/invocations",status="200"} 24.0' in metrics


def test_a_thread_count_the_user_set_is_kept(monkeypatch):
    from registry.server import threads_per_worker

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads_per_worker(4) is None
