"""The team set-up on one machine: an MLflow tracking server with a PostgreSQL backend store, an S3
artifact store reached through boto3, and MLflow's basic-auth app in front.

Locally the S3 side is a `moto` server on loopback; pointing at a real S3 or MinIO is a matter of
MLFLOW_S3_ENDPOINT_URL and the usual AWS_* variables, not of code.

    python -m scripts.team_stack up      # start everything, print the client environment
    python -m scripts.team_stack down    # stop what `up` started

Settings come from environment variables (defaults in brackets): TEAM_POSTGRES_URL
[postgresql://postgres@127.0.0.1:5432], TEAM_DATABASE [mlflow], TEAM_AUTH_DATABASE [mlflow_auth],
TEAM_BUCKET [cifar10-mlflow], TEAM_PORT [5000], TEAM_S3_PORT [5005, moto only], TEAM_USE_MOTO [true],
MLFLOW_AUTH_ADMIN_PASSWORD [generated and printed once], MLFLOW_FLASK_SERVER_SECRET_KEY
[generated once into the state dir], TEAM_STATE_DIR [.team-stack].
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import boto3
import psycopg


def env_flag(name: str, default: str) -> bool:
    return os.environ.get(name, default).lower() in ("1", "true", "yes")


@dataclass
class StackSettings:
    postgres_url: str = field(
        default_factory=lambda: os.environ.get(
            "TEAM_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432"
        )
    )
    database: str = field(default_factory=lambda: os.environ.get("TEAM_DATABASE", "mlflow"))
    auth_database: str = field(
        default_factory=lambda: os.environ.get("TEAM_AUTH_DATABASE", "mlflow_auth")
    )
    bucket: str = field(default_factory=lambda: os.environ.get("TEAM_BUCKET", "cifar10-mlflow"))
    host: str = "127.0.0.1"
    port: int = field(default_factory=lambda: int(os.environ.get("TEAM_PORT", "5000")))
    s3_port: int = field(default_factory=lambda: int(os.environ.get("TEAM_S3_PORT", "5005")))
    use_moto: bool = field(default_factory=lambda: env_flag("TEAM_USE_MOTO", "true"))
    admin_password: str = field(
        default_factory=lambda: (
            os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD") or secrets.token_urlsafe(12)
        )
    )
    state_dir: Path = field(
        default_factory=lambda: Path(os.environ.get("TEAM_STATE_DIR", ".team-stack"))
    )

    @property
    def tracking_uri(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def s3_endpoint(self) -> str | None:
        if self.use_moto:
            return f"http://{self.host}:{self.s3_port}"
        return os.environ.get("MLFLOW_S3_ENDPOINT_URL")

    def database_url(self, name: str) -> str:
        return f"{self.postgres_url.rstrip('/')}/{name}"


def ensure_database(settings: StackSettings, name: str) -> None:
    with psycopg.connect(settings.database_url("postgres"), autocommit=True) as connection:
        exists = connection.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (name,)
        ).fetchone()
        if not exists:
            connection.execute(f'CREATE DATABASE "{name}"')


def s3_env(settings: StackSettings) -> dict[str, str]:
    """What boto3 needs: moto accepts any keys; a real store takes the caller's AWS_* settings."""
    env = {}
    if settings.use_moto:
        env |= {
            "AWS_ACCESS_KEY_ID": "moto",
            "AWS_SECRET_ACCESS_KEY": "moto",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    if settings.s3_endpoint:
        env["MLFLOW_S3_ENDPOINT_URL"] = settings.s3_endpoint
    return env


def s3_client(settings: StackSettings):
    env = s3_env(settings)
    return boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint,
        aws_access_key_id=env.get("AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY"),
        region_name=env.get("AWS_DEFAULT_REGION"),
    )


def wait_for(url: str, timeout: float, process: subprocess.Popen, log: Path) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"{process.args[0]} exited early; log: {log}\n{log.read_text()[-3000:]}"
            )
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s; log: {log}")


def launch(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        command,
        env=os.environ | env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def write_auth_config(settings: StackSettings) -> Path:
    path = settings.state_dir / "basic_auth.ini"
    path.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = {settings.database_url(settings.auth_database)}\n"
        "admin_username = admin\n"
        f"admin_password = {settings.admin_password}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    path.chmod(0o600)
    return path


def flask_secret(settings: StackSettings) -> str:
    """The CSRF secret of the auth app: MLFLOW_FLASK_SERVER_SECRET_KEY, else one kept in state_dir
    so that restarts (and several servers sharing that folder) agree."""
    if key := os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY"):
        return key
    path = settings.state_dir / "flask_secret"
    if not path.is_file():
        path.write_text(secrets.token_hex(32))
        path.chmod(0o600)
    return path.read_text()


def up(settings: StackSettings) -> dict[str, str]:
    """Start moto (if used) and the tracking server; return the environment clients need."""
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    processes = {}
    if settings.use_moto:
        log = settings.state_dir / "moto.log"
        moto = launch(
            [sys.executable, "-m", "moto.server", "-H", settings.host, "-p", str(settings.s3_port)],
            {},
            log,
        )
        processes["moto"] = moto.pid
        wait_for(settings.s3_endpoint, 60, moto, log)
    client = s3_client(settings)
    if settings.bucket not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
        client.create_bucket(Bucket=settings.bucket)
    for name in (settings.database, settings.auth_database):
        ensure_database(settings, name)
    log = settings.state_dir / "mlflow-server.log"
    server = launch(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            settings.database_url(settings.database),
            "--artifacts-destination",
            f"s3://{settings.bucket}",
            "--app-name",
            "basic-auth",
            "--host",
            settings.host,
            "--port",
            str(settings.port),
        ],  # fmt: skip
        s3_env(settings)
        | {
            "MLFLOW_AUTH_CONFIG_PATH": str(write_auth_config(settings)),
            "MLFLOW_FLASK_SERVER_SECRET_KEY": flask_secret(settings),
        },
        log,
    )
    processes["mlflow"] = server.pid
    (settings.state_dir / "pids.json").write_text(json.dumps(processes))
    wait_for(f"{settings.tracking_uri}/health", 180, server, log)
    return client_env(settings, "admin", settings.admin_password)


def client_env(settings: StackSettings, username: str, password: str) -> dict[str, str]:
    """All a client sets: the server and its credentials (artifacts go through the server)."""
    return {
        "MLFLOW_TRACKING_URI": settings.tracking_uri,
        "MLFLOW_TRACKING_USERNAME": username,
        "MLFLOW_TRACKING_PASSWORD": password,
    }


def down(settings: StackSettings) -> None:
    pids = settings.state_dir / "pids.json"
    if not pids.is_file():
        return
    for pid in json.loads(pids.read_text()).values():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
    pids.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("action", choices=("up", "down"))
    args = parser.parse_args()
    settings = StackSettings()
    if args.action == "down":
        down(settings)
        return
    env = up(settings)
    print(
        json.dumps(
            {k: v for k, v in asdict(settings).items() if k != "state_dir"}, indent=2, default=str
        )
    )
    print("# Client environment:")
    for key, value in env.items():
        print(f"export {key}={value}")


if __name__ == "__main__":
    main()
