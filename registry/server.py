"""Serving a registered model: the hardened server (`serve` entry point) or plain
`mlflow models serve`, and knowing when either answers."""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

from pipeline.config import ConfigError, ServeConfig
from pipeline.errors import in_users_form
from pipeline.model.drift import FIRST_IMAGES, OLD_REFERENCE_NOTE
from registry.worker import TOKEN_ENV, WorkerSettings


def serve_command(model_uri: str, host: str, port: int | str, workers: int | str = 1) -> list[str]:
    """Plain `mlflow models serve`, without this project's layer (for comparison and tests)."""
    return [
        "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
        "--host", host, "--port", str(port), "--workers", str(workers),
    ]  # fmt: skip


def hardened_command(model_uri: str, port: int | str, *options: str) -> list[str]:
    """The `serve` entry point on loopback, as `python -m` arguments."""
    return ["pipeline.cli", "serve", "--model-uri", model_uri, "--port", str(port), *options]


def read_token(config: ServeConfig) -> str | None:
    """The bearer token: CIFAR10_SERVE_TOKEN, else the first line of `token_file`, else none."""
    if token := os.environ.get(TOKEN_ENV, "").strip():
        return token
    if not config.token_file:
        return None
    path = Path(config.token_file).expanduser()
    try:
        token = path.read_text().strip()
    except OSError as error:
        raise ConfigError(
            f"token_file {path} cannot be read ({error.strerror}); write the token into it, "
            f"e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))' > {path}`."
        ) from None
    if not token:
        raise ConfigError(f"token_file {path} is empty; write the token into it.")
    return token


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(config: ServeConfig, token: str | None) -> None:
    """Refuse to open a port beyond this machine to anyone without a token, unless told to."""
    if token or is_loopback(config.host) or config.allow_unauthenticated:
        return
    raise ConfigError(
        f"host {config.host} is reachable from other machines, and no token is set: anyone who "
        f"reaches port {config.port} could use the model. Set {TOKEN_ENV} or -P token_file=..., "
        "or pass -P allow_unauthenticated=true if something in front of this server already "
        "checks who calls it."
    )


def check_port(host: str, port: int) -> None:
    """Refuse a port already taken, before seconds of loading the model, naming who holds it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
            return
        except OSError as error:
            problem = error.strerror or str(error)
    holders = []
    try:
        for connection in psutil.net_connections(kind="inet"):
            listening = connection.status == psutil.CONN_LISTEN and connection.pid
            if listening and connection.laddr and connection.laddr.port == port:
                process = psutil.Process(connection.pid)
                holders.append(f"pid {connection.pid} ({' '.join(process.cmdline())[:80]})")
    except (psutil.Error, OSError):
        pass
    who = (
        f"in use by {', '.join(sorted(set(holders)))}" if holders else f"not available ({problem})"
    )
    raise ConfigError(
        f"port {port} on {host} is {who}. Pass another port (-P port={port + 1}, or --port "
        f"{port + 1}), or stop what holds it."
    )


def local_model(model_uri: str) -> str:
    """Download the model once, before any worker starts (each would otherwise fetch it)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.artifacts.download_artifacts(artifact_uri=model_uri)
    except MlflowException as error:
        raise ConfigError(
            f"no model at {model_uri} ({error.message.splitlines()[0]}); promote one first "
            "(`mlflow run . -e promote`) or pass -P model_uri=runs:/<run id>/model."
        ) from None


