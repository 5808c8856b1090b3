"""The ClickHouse sink on the real embedded engine: idempotent on event_id, rows as sent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from synthwatch.schemas import Reject
from synthwatch.stream_apps.detect.intake import Intake, RawMessage
from synthwatch.stream_apps.storage.clickhouse import migrate
from synthwatch.stream_apps.storage.sink import ClickHouseSink
from tests.support.factories import alike_numbered_reports, lab, seizure


def _messages(records: list[dict[str, Any]]) -> list[RawMessage]:
    return [RawMessage(f"t:0:{i}", json.dumps(r)) for i, r in enumerate(records)]


def test_store_is_idempotent_and_keeps_every_field(ch: Any) -> None:
    migrate(ch)
    sink, intake = ClickHouseSink(ch), Intake()
    records = [seizure(event_id=f"s-{i}", extra_note=f"n{i}") for i in range(50)] + [
        lab(event_id=f"l-{i}") for i in range(30)
    ]
    batch = intake.process(_messages(records))
    first = sink.store_events(batch.events)
    assert (first.border_seizures, first.lab_detections, first.already_stored) == (50, 30, 0)
    again = sink.store_events(intake.process(_messages(records)).events)
    assert (again.stored, again.already_stored) == (0, 80)
    assert ch.query("SELECT count() FROM border_seizures").result_rows[0][0] == 50
    assert ch.query("SELECT count() FROM lab_detections").result_rows[0][0] == 30
    row = ch.query(
        "SELECT region, substance_name, quantity_value, quantity_unit, grams, substance_key, resolved_name, "
        "family, extra, toString(occurred_at) FROM border_seizures WHERE event_id = 's-7'"
    ).result_rows[0]
    assert row[:5] == ("ML-BKO", "Tramadol", 2.5, "kg", 2500.0)
    assert row[6] == "Tramadol" and row[5] and row[7]
    assert json.loads(row[8]) == {"extra_note": "n7"}
    assert row[9] == "2026-03-01 09:00:00.000"  # +01:00 stored as UTC
    lab_row = ch.query(
        "SELECT substance_smiles, resolved_name, family, purity_pct FROM lab_detections WHERE event_id='l-3'"
    ).result_rows[0]
    assert lab_row[0].endswith(".Cl") and lab_row[1] == "3-MMC" and lab_row[2] == "synthetic_cathinone"


def test_duplicates_inside_one_batch_count_once(ch: Any) -> None:
    migrate(ch)
    result = Intake().process(_messages([seizure(event_id="d-1"), seizure(event_id="d-1"), seizure(event_id="d-2")]))
    assert result.duplicates == 1 and len(result.events) == 2
    assert ClickHouseSink(ch).store_events(result.events).stored == 2


def test_an_id_that_comes_in_two_batches_of_one_checkpoint_is_stored_once(ch: Any) -> None:
    """The worker stores several batches at once: a re-send in the next batch must not add a row."""
    migrate(ch)
    intake = Intake()
    first = intake.process(_messages([seizure(event_id="c-1"), seizure(event_id="c-2")])).events
    resent = intake.process(_messages([seizure(event_id="c-1")])).events
    assert len(resent) == 1
    result = ClickHouseSink(ch).store_events([*first, *resent])
    assert (result.stored, result.already_stored) == (2, 1)
    assert ch.query("SELECT count() FROM border_seizures").result_rows[0][0] == 2


def test_rejects_are_stored_once(ch: Any) -> None:
    migrate(ch)
    sink = ClickHouseSink(ch)
    rejects = [Reject.of(f"bad {i}", source=f"f:{i}", reason="invalid JSON", stage="publish") for i in range(5)]
    assert sink.store_rejects(rejects) == 5
    assert sink.store_rejects(rejects + rejects[:2]) == 0
    assert ch.query("SELECT count(), countIf(reason = 'invalid JSON') FROM rejects").result_rows[0] == (5, 5)


def test_a_changed_report_under_a_stored_id_is_refused_and_the_stored_row_kept(ch: Any) -> None:
    """Issue 13: a re-sent event_id with other content was dropped as a duplicate without a word."""
    migrate(ch)
    intake, sink = Intake(), ClickHouseSink(ch)
    sink.store_events(
        intake.process(_messages([seizure(event_id="x-1", quantity={"value": 2.5, "unit": "kg"})])).events
    )
    # the same report, fields in another order and codes in another case: a duplicate, not a change
    same = dict(reversed(list(seizure(event_id="x-1", quantity={"value": 2.5, "unit": "kg"}).items())))
    same["region"] = "ml-bko"
    changed = seizure(event_id="x-1", quantity={"value": 25, "unit": "kg"})
    result = sink.store_events(intake.process(_messages([same])).events + intake.process(_messages([changed])).events)
    assert (result.stored, result.already_stored, [c.event_id for c in result.changed]) == (0, 1, ["x-1"])
    reject = result.changed[0].changed_content_reject()
    assert "already stored with different content" in reject.reason and "new event_id" in reject.reason
    assert json.loads(reject.raw)["quantity"]["value"] == 25
    stored = sink.stored_event_digests(result.changed)
    key = ("agency:Douanes maliennes", "x-1")
    assert set(stored) == {key} and stored[key] not in ("", result.changed[0].digest)
    assert ch.query("SELECT quantity_value FROM border_seizures WHERE event_id = 'x-1'").result_rows == [(2.5,)]


def test_a_changed_report_inside_one_batch_is_a_reject_not_a_duplicate() -> None:
    result = Intake().process(
        _messages([seizure(event_id="y-1"), seizure(event_id="y-1"), seizure(event_id="y-1", border_point="Kayes")])
    )
    assert (len(result.events), result.duplicates, len(result.rejects)) == (1, 1, 1)
    assert result.rejects[0].event_id == "y-1" and "different content" in result.rejects[0].reason


def test_storing_events_does_not_import_pandas(tmp_path: Path) -> None:
    """clickhouse-connect's insert asks whether its rows are a DataFrame, and asking imported pandas (~47 MiB of
    RSS and a few tenths of a CPU second in the worker's first checkpoint). A fresh process that connects and
    stores events through the sink has the rows stored and pandas still not imported."""
    script = textwrap.dedent(
        f"""
        import json, sys
        from synthwatch.settings import Settings
        from synthwatch.stream_apps.detect.intake import Intake, RawMessage
        from synthwatch.stream_apps.storage.clickhouse import connect, migrate
        from synthwatch.stream_apps.storage.sink import ClickHouseSink
        from tests.support.factories import lab, seizure

        client = connect(Settings(data_dir={str(tmp_path)!r}))
        migrate(client)
        records = [seizure(event_id="s-1"), lab(event_id="l-1")]
        batch = Intake().process([RawMessage(f"t:0:{{i}}", json.dumps(r)) for i, r in enumerate(records)])
        stored = ClickHouseSink(client).store_events(batch.events)
        print(json.dumps([stored.stored, "pandas" in sys.modules]))
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNTHWATCH_")}
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parents[2],
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == [2, False]


