"""A corrected report stops counting in the aggregates once its correction is stored (migration 0012).

On the real embedded engine, through the worker's own steps: the intake parses, the corrections are judged
against the originals looked up in ClickHouse (or taken earlier, not stored yet), the sink stores them and
their retractions, and the retraction views subtract the original's contribution. Every check compares
the aggregates with a recount from the raw tables that leaves corrected reports out, so "counts once, with
its new values" is not a hard-coded number but the definition.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import pytest

from synthwatch.settings import Settings
from synthwatch.stream_apps.detect.corrections import corrected_key, judge_corrections, known_reports
from synthwatch.stream_apps.detect.intake import EnrichedEvent, Intake, RawMessage
from synthwatch.stream_apps.storage import sink as sink_module
from synthwatch.stream_apps.storage.clickhouse import migrate
from synthwatch.stream_apps.storage.corrections import stored_reports
from synthwatch.stream_apps.storage.reads import stats
from synthwatch.stream_apps.storage.sink import ClickHouseSink, StoreResult
from tests.support.factories import lab, seizure

NOW = "2026-03-02T09:00:00Z"
S1 = ("agency:Douanes maliennes", "S-1")


def _as_before_0014(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the sink write the raw tables' columns of a worker before migration 0014 (no ``reporter``)."""
    for columns in ("SINK_LAB_COLUMNS", "SINK_SEIZURE_COLUMNS"):
        monkeypatch.setattr(sink_module, columns, getattr(sink_module, columns)[:-1])
    for row in ("lab_row", "seizure_row"):
        monkeypatch.setattr(sink_module, row, lambda item, _row=getattr(sink_module, row): _row(item)[:-1])


