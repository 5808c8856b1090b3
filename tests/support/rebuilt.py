"""Detectors rebuilt from what ClickHouse stores, as the worker gets them at start, then fed live lines."""

from __future__ import annotations

from typing import Any

from synthwatch.schemas import Alert
from synthwatch.settings import Settings
from synthwatch.stream_apps.detect.backtest import run_lines
from synthwatch.stream_apps.detect.intake import Intake
from synthwatch.stream_apps.detect.region import DetectionConfig, Detector
from synthwatch.stream_apps.storage.state_rebuild import rebuild


def rebuilt_then_live(client: Any, numbered: list[tuple[str, str]]) -> list[Alert]:
    """The alerts of ``numbered`` lines ((source, line), in reading order), taken by detectors rebuilt from what
    ``client`` stores; reports already stored are duplicates, as for the worker."""
    config = DetectionConfig.from_settings(Settings())
    intake, detector = Intake(stage="backtest"), Detector(config)
    rebuild(client, detector.regions, detector.novelty, intake.resolver, intake.stored_reporter)
    stored = {
        row[0]
        for row in client.query(
            "SELECT concat('lab:', lab_id, char(31), event_id) FROM lab_detections "
            "UNION ALL SELECT concat('agency:', agency, char(31), event_id) FROM border_seizures"
        ).result_rows
    }
    return run_lines(numbered, config, detector=detector, intake=intake, stored=stored).alerts
