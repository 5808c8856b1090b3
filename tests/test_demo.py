"""`make demo`'s queries run on a migrated embedded ClickHouse holding a simulated stream, and none fails."""

from __future__ import annotations

import io
from datetime import date
from typing import Any

import pytest
from rich.console import Console

from synthwatch.clickhouse import migrate
from synthwatch.demo import ALERT_QUERIES, STORED_QUERIES, DemoFailed, DemoQuery, _print_query
from synthwatch.producers.simulate import SimulationConfig, simulate
from synthwatch.query import run_query
from synthwatch.settings import Settings
from synthwatch.stream_apps.backtest import run_lines
from synthwatch.stream_apps.clickhouse_sink import ClickHouseSink
from synthwatch.stream_apps.intake import Intake, RawMessage


def _load(client: Any) -> None:
    """Events, malformed-input rejects and the backtest's alerts of a simulated fortnight."""
    migrate(client)
    sim = simulate(SimulationConfig(days=14, seed=7, start=date(2025, 3, 1)))
    messages = [RawMessage(f"x:0:{i}", line) for i, line in enumerate(sim.lines)]
    result = Intake().process(messages)
    sink = ClickHouseSink(client)
    assert sink.store_events(result.events).stored > 0
    assert result.rejects and sink.store_rejects(result.rejects) > 0
    alerts = run_lines([(m.source, m.value) for m in messages]).alerts
    assert any(a.severity != "info" for a in alerts)
    sink.store_alerts(alerts)


def test_every_demo_query_runs_and_shows_rows(ch: Any, ch_settings: Settings) -> None:
    _load(ch)
    out = io.StringIO()
    console = Console(file=out, width=200)
    for query in (*STORED_QUERIES, *ALERT_QUERIES):
        _print_query(console, ch_settings, query)  # raises DemoFailed on any query error
        assert run_query(ch_settings, query.sql).rows, f"{query.title}: no rows"
        assert query.title in out.getvalue()
    by_country = run_query(ch_settings, STORED_QUERIES[0].sql).rows
    assert {row[1] for row in by_country} == {"lab_detection", "border_seizure"}
    assert by_country == sorted(by_country, key=lambda row: (row[0], row[1]))  # the whole union is sorted


def test_a_failing_demo_query_stops_the_demo(ch: Any, ch_settings: Settings) -> None:
    migrate(ch)
    broken = DemoQuery("Broken", "SELECT country FROM lab_detections UNION ALL SELECT 1 ORDER BY kind")
    with pytest.raises(DemoFailed, match="Broken"):
        _print_query(Console(file=io.StringIO()), ch_settings, broken)
