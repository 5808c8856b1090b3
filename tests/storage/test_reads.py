"""The read API on simulated data in the real embedded engine: shapes, values, filters."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from synthwatch.producers.simulate import SimulationConfig, simulate
from synthwatch.schemas import Alert, AlertSubstance
from synthwatch.settings import Settings
from synthwatch.stream_apps.detect.intake import Intake, RawMessage
from synthwatch.stream_apps.storage.clickhouse import migrate
from synthwatch.stream_apps.storage.reads import parse_since, recent_alerts, stats, substance_history
from synthwatch.stream_apps.storage.sink import ClickHouseSink

_RAW = """
SELECT event_id, occurred_at, country, region, substance_key, toFloat64(0) AS g FROM lab_detections
UNION ALL SELECT event_id, occurred_at, country, region, substance_key, ifNull(grams, 0) FROM border_seizures
"""


def _alert(i: int, key: str, name: str, region: str, hours_ago: float, severity: str) -> Alert:
    moment = datetime.now(UTC) - timedelta(hours=hours_ago)
    return Alert(
        alert_id=f"a-{i}",
        alert_type="spike" if i % 2 else "first_in_region",
        severity=severity,  # type: ignore[arg-type]
        country=region[:2],
        region=region,
        substance=AlertSubstance(name=name, key=key),
        observed=10.0 + i,
        expected=2.0,
        window_start=moment - timedelta(days=1),
        window_end=moment,
        triggered_at=moment,
        detected_at=moment + timedelta(seconds=30),  # raised right after its report, as on time
        evidence_event_ids=[f"e-{i}", f"f-{i}"],
        summary=f"alert {i}",
    )


@pytest.fixture
def data(ch: Any, ch_settings: Settings) -> tuple[Any, Settings, str, str]:
    """Twenty days of simulated reports up to yesterday, plus alerts on the busiest substance."""
    migrate(ch)
    start = (datetime.now(UTC) - timedelta(days=20)).date()
    sim = simulate(SimulationConfig(days=20, seed=9, start=start, events_per_day=200))
    batch = Intake().process(RawMessage(f"t:0:{i}", line) for i, line in enumerate(sim.lines))
    sink = ClickHouseSink(ch)
    sink.store_events(batch.events)
    key, name = ch.query(
        "SELECT substance_key, any(resolved_name) FROM lab_detections GROUP BY substance_key "
        "ORDER BY count() DESC LIMIT 1"
    ).result_rows[0]
    alerts = [
        _alert(i, key, name, region, hours, severity)
        for i, (region, hours, severity) in enumerate(
            [("ML-BKO", 1, "critical"), ("FR-75C", 30, "warning"), ("ML-BKO", 100, "info"), ("FR-75C", 400, "critical")]
        )
    ]
    sink.store_alerts(alerts)
    print(f"stored {len(batch.events)} events and {len(alerts)} alerts; busiest lab substance {name} ({key})")
    return ch, ch_settings, key, name


def test_since_counts_on_detection_time_unless_asked_for_report_time(data: tuple[Any, Settings, str, str]) -> None:
    ch, settings, key, name = data
    late = _alert(4, key, name, "SN-DK", 362, "warning").model_copy(
        update={"reported_late": True, "late_by_hours": 362.0, "detected_at": datetime.now(UTC)}
    )
    old = _alert(5, key, name, "SN-DK", 362, "warning")  # triggered as long ago, raised on time back then
    ClickHouseSink(ch).store_alerts([late, old])
    week = [a.alert_id for a in recent_alerts(settings)]
    assert week == ["a-4", "a-0", "a-1", "a-2"]  # by detection: a-4 raised now, its report 362 h old
    assert [a.alert_id for a in recent_alerts(settings, region="sn-dk")] == ["a-4"]
    by_report = [a.alert_id for a in recent_alerts(settings, time="triggered")]
    assert by_report == ["a-0", "a-1", "a-2"]  # by the reports' own time a-4 is 15 days old
    month = [a.alert_id for a in recent_alerts(settings, since=timedelta(days=20), time="triggered", region="sn-dk")]
    assert sorted(month) == ["a-4", "a-5"]
    stored = ch.query("SELECT reported_late, late_by_hours FROM alerts WHERE alert_id = 'a-4'").result_rows
    assert stored == [(True, 362.0)]
    with pytest.raises(ValueError, match="time must be one of detected, triggered"):
        recent_alerts(settings, time="sampled")


def test_parse_since() -> None:
    assert parse_since("7d") == timedelta(days=7)
    assert parse_since("12h") == timedelta(hours=12)
    assert parse_since("30m") == timedelta(minutes=30)
    assert parse_since("2w") == timedelta(weeks=2)
    assert parse_since(" 90S ") == timedelta(seconds=90)
    for bad in ("", "7", "d7", "7 days", "-3d"):
        with pytest.raises(ValueError, match="duration"):
            parse_since(bad)


def test_recent_alerts_filters_and_orders(data: tuple[Any, Settings, str, str]) -> None:
    _, settings, key, _ = data
    week = recent_alerts(settings)
    print(f"last 7 days: {[(a.alert_id, a.region, a.severity) for a in week]}")
    assert [a.alert_id for a in week] == ["a-0", "a-1", "a-2"]  # newest first; a-3 is 400 h old
    assert week[0].substance_key == key and week[0].evidence == 2 and week[0].observed == 10.0
    assert week[0].triggered_at.tzinfo is not None
    assert [a.alert_id for a in recent_alerts(settings, since=timedelta(days=30))] == ["a-0", "a-1", "a-2", "a-3"]
    assert [a.alert_id for a in recent_alerts(settings, region="ml-bko")] == ["a-0", "a-2"]
    assert [a.alert_id for a in recent_alerts(settings, since=timedelta(days=30), severity="critical")] == [
        "a-0",
        "a-3",
    ]
    assert [a.alert_id for a in recent_alerts(settings, since=parse_since("12h"))] == ["a-0"]
    assert len(recent_alerts(settings, since=timedelta(days=30), limit=2)) == 2
    with pytest.raises(ValueError, match="severity"):
        recent_alerts(settings, severity="urgent")


def test_stats_equal_a_recount_of_the_raw_tables(data: tuple[Any, Settings, str, str]) -> None:
    ch, settings, _, _ = data
    rows = stats(settings, days=30)
    expected = {
        (r[0], r[1]): r[2:]
        for r in ch.query(
            f"SELECT region, substance_key, count(), round(sum(g), 3) FROM ({_RAW}) "
            "WHERE toDate(occurred_at) > today() - 30 GROUP BY region, substance_key"
        ).result_rows
    }
    seen = {
        (r[0], r[1]): (r[2], r[3])
        for r in ch.query(
            f"SELECT region, substance_key, min(occurred_at), max(occurred_at) FROM ({_RAW}) GROUP BY ALL"
        ).result_rows
    }
    print(f"stats(days=30): {len(rows)} region x substance rows, {sum(r.reports for r in rows)} reports")
    assert len(rows) == len(expected) > 10
    assert [r.reports for r in rows] == sorted((r.reports for r in rows), reverse=True)
    for row in rows:
        reports, grams = expected[(row.region, row.substance_key)]
        assert row.reports == reports == row.lab_detections + row.border_seizures
        assert row.grams == pytest.approx(grams, abs=1e-3)
        first, last = seen[(row.region, row.substance_key)]
        assert row.first_seen == first.replace(tzinfo=UTC) and row.last_seen == last.replace(tzinfo=UTC)
    region = rows[0].region
    only = stats(settings, days=30, region=region.lower())
    assert only and {r.region for r in only} == {region}
    recent = stats(settings, days=3)
    assert sum(r.reports for r in recent) < sum(r.reports for r in rows)


def test_substance_history_by_name_inchikey_and_first_block(data: tuple[Any, Settings, str, str]) -> None:
    ch, settings, key, name = data
    by_name = substance_history(settings, f"  {name.lower()} ")
    assert by_name is not None
    print(
        f"{by_name.substance_name}: first seen {by_name.first_seen}, {by_name.reports} reports in "
        f"{len(by_name.regions)} regions, {len(by_name.months)} months, {len(by_name.alerts)} alerts"
    )
    total = ch.command(f"SELECT count() FROM ({_RAW}) WHERE substance_key = %(k)s", parameters={"k": key})
    assert by_name.substance_key == key and by_name.resolved_by == "catalogue_name"
    assert by_name.reports == total == sum(r.reports for r in by_name.regions) == sum(m.reports for m in by_name.months)
    assert [r.first_seen for r in by_name.regions] == sorted(r.first_seen for r in by_name.regions)
    assert by_name.first_seen == by_name.regions[0].first_seen
    assert [a.alert_id for a in by_name.alerts] == ["a-3", "a-2", "a-1", "a-0"]  # oldest first
    inchikey = ch.command(
        "SELECT any(resolved_inchikey) FROM lab_detections WHERE substance_key = %(k)s", parameters={"k": key}
    )
    for query in (inchikey, key, key.lower()):
        found = substance_history(settings, query)
        assert found is not None and found.substance_key == key and found.reports == total
    assert substance_history(settings, "no such substance xyz") is None


def test_recent_rejects_filter_by_time_and_lab(ch: Any, ch_settings: Settings) -> None:
    from synthwatch.schemas import Reject
    from synthwatch.stream_apps.storage.reads import recent_rejects

    migrate(ch)
    now = datetime.now(UTC)

    def reject(n: int, raw: str, hours_ago: float) -> Reject:
        made = Reject.of(raw, source=f"f.csv:{n}", reason=f"region: bad {n}", stage="publish", event_id=f"e-{n}")
        return made.model_copy(update={"rejected_at": now - timedelta(hours=hours_ago)})

    ClickHouseSink(ch).store_rejects(
        [
            reject(2, '{"lab_id": "LAB-FR-01", "region": "XX"}', 1),
            reject(3, '{"agency": "ADII", "region": "XX"}', 2),
            reject(4, "{not json", 3),
            reject(5, '{"lab_id": "LAB-FR-01"}', 24 * 10),  # older than the window
        ]
    )
    rows = recent_rejects(ch_settings, since=timedelta(days=7))
    assert [(r.source, r.reporter, r.reason) for r in rows] == [
        ("f.csv:2", "LAB-FR-01", "region: bad 2"),
        ("f.csv:3", "ADII", "region: bad 3"),
        ("f.csv:4", "", "region: bad 4"),
    ]
    assert [r.source for r in recent_rejects(ch_settings, since=timedelta(days=30), lab="LAB-FR-01")] == [
        "f.csv:2",
        "f.csv:5",
    ]
    assert [r.event_id for r in recent_rejects(ch_settings, lab="ADII")] == ["e-3"]
