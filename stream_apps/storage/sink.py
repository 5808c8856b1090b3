"""Writing events and rejects into ClickHouse, idempotently and in batches.

Idempotency: before inserting, the sink asks which of the batch's ``event_id`` values are already
stored (ids bound as one Array(String) parameter, never spliced into the SQL text, which capped a
batch at ~15,000 ids) and drops those,
 so a replayed partition or a re-sent file adds no rows (counts are right
without FINAL). The tables are ReplacingMergeTree on a key ending in ``event_id`` as a backstop.
Inserts are column-oriented: one Python list per column is far cheaper than row tuples. Row values come
from ``lab_values`` / ``seizure_values``, which ``ingest-history`` shares, so both writers store the same.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from clickhouse_connect.driver.client import Client

from synthwatch.schemas import Alert, BorderSeizure, LabDetection, Reject
from synthwatch.stream_apps.detect.identity import NormalisedQuantity, ResolvedSubstance
from synthwatch.stream_apps.detect.intake import EnrichedEvent

# The sink never inserts an id twice in one block (ids already stored are filtered, and so are the
# repeats of an id within the call), so merging Replacing/Summing rows at insert time is wasted work.
INSERT_SETTINGS = {"optimize_on_insert": 0}

LAB_TABLE = "lab_detections"

SEIZURE_TABLE = "border_seizures"
REJECT_TABLE = "rejects"

_COMMON = [
    "event_id",
    "occurred_at",
    "reported_at",
    "country",
    "region",
    "substance_name",
    "substance_smiles",
    "substance_inchikey",
    "substance_cas",
    "substance_key",
    "resolved_name",
    "resolved_inchikey",
    "family",
    "extra",
]
LAB_COLUMNS = [*_COMMON, "lab_id", "sample_id", "sample_type", "method", "confirmed", "purity_pct"]
SEIZURE_COLUMNS = [
    *_COMMON,
    "agency",
    "seizure_id",
    "border_point",
    "conveyance",
    "quantity_value",
    "quantity_unit",
    "grams",
    "millilitres",
    "units",
    "origin_country",
    "destination_country",
]
# The stream also stores whether a report was late (``ingest-history`` leaves the column to its default).
SINK_LAB_COLUMNS = [*LAB_COLUMNS, "late", "content_hash"]
SINK_SEIZURE_COLUMNS = [*SEIZURE_COLUMNS, "late", "content_hash"]
REJECT_COLUMNS = ["reject_id", "rejected_at", "stage", "source", "reason", "event_id", "raw"]
ALERT_TABLE = "alerts"
ALERT_COLUMNS = [
    "alert_id",
    "alert_type",
    "severity",
    "country",
    "region",
    "substance_key",
    "substance_name",
    "substance_inchikey",
    "family",
    "controlled",
    "metric",
    "observed",
    "expected",
    "score",
    "window_start",
    "window_end",
    "triggered_at",
    "detected_at",
    "evidence_event_ids",
    "summary",
    "identification_methods",
    "sample_types",
    "details",
    "reported_late",
    "late_by_hours",
    "identified_by",
    "reported_by",
    "similar_substances",
    "family_guess",
    "did_you_mean",
]


@dataclass(slots=True, frozen=True)
class StoreResult:
    """What one call stored: new rows per table, events skipped because already stored (same content),
    and ``changed``: events whose id is stored with other content (to be rejected, never stored)."""

    lab_detections: int = 0
    border_seizures: int = 0
    already_stored: int = 0
    changed: tuple[EnrichedEvent, ...] = ()

    @property
    def stored(self) -> int:
        return self.lab_detections + self.border_seizures


SubstanceValues = tuple[str, str, str | None, str]
"""The resolved substance as stored: key, display name, InChIKey, family ("" when none)."""
QuantityValues = tuple[float | None, float | None, float | None]
"""A seized amount as stored: grams, millilitres, units (each None when the unit is not of that kind)."""


def substance_values(substance: ResolvedSubstance) -> SubstanceValues:
    return substance.key, substance.display_name, substance.inchikey, substance.family or ""


def quantity_values(quantity: NormalisedQuantity | None) -> QuantityValues:
    return (quantity.grams, quantity.millilitres, quantity.units) if quantity else (None, None, None)


def extra_text(event: LabDetection | BorderSeizure) -> str:
    """The ``extra`` column: unknown fields kept verbatim as JSON, ``{}`` for nearly every report."""
    if not event.model_extra and not event.substance.model_extra:
        return "{}"
    return json.dumps(event.extra_fields, ensure_ascii=False, default=str)


def lab_values(event: LabDetection, substance: SubstanceValues) -> tuple[Any, ...]:
    """One row of :data:`LAB_COLUMNS` (the sink and ``ingest-history`` both store these values)."""
    s = event.substance
    return (
        event.event_id,
        event.occurred_at,
        event.reported_at,
        event.country,
        event.region,
        s.name or "",
        s.smiles,
        s.inchikey,
        s.cas,
        *substance,
        extra_text(event),
        event.lab_id,
        event.sample_id,
        event.sample_type,
        event.method,
        event.confirmed,
        event.purity_pct,
    )


def seizure_values(event: BorderSeizure, substance: SubstanceValues, quantity: QuantityValues) -> tuple[Any, ...]:
    """One row of :data:`SEIZURE_COLUMNS` (the sink and ``ingest-history`` both store these values)."""
    s, q = event.substance, event.quantity
    return (
        event.event_id,
        event.occurred_at,
        event.reported_at,
        event.country,
        event.region,
        s.name or "",
        s.smiles,
        s.inchikey,
        s.cas,
        *substance,
        extra_text(event),
        event.agency,
        event.seizure_id,
        event.border_point,
        event.conveyance,
        q.value,
        q.unit,
        *quantity,
        event.origin_country or "",
        event.destination_country or "",
    )


def lab_row(item: EnrichedEvent) -> tuple[Any, ...]:
    """One row of :data:`SINK_LAB_COLUMNS`."""
    return (*lab_values(cast(LabDetection, item.event), substance_values(item.substance)), item.late, item.digest)


def seizure_row(item: EnrichedEvent) -> tuple[Any, ...]:
    """One row of :data:`SINK_SEIZURE_COLUMNS`."""
    values = seizure_values(
        cast(BorderSeizure, item.event), substance_values(item.substance), quantity_values(item.quantity)
    )
    return (*values, item.late, item.digest)


def reject_id(reject: Reject) -> str:
    """Stable id of a reject: the same refused input from the same place is stored once."""
    digest = hashlib.sha256(f"{reject.stage}\x1f{reject.source}\x1f{reject.raw}".encode())
    return digest.hexdigest()[:32]


def reject_row(reject: Reject) -> list[Any]:
    return [
        reject_id(reject),
        reject.rejected_at,
        reject.stage,
        reject.source,
        reject.reason,
        reject.event_id,
        reject.raw,
    ]


def alert_row(alert: Alert) -> list[Any]:
    s = alert.substance
    return [
        alert.alert_id,
        alert.alert_type,
        alert.severity,
        alert.country or "",
        alert.region or "",
        s.key,
        s.name,
        s.inchikey,
        s.family or "",
        s.controlled,
        alert.metric or "",
        alert.observed,
        alert.expected,
        alert.score,
        alert.window_start,
        alert.window_end,
        alert.triggered_at,
        alert.detected_at,
        alert.evidence_event_ids,
        alert.summary,
        alert.identification_methods,
        alert.sample_types,
        json.dumps(alert.details, ensure_ascii=False, default=str),
        alert.reported_late,
        alert.late_by_hours,
        alert.identified_by or "",
        alert.reported_by,
        json.dumps([n.model_dump() for n in alert.similar_substances], ensure_ascii=False)
        if alert.similar_substances
        else "",
        alert.family_guess.family if alert.family_guess else "",
        alert.did_you_mean,
    ]


def _columns(rows: Sequence[Sequence[Any]], width: int) -> list[list[Any]]:
    return [[row[i] for row in rows] for i in range(width)] if rows else [[] for _ in range(width)]


class ClickHouseSink:
    """Stores batches; thread-safe (one lock per client) so it can run in an executor thread."""

    def __init__(self, client: Client, lock: threading.Lock | None = None) -> None:
        self.client = client
        self.lock = lock or threading.Lock()

    def _stored_ids(self, table: str, ids: Sequence[str]) -> set[str]:
        return set(self._stored_digests(table, ids))

    def _stored_digests(self, table: str, ids: Sequence[str]) -> dict[str, str]:
        """Stored event id -> content digest ('' for rows stored before digests, or by ingest-history)."""
        if not ids:
            return {}
        rows = self.client.query(
            f"SELECT event_id, any(content_hash) FROM {table} "
            "WHERE event_id IN {ids:Array(String)} GROUP BY event_id",
            parameters={"ids": list(ids)},
        ).result_rows
        return {row[0]: row[1] for row in rows}

    def _insert_new(
        self,
        table: str,
        items: list[EnrichedEvent],
        columns: list[str],
        to_row: Callable[..., Sequence[Any]],
        changed: list[EnrichedEvent],
    ) -> tuple[int, int]:
        """Insert the events not stored yet; an id stored with another digest goes to ``changed``."""
        stored = self._stored_digests(table, [item.event_id for item in items])
        fresh = []
        for item in items:  # a checkpoint spans batches: an id may come twice in one call (a re-send)
            known = stored.get(item.event_id)
            if known is None:
                stored[item.event_id] = item.digest
                fresh.append(to_row(item))
            elif known and item.digest and known != item.digest:
                changed.append(item)
        if fresh:
            self.client.insert(
                table,
                _columns(fresh, len(columns)),
                column_names=columns,
                column_oriented=True,
                settings=INSERT_SETTINGS,
            )
        return len(fresh), len(items) - len(fresh) - len(changed)

    def stored_event_ids(self, items: Sequence[EnrichedEvent]) -> set[str]:
        """Which of these events are already stored (a re-sent old event is a duplicate, not late)."""
        labs = [i.event_id for i in items if isinstance(i.event, LabDetection)]
        seizures = [i.event_id for i in items if isinstance(i.event, BorderSeizure)]
        with self.lock:
            return self._stored_ids(LAB_TABLE, labs) | self._stored_ids(SEIZURE_TABLE, seizures)

    def store_events(self, items: Sequence[EnrichedEvent]) -> StoreResult:
        """Insert the events not stored yet; safe to call again with the same batch after a failure."""
        labs = [item for item in items if isinstance(item.event, LabDetection)]
        seizures = [item for item in items if isinstance(item.event, BorderSeizure)]
        changed_labs: list[EnrichedEvent] = []
        changed_seizures: list[EnrichedEvent] = []
        with self.lock:
            new_labs, old_labs = self._insert_new(LAB_TABLE, labs, SINK_LAB_COLUMNS, lab_row, changed_labs)
            new_seizures, old_seizures = self._insert_new(
                SEIZURE_TABLE, seizures, SINK_SEIZURE_COLUMNS, seizure_row, changed_seizures
            )
        return StoreResult(new_labs, new_seizures, old_labs + old_seizures, (*changed_labs, *changed_seizures))

    def stored_event_digests(self, items: Sequence[EnrichedEvent]) -> dict[str, str]:
        """Which of these events are already stored, with their stored content digest ('' when unknown)."""
        labs = [i.event_id for i in items if isinstance(i.event, LabDetection)]
        seizures = [i.event_id for i in items if isinstance(i.event, BorderSeizure)]
        with self.lock:
            return {**self._stored_digests(LAB_TABLE, labs), **self._stored_digests(SEIZURE_TABLE, seizures)}

    def store_rejects(self, rejects: Sequence[Reject]) -> int:
        """Insert rejects not stored yet (by :func:`reject_id`); returns how many were new."""
        with self.lock:
            return self._insert_unique(
                REJECT_TABLE, "reject_id", {reject_id(r): reject_row(r) for r in rejects}, REJECT_COLUMNS
            )

    def _insert_unique(self, table: str, id_column: str, rows: dict[str, list[Any]], columns: list[str]) -> int:
        """Insert the rows whose id is not stored yet (caller holds the lock)."""
        if not rows:
            return 0
        existing = {
            row[0]
            for row in self.client.query(
                f"SELECT {id_column} FROM {table} WHERE {id_column} IN {{ids:Array(String)}}",
                parameters={"ids": list(rows)},
            ).result_rows
        }
        fresh = [row for key, row in rows.items() if key not in existing]
        if fresh:
            self.client.insert(
                table,
                _columns(fresh, len(columns)),
                column_names=columns,
                column_oriented=True,
                settings=INSERT_SETTINGS,
            )
        return len(fresh)

    def store_alerts(self, alerts: Sequence[Alert]) -> int:
        """Insert alerts not stored yet (one row per alert_id); returns how many were new."""
        with self.lock:
            return self._insert_unique(
                ALERT_TABLE, "alert_id", {a.alert_id: alert_row(a) for a in alerts}, ALERT_COLUMNS
            )
