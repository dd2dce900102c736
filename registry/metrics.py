"""The server's Prometheus metrics: requests by route and status, refusals by reason, what the
model answered (classes, confidence, images per call), the inference log's counters and, read at
each scrape, the drift of recent images from the training reference."""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily

from pipeline.model.drift import MIN_WINDOW, DriftWindow
from registry.inference_log import LogCounters

# An answer whose top class has less than this probability counts as low-confidence on /metrics.
LOW_CONFIDENCE = 0.5
IMAGE_COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
CONFIDENCE_BUCKETS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


class ServerMetrics:
    """The counters behind /metrics. With several uvicorn workers (PROMETHEUS_MULTIPROC_DIR set),
    every worker writes its values to that folder and /metrics adds them up."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        multiprocess = "PROMETHEUS_MULTIPROC_DIR" in os.environ
        own = None if multiprocess else self.registry
        if multiprocess:
            from prometheus_client.multiprocess import MultiProcessCollector

            MultiProcessCollector(self.registry)
        self.declare_requests(own)
        self.declare_answers(own)
        self.inference_log = LogCounters(
            Counter(
                "cifar10_inference_log_rows", "Rows written to the inference log", registry=own
            ),
            Counter(
                "cifar10_inference_log_dropped_rows",
                "Inference-log rows not written, by reason (queue_full, write_failed)",
                ["reason"],
                registry=own,
            ),
            Counter(
                "cifar10_inference_log_removed_files",
                "Oldest inference-log files removed to keep the folder under its cap",
                registry=own,
            ),
        )

    def declare_requests(self, own: CollectorRegistry | None) -> None:
        """Requests by route and status, their time, refusals, and those in flight."""
        self.requests = Counter(
            "cifar10_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=own,
        )
        self.latency = Histogram(
            "cifar10_request_seconds",
            "Time from the request's arrival to the end of its answer",
            ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=own,
        )
        self.rejected = Counter(
            "cifar10_rejected_requests", "Requests refused by the layer", ["reason"], registry=own
        )
        self.inflight = Gauge(
            "cifar10_inflight_requests",
            "Scoring requests being answered now",
            registry=own,
            multiprocess_mode="livesum",
        )

    def declare_answers(self, own: CollectorRegistry | None) -> None:
        """Images per request and per model call, and what the model answered."""
        self.images = Histogram(
            "cifar10_images_per_request",
            "Images in each accepted /invocations request",
            buckets=IMAGE_COUNT_BUCKETS,
            registry=own,
        )
        self.call_images = Histogram(
            "cifar10_model_call_images",
            "Images in each call of the served model (requests that wait together share one)",
            buckets=IMAGE_COUNT_BUCKETS,
            registry=own,
        )
        self.predictions = Counter(
            "cifar10_predictions", "Images answered, by predicted class", ["class"], registry=own
        )
        self.confidence = Histogram(
            "cifar10_prediction_confidence",
            "Probability of the predicted class, per answered image",
            buckets=CONFIDENCE_BUCKETS,
            registry=own,
        )
        self.low_confidence = Counter(
            "cifar10_low_confidence_predictions",
            f"Answered images whose predicted class has a probability below {LOW_CONFIDENCE}",
            registry=own,
        )

    def watch_drift(self, window: DriftWindow) -> None:
        """Test the model's window of recent images against its training reference at each scrape."""
        self.registry.register(DriftCollector(window))

    def observe_answers(self, result: Any, class_names: list[str]) -> None:
        """What the model answered, per scored image (a row that failed to decode has label -1)."""
        for label, probabilities in zip(result["label"], result["probabilities"], strict=True):
            if label < 0:
                continue
            top = float(np.max(probabilities))
            self.predictions.labels(class_names[label]).inc()
            self.confidence.observe(top)
            if top < LOW_CONFIDENCE:
                self.low_confidence.inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class DriftCollector:
    """Drift gauges computed when /metrics is read (a 200-image test takes ~10 ms, so requests
    never wait for it). With several workers each tests its own window and a scrape sees one."""

    def __init__(self, window: DriftWindow) -> None:
        self.window = window

    def collect(self):
        window = self.window
        reference = InfoMetricFamily(
            "cifar10_drift_reference", "The training reference recent images are compared with"
        )
        reference.add_metric([], {"digest": window.reference.digest, "window": str(window.size),
                                  "alpha": f"{window.alpha:g}"})  # fmt: skip
        yield reference
        yield GaugeMetricFamily(
            "cifar10_drift_window_images", "Recent images in the drift window", value=len(window)
        )
        if len(window) < MIN_WINDOW:
            return
        result = window.test()
        p_values = GaugeMetricFamily(
            "cifar10_drift_p_value", "KS test p-value per image statistic", labels=["statistic"]
        )
        distances = GaugeMetricFamily(
            "cifar10_drift_ks_statistic", "KS distance per image statistic", labels=["statistic"]
        )
        for name in result.p_values:
            p_values.add_metric([name], result.p_values[name])
            distances.add_metric([name], result.statistics[name])
        yield p_values
        yield distances
        yield GaugeMetricFamily(
            "cifar10_drift_combined_p_value",
            "Bonferroni-combined p-value of the statistics; drift below alpha",
            value=result.p_value,
        )
        yield GaugeMetricFamily(
            "cifar10_drift_detected",
            "1 while recent images differ from the training reference at alpha",
            value=float(result.drift),
        )


def observe_model(model: Any, metrics: ServerMetrics, class_names: list[str]) -> None:
    """Count every answer of this loaded model on /metrics, whichever route asked: MLflow's
    /invocations and the v2 / v1 routes all call this one object's `predict`."""
    predict = model.predict

    @functools.wraps(predict)
    def observed(data: Any, params: dict[str, Any] | None = None) -> Any:
        metrics.call_images.observe(len(data))
        result = predict(data, params=params)
        metrics.observe_answers(result, class_names)
        return result

    model.predict = observed
