"""Starting `mlflow models serve` for a registered model, and knowing when it answers."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request

from pipeline.config import ServeConfig


def serve_command(model_uri: str, host: str, port: int | str, workers: int | str = 1) -> list[str]:
    return [
        "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
        "--host", host, "--port", str(port), "--workers", str(workers),
    ]  # fmt: skip


def run_serve(config: ServeConfig) -> None:
    """The `serve` entry point: `mlflow models serve` in the foreground, exiting with its code."""
    command = serve_command(config.model_uri, config.host, config.port, config.workers)
    sys.exit(subprocess.call(command))


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
