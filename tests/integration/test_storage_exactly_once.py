"""Written once and exactly once: duplicates, replays and a killed worker leave one row per id, and
the materialized aggregates equal a recount from the raw tables."""

from __future__ import annotations

import random
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from synthwatch.bench.reliability import publish_seizures
from synthwatch.producers.simulate import SimulationConfig, simulate
from synthwatch.schemas import Alert, AlertSubstance
from synthwatch.stack.broker import EmbeddedBroker, committed_offsets
from synthwatch.stream_apps.detect.intake import Intake, RawMessage
from synthwatch.stream_apps.storage.clickhouse import migrate
from synthwatch.stream_apps.storage.sink import ClickHouseSink
from tests.conftest import RunningWorker, isolated_settings, start_worker, stop_worker, wait_until

_RAW = """
SELECT 'lab_detection' AS kind, event_id, occurred_at, country, region, family, substance_key, resolved_name,
       toFloat64(0) AS g FROM lab_detections
UNION ALL
SELECT 'border_seizure', event_id, occurred_at, country, region, family, substance_key, resolved_name,
       ifNull(grams, 0) FROM border_seizures
"""


def _stream(ch: Any, lines: list[str], batch: int, intake: Intake, sink: ClickHouseSink) -> tuple[int, int]:
    stored = skipped = 0
    for i in range(0, len(lines), batch):
        result = intake.process(RawMessage(f"t:0:{i + j}", line) for j, line in enumerate(lines[i : i + batch]))
        outcome = sink.store_events(result.events)
        stored += outcome.stored
        skipped += outcome.already_stored + result.duplicates
    return stored, skipped


def _alert(i: int) -> Alert:
    moment = datetime(2025, 3, 1, tzinfo=UTC) + timedelta(hours=i)
    return Alert(
        alert_id=f"spike:ML-BKO:KEY{i % 7}:{i}",
        alert_type="spike",
        severity="warning",
        country="ML",
        region="ML-BKO",
        substance=AlertSubstance(name="Tramadol", key=f"KEY{i % 7}"),
        window_start=moment - timedelta(days=1),
        window_end=moment,
        triggered_at=moment,
        evidence_event_ids=[f"e{i}"],
    )


@pytest.fixture
def replayed(ch: Any) -> tuple[Any, Any]:
    """A simulated stream stored in batches of 500, then replayed twice with other batch boundaries."""
    migrate(ch)
    start = (datetime.now(UTC) - timedelta(days=10)).date()  # reports_hourly keeps 400 days
    sim = simulate(SimulationConfig(days=8, seed=3, start=start, events_per_day=300))
    intake, sink = Intake(), ClickHouseSink(ch)
    first = _stream(ch, sim.lines, 500, intake, sink)
    shuffled = list(sim.lines)
    random.Random(1).shuffle(shuffled)
    again = _stream(ch, shuffled, 777, intake, sink)
    tail = _stream(ch, sim.lines[-1000:], 128, intake, sink)
    print(
        f"{len(sim.lines)} lines ({sim.truth.valid_unique} unique valid, {sim.truth.duplicates} re-sent): "
        f"first pass stored {first[0]}, replay stored {again[0]} skipped {again[1]}, tail replay stored {tail[0]}"
    )
    assert first[0] == sim.truth.valid_unique and again[0] == 0 and tail[0] == 0
    return ch, sim.truth


def test_duplicates_and_replays_leave_one_row_per_event_and_alert(replayed: tuple[Any, Any]) -> None:
    ch, truth = replayed
    for table in ("lab_detections", "border_seizures"):
        rows, unique = ch.query(f"SELECT count(), uniqExact(event_id) FROM {table}").result_rows[0]
        print(f"{table}: {rows} rows, {unique} unique ids")
        assert rows == unique
    assert ch.command(f"SELECT count() FROM ({_RAW})") == truth.valid_unique
    sink = ClickHouseSink(ch)
    alerts = [_alert(i) for i in range(40)]
    assert sink.store_alerts(alerts + alerts[:10]) == 40  # duplicates inside one batch too
    assert sink.store_alerts(list(reversed(alerts))) == 0
    rows, unique = ch.query("SELECT count(), uniqExact(alert_id) FROM alerts").result_rows[0]
    print(f"alerts: 90 sent, {rows} rows, {unique} unique ids")
    assert rows == unique == 40


