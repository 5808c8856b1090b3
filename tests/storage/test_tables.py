"""The table declarations in :mod:`synthwatch.stream_apps.storage.tables` against the migrated schema.

Why: the sink, ``ingest-history`` and the deliveries store insert by column name from these lists; a
column renamed in a migration but not here (or a list edited without a migration) fails only when that
writer first runs. Here every list is checked against ``DESCRIBE TABLE`` of a freshly migrated engine,
and every row builder against its list (each value under the column of the same name).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from synthwatch.schemas import Alert, BorderSeizure, LabDetection, Reject
from synthwatch.schemas.records import AlertSubstance, GuessedFamily, LearntNeighbours, SimilarSubstance
from synthwatch.stream_apps.detect.intake import EnrichedEvent, Intake, RawMessage
from synthwatch.stream_apps.storage import tables
from synthwatch.stream_apps.storage.clickhouse import migrate
from tests.support.factories import lab, seizure

#: (table, a column list a writer inserts with): every list tables.py declares.
DECLARED = [
    (tables.LAB_TABLE, "HISTORY_LAB_COLUMNS"),
    (tables.LAB_TABLE, "SINK_LAB_COLUMNS"),
    (tables.SEIZURE_TABLE, "HISTORY_SEIZURE_COLUMNS"),
    (tables.SEIZURE_TABLE, "SINK_SEIZURE_COLUMNS"),
    (tables.REJECT_TABLE, "REJECT_COLUMNS"),
    (tables.ALERT_TABLE, "ALERT_COLUMNS"),
    (tables.DELIVERY_TABLE, "DELIVERY_COLUMNS"),
    (tables.RETRACTION_TABLE, "RETRACTION_COLUMNS"),
]


@pytest.fixture
def migrated(ch: Any) -> Any:
    migrate(ch)
    return ch


def _describe(client: Any, table: str) -> dict[str, str]:
    """Column name -> its default kind ('' when none; DEFAULT, MATERIALIZED or ALIAS otherwise), in order."""
    return {row[0]: row[2] for row in client.query(f"DESCRIBE TABLE {table}").result_rows}


def test_every_column_list_names_columns_of_its_migrated_table(migrated: Any) -> None:
    for table, name in DECLARED:
        declared: list[str] = getattr(tables, name)
        described = _describe(migrated, table)
        assert len(set(declared)) == len(declared), f"{name} names a column twice"
        assert not set(declared) - set(described), f"{name}: not in {table}: {set(declared) - set(described)}"
        # What a writer leaves out, the engine must fill: a column without a default left out is a forgotten one.
        left_out = {column for column in described if column not in declared and not described[column]}
        assert not left_out, f"{name} leaves out {table} columns that have no default: {left_out}"
        # Computed columns cannot be inserted into.
        computed = {column for column in declared if described[column] in ("MATERIALIZED", "ALIAS")}
        assert not computed, f"{name} inserts into computed columns of {table}: {computed}"


def test_the_stream_writes_every_column_the_backfill_writes_and_its_own_two() -> None:
    assert [*tables.LAB_COLUMNS, "late", "content_hash", "corrects", "reporter"] == tables.SINK_LAB_COLUMNS
    assert [*tables.SEIZURE_COLUMNS, "late", "content_hash", "corrects", "reporter"] == tables.SINK_SEIZURE_COLUMNS


def _value_of(source: Any, column: str) -> tuple[bool, Any]:
    """(found, value) of the attribute a column stores: ``x`` or ``substance.x`` for ``substance_x``."""
    if column.startswith("substance_") and hasattr(source, "substance"):
        inner = column.removeprefix("substance_")
        if hasattr(source.substance, inner):
            return True, getattr(source.substance, inner)
    if column in type(source).__dict__ or column in getattr(type(source), "model_fields", {}):
        return True, getattr(source, column)
    return False, None


def _check_row(columns: list[str], row: Any, source: Any) -> int:
    """Every value of ``row`` that stores an attribute of ``source`` is under that attribute's column.

    Returns how many columns were checked by name (so a test can tell the check was not vacuous)."""
    assert len(row) == len(columns)
    checked = 0
    for column, value in zip(columns, row, strict=True):
        found, expected = _value_of(source, column)
        if not found:
            continue
        checked += 1
        if column == "details":
            value = json.loads(value)
        elif column == "similar_substances":  # a JSON list, '' when there is none
            value, expected = (json.loads(value) if value else []), [n.model_dump() for n in expected]
        elif column == "family_guess":  # the guessed family's name
            expected = expected.family if expected else ""
        elif column == "learnt_substances":  # a JSON object {as_of, substances}, '' when not looked up
            value = LearntNeighbours.model_validate_json(value) if value else None
        assert value == expected or (expected is None and value == ""), f"{column}: {value!r} != {expected!r}"
    return checked


def _enriched(records: list[dict[str, Any]]) -> list[EnrichedEvent]:
    return Intake().process([RawMessage(f"t:0:{i}", json.dumps(r)) for i, r in enumerate(records)]).events


def test_event_rows_put_each_value_under_its_column(migrated: Any) -> None:
    extra = {"origin_country": "GN", "destination_country": "SN", "reported_at": "2026-03-02T08:00:00Z"}
    lab_item, seizure_item = _enriched([lab(lab_id="LAB-X", sample_id="S-X", confirmed=False), seizure(**extra)])
    assert isinstance(lab_item.event, LabDetection) and isinstance(seizure_item.event, BorderSeizure)
    lab_row, seizure_row = tables.lab_row(lab_item), tables.seizure_row(seizure_item)
    assert _check_row(tables.SINK_LAB_COLUMNS, lab_row, lab_item.event) >= 15
    assert _check_row(tables.SINK_SEIZURE_COLUMNS, seizure_row, seizure_item.event) >= 15
    by_column = dict(zip(tables.SINK_SEIZURE_COLUMNS, seizure_row, strict=True))
    assert (by_column["quantity_value"], by_column["quantity_unit"], by_column["grams"]) == (2.5, "kg", 2500.0)
    assert (by_column["substance_key"], by_column["family"]) == tables.substance_values(seizure_item.substance)[::3]
    assert (by_column["late"], by_column["content_hash"]) == (seizure_item.late, seizure_item.digest)
    # The engine takes them as they are, by name: the types line up too.
    for table, columns, row in (
        (tables.LAB_TABLE, tables.SINK_LAB_COLUMNS, lab_row),
        (tables.SEIZURE_TABLE, tables.SINK_SEIZURE_COLUMNS, seizure_row),
    ):
        migrated.insert(table, [list(row)], column_names=columns)
        stored = migrated.query(f"SELECT {', '.join(columns)} FROM {table}").result_rows
        assert len(stored) == 1 and stored[0][columns.index("event_id")] == row[0]


def test_reject_alert_and_delivery_rows_put_each_value_under_its_column(migrated: Any) -> None:
    reject = Reject.of(b'{"broken', source="file.ndjson:7", reason="invalid JSON", stage="ingest", event_id="e-7")
    reject_row = tables.reject_row(reject)
    assert _check_row(tables.REJECT_COLUMNS, reject_row, reject) == len(tables.REJECT_COLUMNS) - 1
    assert reject_row[tables.REJECT_COLUMNS.index("reject_id")] == tables.reject_id(reject)

    moment = datetime(2026, 3, 1, 12, tzinfo=UTC)
    alert = Alert(
        alert_id="spike:ML-BKO:KEY:1",
        alert_type="spike",
        severity="warning",
        country="ML",
        region="ML-BKO",
        substance=AlertSubstance(name="Tramadol", key="KEY", inchikey="KEY-INCHI", family="opioid"),
        metric="quantity",
        observed=12.0,
        expected=3.0,
        score=4.5,
        window_start=moment,
        window_end=moment,
        triggered_at=moment,
        evidence_event_ids=["e1", "e2"],
        summary="A spike.",
        details={"why": "test"},
    )
    alert_row = tables.alert_row(alert)
    assert _check_row(tables.ALERT_COLUMNS, alert_row, alert) >= 20
    assert alert_row[tables.ALERT_COLUMNS.index("family")] == "opioid"
    chemistry = alert.model_copy(
        update={
            "similar_substances": [SimilarSubstance(name="Etonitazene", key="K2", score=0.8, catalogued=True)],
            "family_guess": GuessedFamily(family="nitazene", score=0.8, nearest="Etonitazene"),
            "did_you_mean": ["Etonitazene"],
            "learnt_substances": LearntNeighbours(
                as_of=moment, substances=[SimilarSubstance(name="Proto'<x>", key="K3", score=0.7, catalogued=False)]
            ),
        }
    )
    assert _check_row(tables.ALERT_COLUMNS, tables.alert_row(chemistry), chemistry) >= 24
    migrated.insert(tables.ALERT_TABLE, [tables.alert_row(chemistry)], column_names=tables.ALERT_COLUMNS)
    (stored,) = migrated.query("SELECT learnt_substances FROM alerts").result_rows
    assert LearntNeighbours.model_validate_json(stored[0]) == chemistry.learnt_substances
    migrated.command("TRUNCATE TABLE alerts")

    attempt = tables.Attempt("a1", "o1", "hook", "webhook", "r", 2, "failed", "refused", 503, "https://x", moment)
    delivery_row = attempt.row()
    assert _check_row(tables.DELIVERY_COLUMNS, delivery_row, attempt) == len(tables.DELIVERY_COLUMNS)

    for table, columns, row in (
        (tables.REJECT_TABLE, tables.REJECT_COLUMNS, reject_row),
        (tables.ALERT_TABLE, tables.ALERT_COLUMNS, alert_row),
        (tables.DELIVERY_TABLE, tables.DELIVERY_COLUMNS, delivery_row),
    ):
        migrated.insert(table, [row], column_names=columns)
        assert migrated.query(f"SELECT count() FROM {table}").result_rows == [(1,)]
