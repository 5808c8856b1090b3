"""ClickHouse look-ups for corrections: the reports a batch's corrections name, the alerts resting on them.

Both are one query per table for a whole batch (ids bound as one ``Array(String)`` parameter, as the sink's
stored-id check does), so a batch of corrections costs a few queries, never one per event; a batch with no
correction costs none (the caller skips the call). The link old -> new is the ``corrects`` column of the
new report (migration 0011): a report is corrected when a row of its table, of the same reporter, names it
(event ids are unique per reporter only: reports are looked up by (reporter, event id)).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from synthwatch.schemas.events import EventKind
from synthwatch.schemas.records import AlertSubstance
from synthwatch.stream_apps.detect.corrections import CitedAlert, Counted, ReportFacts, ReportKey
from synthwatch.stream_apps.storage.tables import ALERT_TABLE, LAB_TABLE, REPORTER_COLUMN, SEIZURE_TABLE, utc_aware

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client

_FACTS: dict[str, tuple[EventKind, str, str, str]] = {  # kind, reporter, quantity, grams counted
    LAB_TABLE: ("lab_detection", "concat('lab:', any(lab_id))", "''", "CAST(NULL, 'Nullable(Float64)')"),
    SEIZURE_TABLE: (
        "border_seizure",
        "concat('agency:', any(agency))",
        "concat(toString(any(quantity_value)), ' ', any(quantity_unit))",
        "any(grams)",
    ),
}
# What a report added to the counts (:class:`Counted`), as the counting views (migration 0003) read its row.
_COUNTED = "any(occurred_at), any(country), any(region), any(substance_key), any(resolved_name), any(family)"


def stored_reports(client: Client, keys: Sequence[ReportKey]) -> dict[ReportKey, ReportFacts]:
    """The stored reports among ``keys`` ((``lab:ID``/``agency:NAME``, event id), either kind), each with the
    id of its stored correction (by the same reporter), if any, and what it added to the counts (which a
    correction of it takes out).

    Caller holds the client's lock. Rows stored by ``ingest-history`` count as stored: their reporter
    columns are the same."""
    found: dict[ReportKey, ReportFacts] = {}
    for table, (kind, reporter, quantity, grams) in _FACTS.items():
        column, prefix = REPORTER_COLUMN[table]
        pairs = sorted({(who.removeprefix(prefix), event_id) for who, event_id in keys if who.startswith(prefix)})
        if not pairs:
            continue
        ids = sorted({event_id for _, event_id in pairs})
        rows = client.query(
            f"SELECT {column}, event_id, {reporter}, any(if(substance_name != '', substance_name, resolved_name)), "
            f"{quantity}, {_COUNTED}, {grams} FROM {table} WHERE event_id IN {{ids:Array(String)}} "
            f"AND ({column}, event_id) IN {{pairs:Array(Tuple(String, String))}} GROUP BY {column}, event_id",
            parameters={"ids": ids, "pairs": pairs},
        ).result_rows
        corrected: dict[tuple[str, str], str] = {
            (str(by), str(old)): str(new)
            for by, old, new in client.query(
                f"SELECT {column}, corrects, min(event_id) FROM {table} "
                f"WHERE corrects IN {{ids:Array(String)}} AND ({column}, corrects) IN "
                f"{{pairs:Array(Tuple(String, String))}} GROUP BY {column}, corrects",
                parameters={"ids": ids, "pairs": pairs},
            ).result_rows
        }
        for by, event_id, who, substance, amount, *counted in rows:
            found[(prefix + by, event_id)] = ReportFacts(
                event_id, kind, who, substance, _quantity(amount), corrected.get((by, event_id)), Counted(*counted)
            )
    return found


def _quantity(text: str) -> str:
    """``2.5 kg`` as the notice shows it (ClickHouse prints floats its own way: ``2500`` or ``2.5``)."""
    value, _, unit = text.partition(" ")
    try:
        return f"{float(value):g} {unit}".strip()
    except ValueError:
        return text


def reporters_under(client: Client, ids: Sequence[str]) -> dict[str, set[str]]:
    """Event id -> the claimed reporters (``lab:ID``/``agency:NAME``) with a stored report under it, either
    kind: whether an alert's evidence id (an id alone) may name another reporter's report. Caller holds the lock."""
    found: dict[str, set[str]] = {}
    if not ids:
        return found
    for table in (LAB_TABLE, SEIZURE_TABLE):
        column, prefix = REPORTER_COLUMN[table]
        for event_id, who in client.query(
            f"SELECT DISTINCT event_id, {column} FROM {table} WHERE event_id IN {{ids:Array(String)}}",
            parameters={"ids": list(ids)},
        ).result_rows:
            found.setdefault(str(event_id), set()).add(prefix + str(who))
    return found


def alerts_citing(client: Client, ids: Sequence[str]) -> list[CitedAlert]:
    """Every stored alert whose evidence names one of ``ids`` (corrected reports), correction notices left out.

    Evidence holds event ids alone: an alert resting on another reporter's report under the same id is
    found too; :func:`~synthwatch.stream_apps.detect.corrections.rests_on` tells them apart."""
    if not ids:
        return []
    rows = client.query(
        "SELECT alert_id, any(alert_type), any(severity), any(country), any(region), any(substance_key), "
        "any(substance_name), any(substance_inchikey), any(family), any(controlled), any(window_start), "
        "any(window_end), any(triggered_at), any(evidence_event_ids), min(detected_at) "
        f"FROM {ALERT_TABLE} WHERE hasAny(evidence_event_ids, {{ids:Array(String)}}) "
        "AND alert_type != 'correction' GROUP BY alert_id ORDER BY alert_id",
        parameters={"ids": list(ids)},
    ).result_rows
    return [_cited(row) for row in rows]


def _cited(row: Sequence[Any]) -> CitedAlert:
    (
        alert_id,
        kind,
        severity,
        country,
        region,
        key,
        name,
        inchikey,
        family,
        controlled,
        start,
        end,
        at,
        evidence,
        seen,
    ) = row
    substance = AlertSubstance(
        name=name, key=key, inchikey=inchikey or None, family=family or None, controlled=controlled
    )
    return CitedAlert(
        alert_id,
        kind,
        severity,
        country or None,
        region or None,
        substance,
        start,
        end,
        at,
        tuple(evidence),
        utc_aware(seen),  # naive as read: without its offset the notice's corrected_detected_at would be refused
    )