def _two_labs_one_id() -> list[dict[str, Any]]:
    """The security review's repro: two labs' reports under one id (LIMS sequences collide, or one lab
    squats the other's predictable id), in different places and times."""
    return [
        lab(event_id="2026-000123", lab_id="LAB-A", country="FR", region="FR-75C"),
        lab(event_id="2026-000123", lab_id="LAB-B", country="ML", region="ML-BKO", occurred_at="2026-03-03T09:00:00Z"),
    ]


def test_two_reporters_with_one_event_id_are_both_stored_and_counted(ch: Any) -> None:
    """Event ids are unique per reporter only: lab-b's report was refused as lab-a's 'changed' report."""
    migrate(ch)
    intake, sink = Intake(), ClickHouseSink(ch)
    first, second = _two_labs_one_id()
    assert sink.store_events(intake.process(_messages([first])).events).stored == 1
    result = sink.store_events(intake.process(_messages([second])).events)
    assert (result.stored, result.already_stored, result.changed) == (1, 0, ())
    again = sink.store_events(intake.process(_messages([second, first])).events)  # a re-send of each
    assert (again.stored, again.already_stored, again.changed) == (0, 2, ())
    assert sorted(ch.query("SELECT lab_id, region FROM lab_detections").result_rows) == [
        ("LAB-A", "FR-75C"),
        ("LAB-B", "ML-BKO"),
    ]
    counted = ch.query("SELECT region, sum(reports) FROM reports_daily GROUP BY region ORDER BY region")
    assert counted.result_rows == [("FR-75C", 1), ("ML-BKO", 1)]
    # the same reporter's changed content under its id is still a changed report, refused
    changed = sink.store_events(intake.process(_messages([{**second, "method": "LC-MS"}])).events)
    assert (changed.stored, [c.key for c in changed.changed]) == (0, [("lab:LAB-B", "2026-000123")])


def test_two_reporters_reports_under_one_id_place_and_time_survive_a_merge(ch: Any) -> None:
    """The raw tables are ReplacingMergeTree: their sorting key was (country, region, occurred_at, event_id), so
    two labs' reports under one id at one place and time (a date-only sample date is midnight) merged into one
    row. One lab's row was lost though the aggregates counted both; the sink then stored it again at a replay
    (counted three times). Seizures alike. Migration 0014 puts the reporter in the sorting key."""
    migrate(ch)
    intake, sink = Intake(), ClickHouseSink(ch)
    records = alike_numbered_reports()
    for record in records:  # one insert each: one part each, which the merge below folds together
        assert sink.store_events(intake.process(_messages([record])).events).stored == 1
    ch.command("OPTIMIZE TABLE lab_detections FINAL")
    ch.command("OPTIMIZE TABLE border_seizures FINAL")
    assert sorted(ch.query("SELECT lab_id FROM lab_detections").result_rows) == [("LAB-A",), ("LAB-B",)]
    assert sorted(ch.query("SELECT agency FROM border_seizures").result_rows) == [("Douane ML",), ("Douane SN",)]
    again = sink.store_events(intake.process(_messages(records)).events)  # a replay finds each stored
    assert (again.stored, again.already_stored) == (0, 4)
    assert ch.query("SELECT kind, sum(reports) FROM reports_daily GROUP BY kind ORDER BY kind").result_rows == [
        ("border_seizure", 2),
        ("lab_detection", 2),
    ]


def test_two_reporters_with_one_event_id_in_one_batch_are_both_taken() -> None:
    result = Intake().process(_messages([*_two_labs_one_id(), _two_labs_one_id()[1]]))
    taken = [(e.event.lab_id, e.event_id) for e in result.events]  # type: ignore[union-attr]
    assert (taken, result.duplicates, result.rejects) == (
        [("LAB-A", "2026-000123"), ("LAB-B", "2026-000123")],
        1,
        [],
    )
    seizures = Intake().process(_messages([seizure(event_id="z-1"), seizure(event_id="z-1", agency="Douane FR")]))
    assert (len(seizures.events), seizures.duplicates, seizures.rejects) == (2, 0, [])
