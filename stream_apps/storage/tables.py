"""Every ClickHouse table Python writes: its name, its columns in insert order, and the row builders.

Why one module: the sink, ``ingest-history`` (:mod:`.backfill`) and the deliveries store write the same
tables, and must write the same values in the same column order; declared once here, they cannot drift
apart. ``tests/storage/test_tables.py`` checks every column list against ``DESCRIBE TABLE`` of the migrated tables.
Row builders are pure (no client): a row is a tuple or list in its column list's order.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any, Literal, cast

from synthwatch.schemas import Alert, BorderSeizure, LabDetection, Reject
from synthwatch.stream_apps.detect.corrections import Counted
from synthwatch.stream_apps.detect.identity import NormalisedQuantity, ResolvedSubstance
from synthwatch.stream_apps.detect.intake import EnrichedEvent

LAB_TABLE = "lab_detections"

SEIZURE_TABLE = "border_seizures"
# Each report table's reporter column and the prefix of its claimed reporter (:func:`.corrections.report_key`):
# the sink, the corrections' reads and ingest-history key stored reports by it.
REPORTER_COLUMN = {LAB_TABLE: ("lab_id", "lab:"), SEIZURE_TABLE: ("agency", "agency:")}
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
# Every writer also stores the claimed reporter (``lab:ID``/``agency:NAME``, :func:`.corrections.claimed_reporter`):
# in the raw tables' sorting key since migration 0014, so two reporters' reports under one id, place and time
# never merge into one row. ``ingest-history`` computes it in SQL from ``lab_id``/``agency``.
HISTORY_LAB_COLUMNS = [*LAB_COLUMNS, "reporter"]
HISTORY_SEIZURE_COLUMNS = [*SEIZURE_COLUMNS, "reporter"]
# The stream also stores whether a report was late, its content digest and the report it corrects
# (``ingest-history`` leaves these columns to their defaults).
SINK_LAB_COLUMNS = [*LAB_COLUMNS, "late", "content_hash", "corrects", "reporter"]
SINK_SEIZURE_COLUMNS = [*SEIZURE_COLUMNS, "late", "content_hash", "corrects", "reporter"]
# What a stored correction takes out of the aggregates: the report it corrects' contribution, one row per
# correction (keyed by the correction's reporter and event_id, migration 0013), subtracted by the retraction
# views (migration 0012).
RETRACTION_TABLE = "retractions"
RETRACTION_COLUMNS = [
    "event_id",
    "corrected",
    "kind",
    "occurred_at",
    "country",
    "region",
    "substance_key",
    "substance_name",
    "family",
    "grams",
    "reporter",
]
REJECT_COLUMNS = ["reject_id", "rejected_at", "stage", "source", "reason", "event_id", "raw"]
ALERT_TABLE = "alerts"


def utc_aware(moment: datetime) -> datetime:
    """A DateTime64 column's value as read back (the client gives it naive, in UTC) as an aware datetime."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


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
    "learnt_substances",
]


SubstanceValues = tuple[str, str, str | None, str]
"""The resolved substance as stored: key, display name, InChIKey, family ("" when none)."""
QuantityValues = tuple[float | None, float | None, float | None]
"""A seized amount as stored: grams, millilitres, units (each None when the unit is not of that kind)."""


def substance_values(substance: ResolvedSubstance) -> SubstanceValues:
    return substance.key, substance.display_name, substance.inchikey, substance.family or ""


def quantity_values(quantity: NormalisedQuantity | None) -> QuantityValues:
    return (quantity.grams, quantity.millilitres, quantity.units) if quantity else (None, None, None)


def extra_text(event: LabDetection | BorderSeizure) -> str:
    """The ``extra`` column: unknown fields kept verbatim as JSON, ``{}`` for nearly every report.

    ``corrects`` is kept here too, as it was while it was an unknown field: ``ingest-history`` does not judge
    corrections (it stores no ``corrects`` column), so a history file's corrections are not lost."""
    if not event.model_extra and not event.substance.model_extra and event.corrects is None:
        return "{}"
    fields = event.extra_fields if event.corrects is None else {**event.extra_fields, "corrects": event.corrects}
    return json.dumps(fields, ensure_ascii=False, default=str)


