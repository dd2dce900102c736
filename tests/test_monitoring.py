"""The alert rules and the dashboard: checked and unit-tested by Prometheus's own promtool, a broken
rule refused by the same check, and every metric they use one the server really exports."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.model.drift import DriftWindow, Reference
from registry.metrics import ServerMetrics

MONITORING = Path(__file__).resolve().parents[1] / "deploy" / "monitoring"
ALERTS = MONITORING / "alerts.yaml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
METRIC_NAME = re.compile(r"\b(cifar10_[a-z_]+|cifar10:[a-z_0-9:]+|up)\b(?!\s*\()")

needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool is not installed (.ci/run installs Debian's prometheus package, which has it)",
)


def promtool(*args: str, cwd: Path = MONITORING) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["promtool", *args], capture_output=True, text=True, cwd=cwd, timeout=60, check=False
    )


@needs_promtool
def test_the_alert_rules_pass_promtool_and_fire_on_the_series_they_are_for():
    checked = promtool("check", "rules", ALERTS.name)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", "alerts_test.yaml")
    assert tested.returncode == 0, tested.stdout + tested.stderr


@needs_promtool
@pytest.mark.parametrize(
    "breakage",
    [
        ("expr", "sum(rate(cifar10_predictions_total[15m])"),  # unbalanced parenthesis
        ("for", "half an hour"),
        ("alert", None),  # a rule with neither alert nor record
    ],
)
def test_a_broken_rule_is_refused_by_the_same_check(tmp_path, breakage):
    key, value = breakage
    rules = yaml.safe_load(ALERTS.read_text())
    rule = next(r for r in rules["groups"][0]["rules"] if r.get("alert") == "Cifar10LowConfidence")
    if value is None:
        del rule[key]
    else:
        rule[key] = value
    (tmp_path / "alerts.yaml").write_text(yaml.safe_dump(rules))
    checked = promtool("check", "rules", "alerts.yaml", cwd=tmp_path)
    assert checked.returncode != 0
    assert "FAILED" in checked.stdout + checked.stderr


def exported_names() -> set[str]:
    """The series names a fresh server's /metrics can hold (histograms as _bucket/_count/_sum)."""
    metrics = ServerMetrics()
    metrics.requests.labels("/invocations", "200").inc()
    metrics.latency.labels("/invocations").observe(0.01)
    metrics.rejected.labels("no_token").inc()
    metrics.predictions.labels("cat").inc()
    metrics.inference_log.dropped.labels("write_failed").inc()
    rng = np.random.default_rng(0)
    window = DriftWindow(Reference(rng.random((100, 8), dtype=np.float32)), size=20)
    window.add(rng.random((20, 8), dtype=np.float32))
    metrics.watch_drift(window)
    text = metrics.exposition().decode()
    return {line.split("{")[0].split()[0] for line in text.splitlines() if line[:1] not in "#"}


def test_the_rules_and_the_dashboard_use_only_metrics_the_server_exports():
    rules = yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]
    recorded = {r["record"] for r in rules if "record" in r}
    known = exported_names() | recorded | {"up"}
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [r["expr"] for r in rules] + [
        target["expr"] for panel in dashboard["panels"] for target in panel["targets"]
    ]
    used = {name for expr in expressions for name in METRIC_NAME.findall(expr)}
    assert used - known == set()
    assert {"cifar10_predictions_total", "cifar10_prediction_confidence_bucket",
            "cifar10_low_confidence_predictions_total", "cifar10_drift_detected",
            "cifar10_drift_ks_statistic", "cifar10_inference_log_dropped_rows_total"} <= used  # fmt: skip
    alerts = {r["alert"] for r in rules if "alert" in r}
    assert {"Cifar10ErrorRate", "Cifar10SlowAnswers", "Cifar10LowConfidence",
            "Cifar10InputDrift", "Cifar10InferenceLogDropping"} <= alerts  # fmt: skip
    assert all(r["annotations"]["description"] for r in rules if "alert" in r)
