"""A worker that rebuilt its state from ClickHouse raises, on the live reports after the history, the alerts of
a worker that saw the history itself (issue 11: a crash never changes the alerts).

The history goes into the real embedded engine with ``ingest-history`` (as `make demo` loads it); the rebuilt
detectors then take the live lines through the offline backtest's loop, and the one backtest over history and
live lines together is the reference: same alerts, same order, same content."""

from __future__ import annotations

from collections import Counter
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from synthwatch.demo import demo_streams
from synthwatch.history import ingest_history
from synthwatch.settings import Settings
from synthwatch.stream_apps.backtest import run_lines
from synthwatch.stream_apps.detection import Detector
from synthwatch.stream_apps.intake import Intake
from synthwatch.stream_apps.state_rebuild import rebuild

#: Longer than the spike series' memory (66 days) plus the replay's settling days, so the rebuild has to
#: restore what the replay window alone cannot (series dated before it, their older seizure masses), and with
#: a spread episode under way at the cut (Mephedrone for seed 7).
HISTORY_DAYS, LIVE_DAYS = 90, 14


def _numbered(lines: list[str], stream: str) -> list[tuple[str, str]]:
    return [(f"{stream}:0:{n}", line) for n, line in enumerate(lines)]


def _content(alerts: list[Any]) -> list[dict[str, Any]]:
    return [a.model_dump(exclude={"detected_at"}) for a in alerts]  # detected_at is the wall clock


@pytest.mark.slow  # ~15 s alone: two backtests of 100 days, a load and a rebuild
def test_rebuild_then_live_raises_the_alerts_of_one_backtest_over_everything(
    ch: Any, ch_settings: Settings, tmp_path: Path
) -> None:
    streams = demo_streams(HISTORY_DAYS, LIVE_DAYS, seed=7, end=date(2026, 12, 6))
    config = Settings().detection_config()
    history_alone = run_lines(_numbered(streams.history, "h"), config)
    whole = run_lines(_numbered(streams.history + streams.live, "h"), config)
    raised_by_history = len(history_alone.alerts)
    assert _content(whole.alerts[:raised_by_history]) == _content(history_alone.alerts)
    expected = whole.alerts[raised_by_history:]

    path = tmp_path / "history.ndjson"
    path.write_text("".join(line + "\n" for line in streams.history), encoding="utf-8")
    loaded = ingest_history(ch_settings, path, progress=False, workers=0, client=ch)
    assert loaded.stored > 0
    intake, detector = Intake(stage="backtest"), Detector(config)
    report = rebuild(ch, detector.regions, detector.novelty, intake.resolver, intake.stored_reporter)
    assert report.events_replayed > 0 and report.sightings_replayed > 0 and report.series > 0
    stored = {
        row[0]
        for row in ch.query(
            "SELECT event_id FROM lab_detections UNION ALL SELECT event_id FROM border_seizures"
        ).result_rows
    }
    live = run_lines(_numbered(streams.live, "l"), config, detector=detector, intake=intake, stored=stored)

    kinds = Counter(a.alert_type for a in expected)
    assert set(kinds) == {"new_substance", "first_in_region", "spread", "spike"}, kinds  # every kind is at stake
    assert {a.metric for a in expected if a.alert_type == "spike"} == {"count", "quantity"}
    assert _content(live.alerts) == _content(expected)
