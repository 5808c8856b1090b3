"""A far-future event time is refused at intake against the report's receipt time (its Kafka timestamp), so it
never moves a watermark: before, one report dated 2099 made the resolver forget every remembered name (no
name -> structure link any more) and made every later report of its region late (left out of spikes)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from synthwatch.schemas.reject_reasons import reject_reason, reject_reason_classes
from synthwatch.schemas.wire import RecordLimits
from synthwatch.stream_apps.detect.backtest import run_lines
from synthwatch.stream_apps.detect.identity import SubstanceResolver
from synthwatch.stream_apps.detect.intake import Intake, RawMessage
from synthwatch.stream_apps.detect.region import Detector
from tests.detect.test_identified import LAB, NAME_KEY, SEIZURE
from tests.support.factories import seizure

FUTURE = seizure(event_id="sz-2099", occurred_at="2099-06-01T10:00:00+00:00", substance={"name": "Junk"})


def _received(record: dict[str, Any]) -> datetime:
    """A receipt an hour after the report's event time (the far-future one: received in December 2026)."""
    if record is FUTURE:
        return datetime(2026, 12, 2, 12, tzinfo=UTC)
    return datetime.fromisoformat(record["occurred_at"]) + timedelta(hours=1)


def _message(n: int, record: dict[str, Any], received_at: datetime | None = None) -> RawMessage:
    return RawMessage(f"t:0:{n}", json.dumps(record), received_at=received_at or _received(record))


def test_an_event_time_past_its_receipt_is_refused_with_a_reason_counted_apart() -> None:
    received = datetime(2026, 12, 2, 12, tzinfo=UTC)
    near = seizure(event_id="near", occurred_at="2026-12-03T11:00:00+00:00")  # 23 h after its receipt: a slip
    far = seizure(event_id="far", occurred_at="2026-12-03T13:00:00+00:00")  # 25 h after
    result = Intake().process(_message(n, r, received) for n, r in enumerate([near, far, FUTURE]))
    assert [e.event_id for e in result.events] == ["near"]
    assert [r.event_id for r in result.rejects] == ["far", "sz-2099"]
    reason = result.rejects[1].reason
    assert reason.startswith("occurred_at: 2099-06-01T10:00:00+00:00 is 26,478.9 days after the report was received")
    assert "(2026-12-02T12:00:00+00:00): at most 24 h is allowed (SYNTHWATCH_MAX_FUTURE_HOURS)" in reason
    # the worker's and the publisher's reject metrics count it under its own class, not as a malformed date
    assert {reject_reason(r.reason) for r in result.rejects} == {"future_occurred_at"}
    assert "future_occurred_at" in reject_reason_classes()
    assert reject_reason("occurred_at: Input should be a valid datetime") == "invalid_occurred_at"
    # the bound is the setting's (SYNTHWATCH_MAX_FUTURE_HOURS, through the record limits)
    strict = Intake(limits=RecordLimits(max_future_hours=1)).process([_message(0, near, received)])
    assert [r.event_id for r in strict.rejects] == ["near"] and "at most 1 h is allowed" in strict.rejects[0].reason
    # a record with no receipt time (no Kafka timestamp) has only the schema's bound
    assert len(Intake().process([RawMessage("t:0:9", json.dumps(FUTURE))]).events) == 1


def _detect(records: list[dict[str, Any]]) -> tuple[list[Any], list[Any], Intake]:
    intake, detector = Intake(SubstanceResolver(), stage="backtest"), Detector()
    alerts, rejects = [], []
    for n, record in enumerate(records):
        result = intake.process([_message(n, record)])
        rejects.extend(result.rejects)
        for item in result.events:
            alerts.extend(detector.observe_event(item).alerts)
    return alerts, rejects, intake


def test_a_far_future_report_does_not_make_the_resolver_forget_names() -> None:
    alerts, rejects, intake = _detect([SEIZURE, FUTURE, LAB])
    found = alerts[-1]
    assert found.alert_type == "new_substance" and found.evidence_event_ids == ["lab-1"]
    assert found.details.get("name_key") == NAME_KEY, "the name reported before the far-future one is still linked"
    assert [r.event_id for r in rejects] == ["sz-2099"]
    assert intake.resolver._watermark is not None and intake.resolver._watermark.year == 2026