def test_aggregates_equal_a_recount_from_the_raw_tables(replayed: tuple[Any, Any]) -> None:
    ch, _ = replayed
    checks = {
        "reports_daily": (
            "SELECT day, country, region, kind, family, substance_key, sum(reports), round(sum(grams), 3) "
            "FROM reports_daily GROUP BY ALL ORDER BY ALL",
            f"SELECT toDate(occurred_at) AS day, country, region, kind, family, substance_key, count(), "
            f"round(sum(g), 3) FROM ({_RAW}) GROUP BY ALL ORDER BY ALL",
        ),
        "reports_hourly": (
            "SELECT hour, region, kind, substance_key, sum(reports), round(sum(grams), 3) "
            "FROM reports_hourly GROUP BY ALL ORDER BY ALL",
            f"SELECT toStartOfHour(occurred_at) AS hour, region, kind, substance_key, count(), round(sum(g), 3) "
            f"FROM ({_RAW}) GROUP BY ALL ORDER BY ALL",
        ),
        "substance_first_seen": (
            "SELECT substance_key, min(first_seen), max(last_seen), sum(reports) FROM substance_first_seen "
            "GROUP BY ALL ORDER BY ALL",
            f"SELECT substance_key, min(occurred_at), max(occurred_at), count() FROM ({_RAW}) "
            "GROUP BY ALL ORDER BY ALL",
        ),
        "substance_region_first_seen": (
            "SELECT substance_key, country, region, min(first_seen), max(last_seen), sum(reports) "
            "FROM substance_region_first_seen GROUP BY ALL ORDER BY ALL",
            f"SELECT substance_key, country, region, min(occurred_at), max(occurred_at), count() FROM ({_RAW}) "
            "GROUP BY ALL ORDER BY ALL",
        ),
    }
    for table, (aggregate, recount) in checks.items():
        got, expected = ch.query(aggregate).result_rows, ch.query(recount).result_rows
        print(f"{table}: {len(got)} rows equal a recount of the raw tables")
        assert got == expected and got, table


@pytest.mark.slow
@pytest.mark.integration
def test_worker_killed_mid_stream_restarts_without_gap_or_duplicate(own_broker: EmbeddedBroker, tmp_path: Path) -> None:
    """SIGKILL between insert and offset commit: the restarted worker re-reads and stores each event once."""
    broker = own_broker
    settings = isolated_settings(broker, tmp_path / "data")
    total, prefix = 20_000, f"k{settings.app_id[-6:]}"

    publish_seizures(broker.bootstrap_servers, settings.topic_border_seizures, prefix, total, start=datetime.now(UTC))
    count = "SELECT count() FROM border_seizures WHERE startsWith(event_id, %(p)s)"

    worker = start_worker(settings, tmp_path / "worker-1.log")
    seen = wait_until(
        lambda: (n := worker.count(count, {"p": prefix})) >= total // 10 and n,
        120,
        "some rows stored",
        details=worker.describe,
    )
    assert stop_worker(worker, signal.SIGKILL) == -signal.SIGKILL
    print(f"killed the worker (SIGKILL) after {seen} of {total} events were stored")
    assert seen < total, "the worker finished before it could be killed; publish more events"

    # Strict: no restart on a stall (nothing restarts an embedded worker in production). The committed offsets
    # reach the end of every input partition, and every event is stored once.
    restarted = start_worker(settings, tmp_path / "worker-2.log")
    try:
        wait_until(
            lambda: _at_end(restarted),
            180,
            "the restarted worker's committed offsets to reach the end of every input partition",
            interval=0.5,
            details=lambda: f"{_offsets(restarted)}\n{restarted.describe()}",
        )
        rows, unique = restarted.query(
            "SELECT count(), uniqExact(event_id) FROM border_seizures WHERE startsWith(event_id, %(p)s)",
            {"p": prefix},
        ).rows[0]
        stats = restarted.stats()
        print(
            f"after restart: published {total}, rows {rows}, unique ids {unique}; "
            f"restarted worker consumed {stats['consumed']}, skipped as already stored {stats['duplicates']}, "
            f"watchdog seek-backs {stats['consumer_stalls']}; {_offsets(restarted)}"
        )
        assert int(rows) == int(unique) == total
        assert stats["consumer_stalls"] == 0, "the watchdog had to seek back: the restart stalled"
    finally:
        stop_worker(restarted)


def _at_end(worker: RunningWorker) -> bool:
    """Every input partition's committed offset is at its end (a partition never written to has none)."""
    settings = worker.settings
    offsets = committed_offsets(settings.kafka_bootstrap_servers or "", settings.app_id, settings.input_topics)
    return bool(offsets) and all(max(committed, 0) == end for committed, end in offsets.values())


def _offsets(worker: RunningWorker) -> str:
    """Per input partition, the group's committed offset against the partition's end: a stall shows as
    committed < end (not fetched or not acknowledged), a skip as committed == end with rows missing."""
    settings = worker.settings
    offsets = committed_offsets(settings.kafka_bootstrap_servers or "", settings.app_id, settings.input_topics)
    parts = [
        f"{tp.topic}[{tp.partition}] committed {committed} of {end}"
        for tp, (committed, end) in sorted(offsets.items(), key=lambda item: (item[0].topic, item[0].partition))
    ]
    return "offsets: " + ", ".join(parts)