def _customs_corrected_before_0013(ch: Any, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Customs' S-1 corrected by S-2 as a worker before migration 0013 stored them (a retraction with no reporter),
    then the migrations 0013 and 0014 and the worker of 0014; returns the correction S-2 (to send again)."""
    from synthwatch.stream_apps.storage.clickhouse import available_migrations

    migrate(ch, [m for m in available_migrations() if m.version <= 12])
    _as_before_0014(monkeypatch)
    ClickHouseSink(ch).store_events(_events(seizure(event_id="S-1", occurred_at=NOW)))
    fix = seizure(event_id="S-2", occurred_at=NOW, corrects="S-1", quantity={"value": 30, "unit": "g"})
    assert ClickHouseSink(ch).store_events(_events(fix, first=1)).stored == 1
    ch.command(
        "INSERT INTO retractions (event_id, corrected, kind, occurred_at, country, region, substance_key, "
        "substance_name, family, grams) SELECT 'S-2', 'S-1', 'border_seizure', occurred_at, country, region, "
        "substance_key, resolved_name, family, ifNull(grams, 0) FROM border_seizures WHERE event_id = 'S-1'"
    )  # what the 0012 sink stored for it (the columns of 0012: no reporter)
    assert [m.version for m in migrate(ch, [m for m in available_migrations() if m.version <= 14])] == [13, 14]
    migrate(ch)  # and any later one (0015 on: other tables)
    monkeypatch.undo()  # the worker of 0014
    return fix


def _events(*records: dict[str, Any], first: int = 0) -> list[EnrichedEvent]:
    result = Intake().process([RawMessage(f"t:0:{first + i}", json.dumps(r)) for i, r in enumerate(records)])
    assert not result.rejects, result.rejects
    return result.events


def _take(
    ch: Any, sink: ClickHouseSink, items: list[EnrichedEvent], pending: Iterable[EnrichedEvent] = ()
) -> StoreResult:
    """What the worker does with a batch (runtime/corrections.judge_batch, then the checkpoint's store)."""
    pending = list(pending)
    named = {key for item in items if (key := corrected_key(item.event)) is not None}
    wanted = sorted(named - {item.key for item in pending})
    known = known_reports(stored_reports(ch, wanted), pending, named)
    judged = judge_corrections(items, known, lambda claim: claim)
    assert not judged.rejects, [r.reason for r in judged.rejects]
    return sink.store_events([*pending, *judged.kept])


_KEYS = {
    "reports_daily": ("toDate(occurred_at)", "day"),
    "reports_hourly": ("toStartOfHour(occurred_at)", "hour"),
}


def _aggregate(ch: Any, table: str) -> list[tuple[Any, ...]]:
    """The summing aggregate as a query reads it (sum ... GROUP BY), rows summing to nothing left out."""
    time = _KEYS[table][1]
    return ch.query(
        f"SELECT {time}, country, region, kind, family, substance_key, sum(reports) AS n, round(sum(grams), 6) "
        f"FROM {table} GROUP BY {time}, country, region, kind, family, substance_key HAVING n != 0 "
        f"ORDER BY {time}, kind, substance_key"
    ).result_rows


def _recount(ch: Any, table: str) -> list[tuple[Any, ...]]:
    """The same from the raw tables, every report counted unless a stored report of its reporter corrects it."""
    expression, time = _KEYS[table]
    parts = [
        f"SELECT {expression} AS {time}, country, region, '{kind}' AS kind, family, substance_key, "
        f"toInt64(count()) AS n, round(sum({grams}), 6) AS g FROM {raw} "
        f"WHERE ({who}, event_id) NOT IN (SELECT {who}, corrects FROM {raw} WHERE corrects != '') "
        f"GROUP BY {time}, country, region, family, substance_key"
        for raw, kind, grams, who in (
            ("lab_detections", "lab_detection", "0", "lab_id"),
            ("border_seizures", "border_seizure", "ifNull(grams, 0)", "agency"),
        )
    ]
    return ch.query(f"SELECT * FROM ({' UNION ALL '.join(parts)}) ORDER BY {time}, kind, substance_key").result_rows


def _substance(ch: Any, key: str) -> tuple[Any, ...]:
    """(first seen, last seen, reports) of a substance, network-wide and summed over its regions."""
    (network,) = ch.query(
        "SELECT min(first_seen), max(last_seen), sum(reports) FROM substance_first_seen WHERE substance_key = %(k)s",
        parameters={"k": key},
    ).result_rows
    (regional,) = ch.query(
        "SELECT sum(reports) FROM substance_region_first_seen WHERE substance_key = %(k)s", parameters={"k": key}
    ).result_rows
    return (*network, regional[0])


def _assert_recounted(ch: Any) -> None:
    for table in _KEYS:
        assert _aggregate(ch, table) == _recount(ch, table), table


def test_a_quantity_correction_counts_once_with_the_new_quantity(ch: Any) -> None:
    migrate(ch)
    sink = ClickHouseSink(ch)
    (original,) = _events(seizure(event_id="S-1", occurred_at=NOW, quantity={"value": 2.5, "unit": "kg"}))
    _take(ch, sink, [original])
    (fixed,) = _events(seizure(event_id="S-2", occurred_at=NOW, corrects="S-1", quantity={"value": 25, "unit": "g"}))
    assert _take(ch, sink, [fixed]).stored == 1
    key = original.substance.key
    (row,) = _aggregate(ch, "reports_daily")
    assert (row[5], row[6], row[7]) == (key, 1, 25.0)  # once, with 25 g, not twice with 2,525 g
    _assert_recounted(ch)
    assert _substance(ch, key)[2:] == (1, 1)


def test_a_substance_correction_moves_the_count_and_the_sighting_stays(ch: Any) -> None:
    migrate(ch)
    sink = ClickHouseSink(ch)
    (wrong,) = _events(lab(event_id="L-1", occurred_at=NOW, substance={"name": "isotonitazene"}))
    _take(ch, sink, [wrong])
    before = _substance(ch, wrong.substance.key)
    (right,) = _events(lab(event_id="L-2", occurred_at=NOW, corrects="L-1", substance={"name": "protonitazene"}))
    _take(ch, sink, [right])
    assert right.substance.key != wrong.substance.key
    (row,) = _aggregate(ch, "reports_daily")
    assert (row[5], row[6]) == (right.substance.key, 1)
    _assert_recounted(ch)
    # The wrong substance counts no report any more; its first and last sightings cannot be unseen.
    assert _substance(ch, wrong.substance.key) == (before[0], before[1], 0, 0)
    assert _substance(ch, right.substance.key)[2:] == (1, 1)


def test_a_replayed_batch_does_not_retract_twice(ch: Any) -> None:
    """A checkpoint may store the same batch twice (a crash after the insert); a restarted worker reads
    the batch again, judges it again (the original is corrected by this very correction: allowed) and
    stores it again. The correction's row is skipped by its id, and so is its retraction."""
    migrate(ch)
    sink = ClickHouseSink(ch)
    originals = _events(
        seizure(event_id="S-1", occurred_at=NOW),
        lab(event_id="L-1", occurred_at=NOW, substance={"name": "isotonitazene"}),
    )
    _take(ch, sink, originals)
    records = [
        seizure(event_id="S-2", occurred_at=NOW, corrects="S-1", quantity={"value": 3, "unit": "kg"}),
        lab(event_id="L-2", occurred_at=NOW, corrects="L-1", substance={"name": "protonitazene"}),
    ]
    batch = _events(*records, first=2)
    assert _take(ch, sink, batch).stored == 2
    once = {table: _aggregate(ch, table) for table in _KEYS}
    again = sink.store_events(batch)  # the same checkpoint stored again
    assert (again.already_stored, again.retractions) == (2, 0)
    replayed = _take(ch, sink, _events(*records, first=2))  # read again after a restart
    assert (replayed.stored, replayed.already_stored, replayed.retractions) == (0, 2, 0)
    assert {table: _aggregate(ch, table) for table in _KEYS} == once
    _assert_recounted(ch)
    assert _substance(ch, originals[0].substance.key)[2:] == (1, 1)


def test_a_crash_between_the_correction_and_its_retraction_is_made_good_once(ch: Any) -> None:
    """The correction's row stored, the worker killed before its retraction: the retry (the same checkpoint
    again, or the batch replayed) finds the row stored with the same content and adds the retraction once."""
    migrate(ch)
    sink = ClickHouseSink(ch)
    _take(ch, sink, _events(seizure(event_id="S-1", occurred_at=NOW)))
    record = seizure(event_id="S-2", occurred_at=NOW, corrects="S-1", quantity={"value": 1, "unit": "kg"})
    (fixed,) = _events(record, first=1)
    judged = judge_corrections([fixed], known_reports(stored_reports(ch, [S1]), [], {S1}), str).kept
    assert judged == [fixed] and fixed.retracts is not None
    # What the first attempt got done: the row (the sink's first insert), not the retraction.
    assert sink.store_events([replace(fixed, retracts=None)]).stored == 1
    assert sum(row[6] for row in _aggregate(ch, "reports_daily")) == 2  # counted twice until the retraction
    retry = sink.store_events([fixed])
    assert (retry.stored, retry.already_stored, retry.retractions) == (0, 1, 1)
    assert _take(ch, sink, _events(record, first=1)).retractions == 0  # and once more, read again
    _assert_recounted(ch)
    (row,) = _aggregate(ch, "reports_daily")
    assert (row[6], row[7]) == (1, 1000.0)


def test_an_identical_id_stored_without_a_digest_retracts_nothing(ch: Any) -> None:
    """A row stored by ``ingest-history`` (no digest, no ``corrects`` column) re-sent as a correction is a
    duplicate: it was never stored as a correction, so it takes nothing out."""
    migrate(ch)
    sink = ClickHouseSink(ch)
    _take(ch, sink, _events(seizure(event_id="S-1", occurred_at=NOW)))
    record = seizure(event_id="S-2", occurred_at=NOW, corrects="S-1", quantity={"value": 1, "unit": "kg"})
    (history,) = _events(record)
    history.digest = ""
    history.event = history.event.model_copy(update={"corrects": None})
    sink.store_events([history])
    result = _take(ch, sink, _events(record, first=1))
    assert (result.stored, result.already_stored, result.retractions) == (0, 1, 0)
    assert sum(row[6] for row in _aggregate(ch, "reports_daily")) == 2


def test_corrections_of_reports_not_stored_yet_and_chains(ch: Any) -> None:
    """The original taken since the last checkpoint (pending) or earlier in the same batch, and a
    correction corrected in turn: each report in the chain but the last counts nothing."""
    migrate(ch)
    sink = ClickHouseSink(ch)
    pending = _events(seizure(event_id="S-1", occurred_at=NOW), lab(event_id="L-1", occurred_at=NOW))
    batch = _events(
        seizure(event_id="S-2", occurred_at=NOW, corrects="S-1", quantity={"value": 40, "unit": "g"}),
        lab(event_id="L-2", occurred_at=NOW, corrects="L-1", substance={"name": "isotonitazene"}),
        lab(event_id="L-3", occurred_at="2026-03-03T10:00:00Z", corrects="L-2", substance={"name": "protonitazene"}),
        seizure(event_id="S-3", occurred_at=NOW, region="ML-2", corrects="S-2"),  # another region, 2.5 kg
        first=2,
    )
    assert _take(ch, sink, batch, pending).stored == 6
    _assert_recounted(ch)
    daily = _aggregate(ch, "reports_daily")
    assert sum(row[6] for row in daily) == 2  # one seizure, one lab detection
    assert [(row[2], row[7]) for row in daily if row[3] == "border_seizure"] == [("ML-2", 2500.0)]
    assert [(str(row[0]), row[5]) for row in daily if row[3] == "lab_detection"] == [
        ("2026-03-03", batch[2].substance.key)
    ]


def test_reports_without_corrections_count_as_before(ch: Any) -> None:
    migrate(ch)
    sink = ClickHouseSink(ch)
    records = [seizure(event_id=f"s-{i}", occurred_at=f"2026-03-{1 + i % 5:02d}T1{i % 10}:00:00Z") for i in range(30)]
    records += [lab(event_id=f"l-{i}", occurred_at=f"2026-03-{1 + i % 5:02d}T0{i % 10}:00:00Z") for i in range(20)]
    _take(ch, sink, _events(*records))
    assert not ch.query("SELECT count() FROM reports_daily WHERE reports < 0").result_rows[0][0]
    assert sum(row[6] for row in _aggregate(ch, "reports_daily")) == 50
    _assert_recounted(ch)


def test_stats_leave_out_a_substance_whose_only_report_was_corrected_away(ch: Any, ch_settings: Settings) -> None:
    migrate(ch)
    sink = ClickHouseSink(ch)
    # Today at midnight, as the engine sees it: `stats` counts the last days, whatever day the test runs.
    today = ch.query("SELECT toString(toStartOfDay(now64(3, 'UTC')))").result_rows[0][0].replace(" ", "T") + "Z"
    (wrong,) = _events(lab(event_id="L-1", occurred_at=today, substance={"name": "isotonitazene"}))
    _take(ch, sink, [wrong])
    (right,) = _events(lab(event_id="L-2", occurred_at=today, corrects="L-1", substance={"name": "protonitazene"}))
    _take(ch, sink, [right])
    rows = stats(ch_settings, days=2)
    assert [(row.substance_key, row.reports) for row in rows] == [(right.substance.key, 1)]


def test_corrections_stored_before_the_migration_are_retracted_by_it(ch: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker of migration 0011 stored corrections without retractions; migrating to 0012 retracts each
    one once, from the rows they correct, so the aggregates equal the recount from then on."""
    from synthwatch.stream_apps.storage.clickhouse import available_migrations

    migrate(ch, [m for m in available_migrations() if m.version <= 11])
    sink = ClickHouseSink(ch)
    _as_before_0014(monkeypatch)
    before = _events(
        seizure(event_id="S-1", occurred_at=NOW),
        lab(event_id="L-1", occurred_at=NOW, substance={"name": "isotonitazene"}),
    )
    sink.store_events(before)
    fixes = _events(
        seizure(event_id="S-2", occurred_at=NOW, corrects="S-1", quantity={"value": 30, "unit": "g"}),
        lab(event_id="L-2", occurred_at=NOW, corrects="L-1", substance={"name": "protonitazene"}),
        first=2,
    )
    assert sink.store_events(fixes).stored == 2  # the 0011 worker's rows: no retraction judged
    assert sum(row[6] for row in _aggregate(ch, "reports_daily")) == 4
    assert [m.version for m in migrate(ch, [m for m in available_migrations() if m.version <= 12])] == [12]
    _assert_recounted(ch)
    assert sum(row[6] for row in _aggregate(ch, "reports_daily")) == 2
    assert ch.query("SELECT corrected FROM retractions ORDER BY event_id").result_rows == [("L-1",), ("S-1",)]
    # retractions get their reporter column ('' for these); later migrations (0015 on) touch other tables
    assert [m.version for m in migrate(ch, [m for m in available_migrations() if m.version <= 14])] == [13, 14]
    migrate(ch)
    monkeypatch.undo()  # the worker of 0014
    # The worker of 0013 finds them retracted: storing the judged corrections again retracts nothing more.
    assert (
        _take(
            ch,
            sink,
            _events(
                seizure(event_id="S-2", occurred_at=NOW, corrects="S-1", quantity={"value": 30, "unit": "g"}), first=2
            ),
        ).retractions
        == 0
    )
    _assert_recounted(ch)


def test_two_reporters_corrections_under_one_id_each_retract_their_own_report(ch: Any) -> None:
    """Event ids are unique per reporter only: two labs' LIMS both number a report 2026-000123 and its
    correction 2026-000124. Each correction takes its own lab's report out of the counts, once: a
    retraction is one per (reporter, correction id), and a replay of either retracts nothing more."""
    migrate(ch)
    sink = ClickHouseSink(ch)
    reports = _events(
        lab(event_id="2026-000123", lab_id="LAB-A", occurred_at=NOW, substance={"name": "isotonitazene"}),
        lab(event_id="2026-000123", lab_id="LAB-B", occurred_at=NOW, substance={"name": "etonitazene"}),
        seizure(event_id="2026-000123", occurred_at=NOW, quantity={"value": 2, "unit": "kg"}),
        seizure(event_id="2026-000123", agency="Police", occurred_at=NOW, quantity={"value": 3, "unit": "kg"}),
    )
    assert _take(ch, sink, reports).stored == 4
    fixes = _events(
        lab(
            event_id="2026-000124",
            lab_id="LAB-A",
            occurred_at=NOW,
            corrects="2026-000123",
            substance={"name": "protonitazene"},
        ),
        lab(
            event_id="2026-000124",
            lab_id="LAB-B",
            occurred_at=NOW,
            corrects="2026-000123",
            substance={"name": "metonitazene"},
        ),
        seizure(event_id="2026-000124", occurred_at=NOW, corrects="2026-000123", quantity={"value": 20, "unit": "g"}),
        seizure(
            event_id="2026-000124",
            agency="Police",
            occurred_at=NOW,
            corrects="2026-000123",
            quantity={"value": 30, "unit": "g"},
        ),
        first=4,
    )
    result = _take(ch, sink, fixes)
    assert (result.stored, result.retractions) == (4, 4)
    _assert_recounted(ch)
    assert sum(row[6] for row in _aggregate(ch, "reports_daily")) == 4
    assert sorted(ch.query("SELECT reporter, corrected, kind FROM retractions").result_rows) == [
        ("agency:Douanes maliennes", "2026-000123", "border_seizure"),
        ("agency:Police", "2026-000123", "border_seizure"),
        ("lab:LAB-A", "2026-000123", "lab_detection"),
        ("lab:LAB-B", "2026-000123", "lab_detection"),
    ]
    ch.command("OPTIMIZE TABLE retractions FINAL")  # a merge keeps every reporter's row (reporter is in the key)
    assert ch.query("SELECT count() FROM retractions").result_rows[0][0] == 4
    again = sink.store_events(fixes)  # the judged items, replayed (their `retracts` still set)
    assert (again.stored, again.retractions) == (0, 0)
    _assert_recounted(ch)


def test_a_retraction_stored_before_migration_0013_stands_for_its_own_correction_only(
    ch: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A retraction stored before 0013 has no reporter (''). A retry of its own correction (same kind, id and
    corrected id) still finds it and retracts nothing more; another reporter's correction under the same id
    (of another report id) is not withheld its retraction by it (by event id alone it was)."""
    fix = _customs_corrected_before_0013(ch, monkeypatch)
    sink = ClickHouseSink(ch)
    _assert_recounted(ch)
    assert _take(ch, sink, _events(fix, first=1)).retractions == 0  # the retry: its retraction is the '' row
    _assert_recounted(ch)
    # Another agency's correction under the same id, of its own report: its own retraction, despite the '' row.
    police = _events(seizure(event_id="P-1", agency="Police", occurred_at=NOW), first=2)
    assert _take(ch, sink, police).stored == 1
    theirs = seizure(
        event_id="S-2", agency="Police", occurred_at=NOW, corrects="P-1", quantity={"value": 9, "unit": "g"}
    )
    assert _take(ch, sink, _events(theirs, first=3)).retractions == 1
    _assert_recounted(ch)
    assert sum(row[6] for row in _aggregate(ch, "reports_daily")) == 2


def test_a_retraction_stored_before_migration_0013_withholds_no_other_reporters_alike_numbered_one(
    ch: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two agencies' systems number alike: before the upgrade, customs corrected S-1 with S-2 (its retraction
    has reporter ''); after it, the police store their own S-1 and correct it with their own S-2. The '' row is
    customs' (their S-2 was stored first): the police's correction gets its own retraction. Matched by kind, id
    and corrected id, the '' row withheld it, and the police's corrected S-1 counted twice."""
    fix = _customs_corrected_before_0013(ch, monkeypatch)
    sink = ClickHouseSink(ch)
    assert _take(ch, sink, _events(fix, first=1)).retractions == 0  # customs' retry: its retraction is the '' row
    police = _events(seizure(event_id="S-1", agency="Police", occurred_at=NOW), first=2)
    assert _take(ch, sink, police).stored == 1
    theirs = seizure(
        event_id="S-2", agency="Police", occurred_at=NOW, corrects="S-1", quantity={"value": 9, "unit": "g"}
    )
    assert _take(ch, sink, _events(theirs, first=3)).retractions == 1
    assert _take(ch, sink, _events(theirs, first=3)).retractions == 0  # the police's retry: once
    _assert_recounted(ch)
    assert sum(row[6] for row in _aggregate(ch, "reports_daily")) == 2