def _line(n: int, day: int, hour: int = 10, occurred: str | None = None) -> str:
    at = occurred or (datetime(2026, 11, 1, hour, tzinfo=UTC) + timedelta(days=day)).isoformat()
    return json.dumps(seizure(event_id=f"r-{n}", occurred_at=at, seizure_id=f"S-{n}", substance={"name": "Tramadol"}))


def test_a_far_future_report_does_not_make_later_reports_of_its_region_late() -> None:
    """The backtest (received: the file's receipt) and the worker's intake (each record's Kafka timestamp) refuse
    the same report, and the region's later reports count as usual."""
    lines = [_line(n, n) for n in range(20)]
    lines.insert(10, _line(99, 0, occurred="2099-06-01T10:00:00+00:00"))
    numbered = [(f"f:{n}", line) for n, line in enumerate(lines, start=1)]
    run = run_lines(numbered, received_at=datetime(2026, 12, 1, tzinfo=UTC))
    summary = run.summary
    assert summary.late == 0, "honest reports after the far-future one are not late"
    assert (summary.lines, summary.events, summary.malformed, summary.duplicates) == (21, 20, 1, 0)
    assert [r.event_id for r in run.rejects] == ["r-99"]
    assert reject_reason(run.rejects[0].reason) == "future_occurred_at"

    detector, intake = Detector(), Intake()
    late, refused = [], []
    for n, line in enumerate(lines):
        occurred = datetime.fromisoformat(json.loads(line)["occurred_at"])
        received = min(occurred, datetime(2026, 12, 1, tzinfo=UTC)) + timedelta(minutes=5)
        result = intake.process([RawMessage(f"t:0:{n}", line, received_at=received)])
        refused.extend(r.event_id for r in result.rejects)
        late.extend(detector.observe_event(item).late_by_hours for item in result.events)
    assert late[10:] == [None] * (len(late) - 10), "later reports of the region count as usual"
    assert late == [None] * 20 and refused == ["r-99"]


def test_the_bound_is_at_least_an_hour_and_finite(monkeypatch: Any) -> None:
    """SYNTHWATCH_MAX_FUTURE_HOURS=0 read as "off" refused every report from a clock a second ahead; a negative,
    infinite or NaN bound, or one over a month, is refused when the settings load, with the setting's name."""
    import pytest
    from pydantic import ValidationError

    from synthwatch.settings import Settings

    for wrong in ("0", "0.5", "-1", "nan", "inf", "745"):
        monkeypatch.setenv("SYNTHWATCH_MAX_FUTURE_HOURS", wrong)
        with pytest.raises(ValidationError, match="max_future_hours"):
            Settings()
    monkeypatch.setenv("SYNTHWATCH_MAX_FUTURE_HOURS", "26")  # UTC+14 read as UTC-12: a day and two hours ahead
    assert Settings().record_limits().max_future_hours == 26


def test_the_backtest_command_bounds_event_times_by_the_setting(tmp_path: Any, monkeypatch: Any) -> None:
    """Its help names SYNTHWATCH_MAX_FUTURE_HOURS, but the command applied the default 24 h whatever the setting:
    a backtest must refuse what the worker so configured refuses."""
    from typer.testing import CliRunner

    from synthwatch.cli.main import app

    events, out = tmp_path / "in.ndjson", tmp_path / "alerts.ndjson"
    dated = {"in-2h": "2026-12-01T14:00:00+00:00", "in-30m": "2026-12-01T12:30:00+00:00"}
    events.write_text("".join(json.dumps(seizure(event_id=i, occurred_at=at)) + "\n" for i, at in dated.items()))
    monkeypatch.setenv("SYNTHWATCH_MAX_FUTURE_HOURS", "1")
    command = ["backtest", "--input", str(events), "--output", str(out), "--received-at", "2026-12-01T12:00:00+0000"]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0, result.output
    refused = [json.loads(line) for line in (tmp_path / "alerts.ndjson.rejects.ndjson").read_text().splitlines()]
    assert [r["event_id"] for r in refused] == ["in-2h"]
    assert "at most 1 h is allowed" in refused[0]["reason"]