def run_serve(config: ServeConfig) -> None:
    """The `serve` entry point: MLflow's scoring app behind registry/gateway.py under uvicorn,
    each worker built by registry/worker.py from the settings decided here."""
    import uvicorn

    token = read_token(config)
    check_exposure(config, token)
    check_port(config.host, config.port)
    model_path = local_model(config.model_uri)
    card = model_card(config.model_uri, model_path, config.served_name)
    if config.drift_window and card.get("reference_sampling") == FIRST_IMAGES:
        note = OLD_REFERENCE_NOTE.format(model=config.model_uri, how=FIRST_IMAGES)
        print(in_users_form(note), file=sys.stderr, flush=True)
    worker = WorkerSettings(
        model_path=model_path,
        card=card,
        timeout_s=config.timeout_s,
        max_body_bytes=int(config.max_body_mb * 2**20),
        max_json_depth=config.max_json_depth,
        max_inflight=config.max_inflight,
        pyfunc_config={
            "max_batch_images": config.max_batch_images,
            "batch_wait_ms": config.batch_wait_ms,
            "drift_window": config.drift_window,
        },
        inference_log=inference_log_settings(config),
    )
    os.environ.update(worker.environment())
    if token:
        os.environ[TOKEN_ENV] = token
    os.environ["MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"] = str(config.timeout_s)
    if threads := threads_per_worker(config.workers):
        os.environ["OMP_NUM_THREADS"] = str(threads)  # read by torch in each worker it starts
    metrics_dir = None
    if config.workers > 1 and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        metrics_dir = tempfile.mkdtemp(prefix="cifar10-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    print(serving_line(config, card, token), file=sys.stderr, flush=True)
    try:
        uvicorn.run(
            "registry.worker:app_from_environment",
            factory=True,
            host=config.host,
            port=config.port,
            workers=config.workers,
            timeout_keep_alive=5,
        )
    finally:
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    print(
        f"serve: stopped; every open request was answered before the server closed "
        f"(http://{config.host}:{config.port})",
        file=sys.stderr,
        flush=True,
    )


def inference_log_settings(config: ServeConfig) -> dict | None:
    """The log's settings for each worker, once a local folder is known to take files."""
    if not config.inference_log:
        return None
    from registry.inference_log import InferenceLogSettings

    destination = config.inference_log
    if not destination.startswith("s3://"):
        folder = Path(destination).expanduser().resolve()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
                pass
        except OSError as error:
            raise ConfigError(
                f"inference_log folder {folder} cannot take files ({error.strerror}); give "
                "-P inference_log a folder this user can write, or an s3://bucket/prefix."
            ) from None
        destination = str(folder)
    return dataclasses.asdict(
        InferenceLogSettings(
            destination,
            sample=config.log_sample,
            log_images=config.log_images,
            max_image_kb=config.log_max_image_kb,
            rotate_rows=config.log_rotate_rows,
            rotate_s=config.log_rotate_s,
            max_mb=config.log_max_mb,
        )
    )


def model_card(model_uri: str, model_path: str, name: str = "") -> dict:
    """What the page shows and the v2 routes are named by: the registered name, version and alias
    (where the URI names them), architecture, accuracies, training data and when it was trained,
    and the run's address in the MLflow UI when the tracking server is one."""
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    logged = Model.load(model_path)
    card = {
        "name": name or "cifar10",
        "version": "1",
        "alias": None,
        "registered_name": None,
        "model_uri": model_uri,
        "architecture": logged.metadata.get("architecture", "unknown architecture"),
        "class_names": list(logged.metadata.get("class_names", [])),
        "run_id": logged.run_id,
        "run_url": None,
    }
    reference = logged.metadata.get("drift_reference")
    if reference is not None:  # models logged before the sampling was recorded took the first
        card["reference_sampling"] = reference.get("sampling", FIRST_IMAGES)
    if not tracking_store_exists():
        return card  # a container's baked model: no store to ask, the card is what the model holds
    # A model outside any registry still serves; its card shows what the model holds.
    with contextlib.suppress(MlflowException):
        card_from_tracking(card, model_uri, name)
    return card


def card_from_tracking(card: dict, model_uri: str, name: str) -> None:
    """Fill `card` from the registry (name, version, alias) and the training run (accuracies,
    data, when it was trained, its address in the MLflow UI)."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    if match := re.fullmatch(r"models:/([^@/]+)@(.+)", model_uri):
        version = client.get_model_version_by_alias(*match.groups())
        card["alias"] = match.group(2)
    elif match := re.fullmatch(r"models:/([^@/]+)/(\d+)", model_uri):
        version = client.get_model_version(*match.groups())
    else:
        version = None
    if version is not None:
        card.update(registered_name=version.name, version=str(version.version))
        card["name"] = name or version.name
        card["run_id"] = version.run_id or card["run_id"]
    if not card["run_id"]:
        return
    run = client.get_run(card["run_id"])
    metrics, tags = run.data.metrics, run.data.tags
    card.update(
        val_accuracy=metrics.get("best_val_accuracy"),
        test_accuracy=metrics.get("test_accuracy"),
        train_images=metrics.get("train_images"),
        data=tags.get("data_source"),
        data_digest=tags.get("lineage.data.train"),
        trained=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(run.info.start_time / 1000)),
    )
    tracking = mlflow.get_tracking_uri()
    if tracking.startswith(("http://", "https://")):
        card["run_url"] = (
            f"{tracking.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
        )


def tracking_store_exists() -> bool:
    """False where the tracking URI is a local SQLite file that is not there (MLflow would make
    one, or retry for a minute on a read-only filesystem); any other store is asked."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    if not uri.startswith("sqlite:///"):
        return True
    return Path(uri.removeprefix("sqlite:///")).is_file()


def serving_line(config: ServeConfig, card: dict, token: str | None) -> str:
    """What the server says on start: which model (registered name, version and alias where the
    URI names them), its architecture, whether a token is needed, and where to call it."""
    what = config.model_uri
    if card["registered_name"]:
        alias = f" (alias {card['alias']})" if card["alias"] else ""
        what = f"{card['registered_name']} version {card['version']}{alias}"
    base = f"http://{config.host}:{config.port}"
    threads = os.environ.get("OMP_NUM_THREADS")
    each = f", {threads} torch thread{'s' * (threads != '1')} each" if threads else ""
    return (
        f"serving {what}, {card['architecture']}, at {base}/invocations, "
        f"{base}/v2/models/{card['name']}/infer and the page {base}/; token "
        f"{'required' if token else 'not required (loopback only)'}; metrics at {base}/metrics; "
        f"{config.workers} worker{'s' * (config.workers != 1)}{each}"
    )


def cpu_quota() -> int | None:
    """A container's CPU quota in whole cores (cgroup v2 `cpu.max`, at least 1), which torch's own
    thread count does not see; None without one."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
    except (OSError, ValueError):
        return None
    return None if quota == "max" else max(1, int(quota) // int(period))


def threads_per_worker(workers: int) -> int | None:
    """Torch threads for each worker process: its share of the cores it may use (its CPU affinity,
    lowered by a container's quota). N workers that each start an OpenMP team as large as the
    machine wait on each other's threads, and in a container torch counts the node's cores, not
    the quota (benchmarks/RESULTS.md, Serving near the limit). None: torch's own default serves
    (one worker with the whole machine), or the user set OMP_NUM_THREADS."""
    if "OMP_NUM_THREADS" in os.environ:
        return None
    affinity, quota = len(os.sched_getaffinity(0)), cpu_quota()
    cores = min(affinity, quota) if quota else affinity
    if workers == 1 and cores == affinity:
        return None
    return max(1, cores // workers)


def wait_until_serving(base_url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    """Poll /ping until the server answers; fail early if the process died."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{base_url}/ping", timeout=2)
            return
        except OSError:
            if process.poll() is not None:
                raise RuntimeError(
                    f"the model server exited with code {process.returncode}"
                ) from None
            time.sleep(0.5)
    raise TimeoutError(f"{base_url} did not answer /ping within {timeout:.0f} s")