def report_values(event: LabDetection | BorderSeizure, substance: SubstanceValues) -> tuple[Any, ...]:
    """The columns every report table starts with: ids, times, place, the substance as reported and resolved,
    unknown fields (the first columns of :data:`LAB_COLUMNS` and :data:`SEIZURE_COLUMNS`)."""
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
    )


def lab_values(event: LabDetection, substance: SubstanceValues) -> tuple[Any, ...]:
    """One row of :data:`LAB_COLUMNS` (the sink and ``ingest-history`` both store these values)."""
    return (
        *report_values(event, substance),
        event.lab_id,
        event.sample_id,
        event.sample_type,
        event.method,
        event.confirmed,
        event.purity_pct,
    )


def seizure_values(event: BorderSeizure, substance: SubstanceValues, quantity: QuantityValues) -> tuple[Any, ...]:
    """One row of :data:`SEIZURE_COLUMNS` (the sink and ``ingest-history`` both store these values)."""
    q = event.quantity
    return (
        *report_values(event, substance),
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
    values = lab_values(cast(LabDetection, item.event), substance_values(item.substance))
    return (*values, item.late, item.digest, item.event.corrects or "", item.key[0])


def seizure_row(item: EnrichedEvent) -> tuple[Any, ...]:
    """One row of :data:`SINK_SEIZURE_COLUMNS`."""
    values = seizure_values(
        cast(BorderSeizure, item.event), substance_values(item.substance), quantity_values(item.quantity)
    )
    return (*values, item.late, item.digest, item.event.corrects or "", item.key[0])


def retraction_row(item: EnrichedEvent, retracts: Counted) -> list[Any]:
    """One row of :data:`RETRACTION_COLUMNS`: a correction (``item``) and what the report it corrects added
    to the counts (``retracts``, the same values the counting views read from that report's row)."""
    r = retracts
    return [
        item.event_id,
        item.event.corrects or "",
        item.event.kind,
        r.occurred_at,
        r.country,
        r.region,
        r.substance_key,
        r.substance_name,
        r.family,
        r.grams or 0.0,
        item.key[0],
    ]


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
        alert.learnt_substances.model_dump_json() if alert.learnt_substances is not None else "",
    ]


# Every attempt to deliver an alert to an officer (the deliveries store: :mod:`.deliveries`).
DELIVERY_TABLE = "deliveries"
DELIVERY_COLUMNS = [
    "alert_id",
    "officer_id",
    "channel",
    "channel_type",
    "route",
    "attempt",
    "status",
    "reason",
    "response_code",
    "target",
    "at",
    "duration_ms",
    "alert_type",
    "severity",
    "substance",
    "region",
    "digest_id",
    "alert_json",
    "reported_by",
    "budget_day",
]
NO_DAY = date(1970, 1, 1)
"""``budget_day`` of a row no immediate budget counts (what rows stored before migration 0015 read)."""
DeliveryStatus = Literal["delivered", "failed", "gave_up", "queued_digest", "digest_sent", "deferred"]


@dataclass(slots=True)
class Attempt:
    """One row of ``deliveries``."""

    alert_id: str
    officer_id: str
    channel: str
    channel_type: str
    route: str
    attempt: int
    status: DeliveryStatus
    reason: str
    response_code: int | None
    target: str
    at: datetime
    duration_ms: float = 0.0
    alert_type: str = ""
    severity: str = ""
    substance: str = ""
    region: str = ""
    digest_id: str = ""
    alert_json: str = ""
    # the alert's reporters, and the day the officer's immediate budget counts it on (migration 0015)
    reported_by: list[str] = field(default_factory=list)
    budget_day: date = NO_DAY

    def row(self) -> list[Any]:
        return [getattr(self, column) for column in DELIVERY_COLUMNS]
