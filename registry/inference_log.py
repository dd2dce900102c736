"""The inference log: a sampled share of the answered images, as rotating Parquet files in a folder
or under an S3 prefix, to audit answers, to feed `monitor` and to retrain from.

A request only puts its rows on a bounded queue (`put_nowait`); one writer thread per server
process turns them into a Parquet file every `rotate_rows` rows or `rotate_s` seconds. A full
queue, a full or unwritable disk and an unreachable store therefore never fail or slow a request:
the rows they cost are counted (`cifar10_inference_log_dropped_rows_total{reason}` on /metrics)
and the server log says so once per outage, not once per request. A local folder is kept under
`max_mb` by deleting its oldest files; an S3 prefix is left to the bucket's lifecycle rules.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pandas as pd

from pipeline.data.log_store import FILE_PREFIX, open_store
from pipeline.model.classifier import Observation
from pipeline.model.drift import FEATURES

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LogCounters:
    """The /metrics counters of the log (prometheus_client Counters, made by ServerMetrics): rows
    written, rows dropped by reason (`queue_full`, `write_failed`), files removed by the cap."""

    written: Any
    dropped: Any
    removed_files: Any


@dataclass(frozen=True)
class InferenceLogSettings:
    destination: str  # a folder, or s3://bucket/prefix
    sample: float = 1.0
    log_images: bool = False
    max_image_kb: float = 64.0
    rotate_rows: int = 1000
    rotate_s: float = 60.0
    max_mb: float = 1024.0
    queue_rows: int = 10_000


class InferenceLog:
    """Rows in, Parquet files out, on a thread of its own; `observe` is a classifier observer.
    `request_id(row)`: the id of the request that sent row `row` of the observed call (one call
    can score the images of several requests: registry/batching.py)."""

    def __init__(
        self,
        settings: InferenceLogSettings,
        model_name: str,
        model_version: str,
        request_id: Callable[[int], str],
        counters: LogCounters,
    ) -> None:
        self.settings = settings
        self.store = open_store(settings.destination, int(settings.max_mb * 2**20))
        self.model_name, self.model_version = model_name, model_version
        self.request_id, self.counters = request_id, counters
        self.rows: queue.Queue[dict[str, Any] | None] = queue.Queue(settings.queue_rows)
        self.failing = False
        self.files = 0
        self.writer = threading.Thread(target=self.write_forever, name="inference-log", daemon=True)
        self.writer.start()

    def observe(self, seen: Observation) -> None:
        """Queue the sampled rows of one answer; never blocks, never raises on a full queue."""
        scored = seen.result.index[seen.result["label"].to_numpy() >= 0]
        now = datetime.now(timezone.utc)
        for position, row in enumerate(scored):
            if self.settings.sample < 1.0 and random.random() >= self.settings.sample:
                continue
            record = self.record(seen, row, position, now, self.request_id(row))
            try:
                self.rows.put_nowait(record)
            except queue.Full:
                self.counters.dropped.labels("queue_full").inc()

    def record(
        self, seen: Observation, row: int, position: int, now: datetime, request_id: str
    ) -> dict[str, Any]:
        raw = seen.encoded[position]
        probabilities = np.asarray(seen.result["probabilities"].iloc[row], dtype=np.float64)
        top_two = np.sort(probabilities)[-2:]
        keep_image = self.settings.log_images and len(raw) <= self.settings.max_image_kb * 1024
        return {
            "time": now,
            "request_id": request_id,
            "model_name": self.model_name,
            "model_version": self.model_version,
            "image_sha256": hashlib.sha256(raw).hexdigest(),
            "image_bytes": len(raw),
            **{
                name: float(value)
                for name, value in zip(FEATURES, seen.features[position], strict=True)
            },
            "label": int(seen.result["label"].iloc[row]),
            "class_name": seen.result["class_name"].iloc[row],
            "confidence": float(seen.confidence[position]),
            "margin": float(top_two[-1] - top_two[0]),
            "entropy": float(-(probabilities * np.log(np.clip(probabilities, 1e-12, 1))).sum()),
            "probabilities": probabilities.tolist(),
            "latency_ms": seen.seconds * 1000,
            "image": raw if keep_image else None,
        }

    def write_forever(self) -> None:
        pending: list[dict[str, Any]] = []
        deadline = float("inf")
        while True:
            wait = min(max(0.0, deadline - time.monotonic()), 1.0)
            try:
                row = self.rows.get(timeout=wait)
            except queue.Empty:
                row = {}
            if row is None:  # close()
                self.flush(pending)
                return
            if row:
                if not pending:
                    deadline = time.monotonic() + self.settings.rotate_s
                pending.append(row)
            if pending and (
                len(pending) >= self.settings.rotate_rows or time.monotonic() >= deadline
            ):
                self.flush(pending)
                pending, deadline = [], float("inf")

    def flush(self, rows: list[dict[str, Any]]) -> None:
        """One Parquet file of `rows`; a failure costs these rows (counted), not the server."""
        if not rows:
            return
        self.files += 1
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        name = f"{FILE_PREFIX}{stamp}-{os.getpid()}-{self.files:06d}.parquet"
        try:
            buffer = io.BytesIO()
            pd.DataFrame(rows).to_parquet(buffer, index=False)
            removed = self.store.write(name, buffer.getvalue())
        except Exception as error:  # a full disk, a refused folder, an S3 outage, ...
            self.counters.dropped.labels("write_failed").inc(len(rows))
            if not self.failing:
                logger.warning(
                    "inference log: cannot write to %s (%s); rows are dropped and counted "
                    "until it works again",
                    self.store,
                    str(error).splitlines()[0][:200] if str(error) else type(error).__name__,
                )
            self.failing = True
            return
        if self.failing:
            logger.warning("inference log: writing to %s works again", self.store)
        self.failing = False
        self.counters.written.inc(len(rows))
        self.counters.removed_files.inc(removed)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued and stop the writer."""
        self.rows.put(None)
        self.writer.join(timeout)
