"""The serving image, built by deploy/container/build.sh and run for real with podman: non-root on a
read-only root filesystem, a real model baked in, called over HTTP, stopped with SIGTERM."""

import base64
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests

from pipeline.model.imaging import encode_png
from tests.conftest import free_port
from tests.test_protocols import real_image

ROOT = Path(__file__).parents[1]
TAG = "localhost/cifar10-serve:test"
CONTAINERS_CONF = str(ROOT / "deploy" / "container" / "containers.conf")

pytestmark = pytest.mark.skipif(
    shutil.which("podman") is None or shutil.which("mmdebstrap") is None,
    reason="podman or mmdebstrap is not installed (.ci/run installs podman, runc and mmdebstrap "
    "with apt-get); the image cannot be built here",
)


def podman(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["podman", *args], capture_output=True, text=True, check=check, timeout=timeout,
        env=os.environ | {"CONTAINERS_CONF": CONTAINERS_CONF},
    )  # fmt: skip


@pytest.fixture(scope="module")
def image(tiny_server, tmp_path_factory) -> str:
    """The tiny server's champion, downloaded the way docs/deploy.md says, baked into an image."""
    model = tmp_path_factory.mktemp("container") / "model"
    env = os.environ | {"MLFLOW_TRACKING_URI": tiny_server.tracking_uri}
    subprocess.run(
        [sys.executable, "-m", "mlflow", "artifacts", "download",
         "-u", f"models:/{tiny_server.name}@champion", "-d", str(model)],
        env=env, check=True, capture_output=True,
    )  # fmt: skip
    build = subprocess.run(
        ["bash", str(ROOT / "deploy" / "container" / "build.sh"), "--model", str(model),
         "--tag", TAG],
        env=env | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
        capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    return str(model)


@pytest.fixture
def container(image, tmp_path):
    """The image on loopback with a token file, as the Deployment runs it; removed afterwards."""
    token = "container-token-5c1f"
    secrets = tmp_path / "secrets"
    secrets.mkdir(mode=0o700)
    (secrets / "token").write_text(token + "\n")
    (secrets / "token").chmod(0o644)
    port = free_port()
    name = f"cifar10-test-{port}"
    started = time.monotonic()
    podman(
        "run", "--detach", "--name", name, "--read-only", "--tmpfs", "/tmp",
        "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
        "--publish", f"127.0.0.1:{port}:5001",
        "--volume", f"{secrets / 'token'}:/run/secrets/cifar10/token:ro", TAG,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_ping(base, name)
        yield base, token, name, time.monotonic() - started
    finally:
        podman("rm", "--force", "--time", "0", name, check=False)


def wait_for_ping(base: str, name: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{base}/ping", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        state = podman("inspect", "--format", "{{.State.Status}}", name).stdout.strip()
        if state not in ("running", "created", "configured"):
            logs = podman("logs", name, check=False)
            raise AssertionError(f"the container is {state}:\n{logs.stdout}{logs.stderr}")
        time.sleep(0.3)
    raise TimeoutError(f"{base} did not answer /ping within {timeout:.0f} s")


def test_the_image_runs_as_a_non_root_user_with_a_health_check(image):
    inspected = json.loads(podman("image", "inspect", TAG).stdout)[0]
    config = inspected["Config"]
    assert config["User"] == "10001:10001"
    assert "/v2/health/ready" in " ".join(inspected["Healthcheck"]["Test"])
    assert config["StopSignal"] == "SIGTERM"
    env = " ".join(config["Env"])
    assert "TOKEN" not in env


def test_the_container_serves_the_model_it_holds_and_stops_cleanly_on_sigterm(image, container):
    base, token, name, cold_start_s = container
    auth = {"Authorization": f"Bearer {token}"}
    assert requests.get(f"{base}/v2/health/ready").json() == {"ready": True}
    assert requests.get(f"{base}/version").status_code == 401

    pixels = real_image()
    body = {"dataframe_split": {"columns": ["image"],
                                "data": [[base64.b64encode(encode_png(pixels)).decode()]]}}  # fmt: skip
    answer = requests.post(f"{base}/invocations", json=body, headers=auth)
    assert answer.status_code == 200, answer.text
    served = np.array(answer.json()["predictions"][0]["probabilities"])
    in_process = mlflow.pyfunc.load_model(image).predict(
        pd.DataFrame({"image": [encode_png(pixels)]})
    )
    np.testing.assert_allclose(served, in_process["probabilities"][0], rtol=0, atol=1e-6)

    assert requests.post(f"{base}/invocations", json=body).status_code == 401
    too_big = requests.post(f"{base}/invocations", data=b"x" * (17 * 2**20), headers=auth
                            | {"Content-Type": "application/json"})  # fmt: skip
    assert too_big.status_code == 413
    metrics = requests.get(f"{base}/metrics", headers=auth).text
    assert 'cifar10_requests_total{route="/invocations",status="200"} 1.0' in metrics
    assert 'cifar10_rejected_requests_total{reason="body_too_large"} 1.0' in metrics

    assert token not in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    inspected = podman("inspect", name).stdout
    assert token not in inspected
    # No systemd here to schedule the image's health check, so it is run once by hand.
    assert podman("healthcheck", "run", name).returncode == 0
    uid = podman("exec", name, "id", "-u").stdout.strip()
    assert uid == "10001"
    assert podman("exec", name, "touch", "/app/x", check=False).returncode != 0

    stopping = time.monotonic()
    podman("kill", "--signal", "TERM", name)
    exit_code = podman("wait", name, timeout=15).stdout.strip()
    stopped_in = time.monotonic() - stopping
    logs = podman("logs", name)
    assert exit_code == "0", logs.stdout + logs.stderr
    assert stopped_in < 10
    assert token not in logs.stdout + logs.stderr
    assert podman("ps", "--quiet", "--filter", f"name={name}").stdout.strip() == ""
    print(
        f"container: cold start to /ping {cold_start_s:.1f} s, SIGTERM to exit {stopped_in:.1f} s"
    )
