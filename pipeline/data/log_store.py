"""Where the serving inference log keeps its Parquet files: a local folder or an S3 prefix. The
server's writer (registry/inference_log.py) stores files here and `monitor` reads them back; a
file's name starts with the UTC time it was written, so names sort oldest first."""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path
from urllib.parse import urlparse

FILE_PREFIX = "inference-"
LOG_FILES = f"{FILE_PREFIX}*.parquet"


class LocalFolder:
    """Parquet files in one folder, written whole (a temporary name, then a rename), the oldest
    removed while the folder holds more than `max_bytes`."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder, self.max_bytes = folder, max_bytes

    def write(self, name: str, data: bytes) -> int:
        """Store one file; how many of the stored files the cap then removed."""
        self.folder.mkdir(parents=True, exist_ok=True)
        partial = self.folder / f".{name}.partial"
        try:
            partial.write_bytes(data)
            os.replace(partial, self.folder / name)
        except OSError:
            partial.unlink(missing_ok=True)
            raise
        return self.trim()

    def names(self) -> list[str]:
        return sorted(path.name for path in self.folder.glob(LOG_FILES))

    def read(self, name: str) -> bytes:
        return (self.folder / name).read_bytes()

    def trim(self) -> int:
        files = sorted(self.folder.glob(LOG_FILES))
        sizes = [path.stat().st_size for path in files]
        removed, total = 0, sum(sizes)
        while files and total > self.max_bytes:
            total -= sizes.pop(0)
            files.pop(0).unlink(missing_ok=True)
            removed += 1
        return removed

    def __str__(self) -> str:
        return str(self.folder)


class S3Prefix:
    """Parquet objects under s3://bucket/prefix; the endpoint comes from MLFLOW_S3_ENDPOINT_URL
    or AWS_ENDPOINT_URL, as for MLflow's artifacts. Short timeouts and no retries: during an outage
    a file is given up after seconds (its rows counted), and the next one tries again."""

    def __init__(self, url: str) -> None:
        import boto3
        from botocore.config import Config

        parsed = urlparse(url)
        self.bucket, self.prefix, self.url = parsed.netloc, parsed.path.strip("/"), url
        endpoint = os.environ.get("MLFLOW_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint or None,
            config=Config(connect_timeout=2, read_timeout=5, retries={"max_attempts": 1}),
        )

    def write(self, name: str, data: bytes) -> int:
        key = f"{self.prefix}/{name}" if self.prefix else name
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data)
        return 0

    def names(self) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=f"{self.prefix}/" if self.prefix else ""
        )
        found = (
            item["Key"].rsplit("/", 1)[-1] for page in pages for item in page.get("Contents", [])
        )
        return sorted(name for name in found if fnmatch.fnmatch(name, LOG_FILES))

    def read(self, name: str) -> bytes:
        key = f"{self.prefix}/{name}" if self.prefix else name
        return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def __str__(self) -> str:
        return self.url


def open_store(destination: str, max_bytes: int = 2**62) -> LocalFolder | S3Prefix:
    """A folder, or an s3://bucket/prefix."""
    if destination.startswith("s3://"):
        return S3Prefix(destination)
    return LocalFolder(Path(destination).expanduser(), max_bytes)
