"""Prometheus configuration and alert rules: valid for promtool, unit-tested, and about metrics that exist."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from synthwatch.producers.metrics import PublisherMetrics
from synthwatch.stream_apps.runtime.metrics import WorkerMetrics, metric_names

PROMETHEUS = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
RULE_FILES = sorted((PROMETHEUS / "rules").glob("*.yml"))
TEST_FILES = sorted((PROMETHEUS / "tests").glob("*.yml"))
needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, cwd=PROMETHEUS, timeout=120)


@needs_promtool
def test_rules_pass_promtool_check() -> None:
    done = _promtool("check", "rules", *map(str, RULE_FILES))
    assert done.returncode == 0, done.stdout + done.stderr


@needs_promtool
def test_prometheus_config_passes_promtool_check() -> None:
    done = _promtool("check", "config", "prometheus.yml")
    assert done.returncode == 0, done.stdout + done.stderr


@needs_promtool
def test_rule_unit_tests_pass() -> None:
    assert TEST_FILES
    done = _promtool("test", "rules", *map(str, TEST_FILES))
    assert done.returncode == 0, done.stdout + done.stderr


def _rules() -> list[dict[str, object]]:
    return [
        rule for path in RULE_FILES for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]
    ]


def test_required_alerts_exist_with_severity_and_text() -> None:
    alerts = {str(r["alert"]): r for r in _rules() if "alert" in r}
    for name in (
        "SynthwatchConsumerLagGrowing",
        "SynthwatchHighRejectRate",
        "SynthwatchNoInput",
        "SynthwatchSinkFailing",
    ):
        assert name in alerts
    for name, rule in alerts.items():
        labels = rule.get("labels")
        annotations = rule.get("annotations")
        assert isinstance(labels, dict) and labels.get("severity") in ("critical", "warning"), name
        assert isinstance(annotations, dict) and {"summary", "description"} <= set(annotations), name


def test_every_alert_has_a_unit_test() -> None:
    tested = {
        case["alertname"]
        for path in TEST_FILES
        for test in yaml.safe_load(path.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert {str(r["alert"]) for r in _rules() if "alert" in r} <= tested


def test_rules_use_metrics_the_code_exports() -> None:
    known = metric_names(WorkerMetrics().registry) | metric_names(PublisherMetrics().registry) | {"up"}
    recorded = {str(r["record"]) for r in _rules() if "record" in r}
    for rule in _rules():
        used = set(re.findall(r"\b(synthwatch_\w+)", str(rule["expr"])))
        assert used <= known, f"{rule.get('alert') or rule.get('record')}: unknown metrics {used - known}"
        for name in re.findall(r"\b(synthwatch:[\w:]+)", str(rule["expr"])):
            assert name in recorded


def test_scrape_config_points_at_the_worker_port() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    worker = jobs["synthwatch-worker"]
    assert worker["metrics_path"] == "/metrics"
    assert worker["dns_sd_configs"][0]["names"] == ["worker"] and worker["dns_sd_configs"][0]["port"] == 6066
    assert jobs["synthwatch-pushgateway"]["honor_labels"] is True
