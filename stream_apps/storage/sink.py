"""Writing events and rejects into ClickHouse, idempotently and in batches.

Idempotency: before inserting, the sink asks which of the batch's reports are already stored, by
(reporter, ``event_id``): event ids are unique per reporter only, so the reporter's own column (``lab_id``,
``agency``) is part of the lookup, and another reporter's report with the same id is stored, not taken for
a re-send or a changed report (ids and pairs bound as parameters, never spliced into the SQL text, which
capped a batch at ~15,000 ids). It drops those, so a replayed partition or a re-sent file adds no rows
(counts are right without FINAL). The tables are ReplacingMergeTree on a key ending in ``event_id, reporter``
(migration 0014) as a backstop.
Inserts are column-oriented: one Python list per column is far cheaper than row tuples. Tables, columns
and row values come from :mod:`.tables`, which ``ingest-history`` shares, so both writers store the same.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from synthwatch.schemas import Alert, BorderSeizure, LabDetection, Reject
from synthwatch.stream_apps.detect.corrections import ReportKey
from synthwatch.stream_apps.detect.intake import EnrichedEvent
from synthwatch.stream_apps.storage.learnt import LearntStructures
from synthwatch.stream_apps.storage.tables import (
    ALERT_COLUMNS,
    ALERT_TABLE,
    LAB_TABLE,
    REJECT_COLUMNS,
    REJECT_TABLE,
    REPORTER_COLUMN,
    RETRACTION_COLUMNS,
    RETRACTION_TABLE,
    SEIZURE_TABLE,
    SINK_LAB_COLUMNS,
    SINK_SEIZURE_COLUMNS,
    alert_row,
    lab_row,
    reject_id,
    reject_row,
    retraction_row,
    seizure_row,
)

if TYPE_CHECKING:
    # clickhouse-connect is imported where a client is opened: in the worker, by the thread that opens it.
    from datetime import datetime

    from clickhouse_connect.driver.client import Client

    from synthwatch.stream_apps.detect.similarity import LearntStructure

# The sink never inserts an id twice in one block (ids already stored are filtered, and so are the
# repeats of an id within the call), so merging Replacing/Summing rows at insert time is wasted work.
INSERT_SETTINGS = {"optimize_on_insert": 0}


@dataclass(slots=True, frozen=True)
class StoreResult:
    """What one call stored: new rows per table, events skipped because already stored (same content),
    ``changed``: events whose id is stored with other content (to be rejected, never stored), and
    ``retractions``: new rows of ``retractions`` (corrected reports taken out of the aggregates)."""

    lab_detections: int = 0
    border_seizures: int = 0
    already_stored: int = 0
    changed: tuple[EnrichedEvent, ...] = ()
    retractions: int = 0

    @property
    def stored(self) -> int:
        return self.lab_detections + self.border_seizures


def _columns(rows: Sequence[Sequence[Any]], width: int) -> list[list[Any]]:
    return [[row[i] for row in rows] for i in range(width)] if rows else [[] for _ in range(width)]


class ClickHouseSink:
    """Stores batches; thread-safe (one lock per client) so it can run in an executor thread."""

    def __init__(self, client: Client, lock: threading.Lock | None = None) -> None:
        self.client = client
        self.lock = lock or threading.Lock()
        self._learnt = LearntStructures()  # kept between alerts: each reads only what was stored since

    def _stored_digests(self, table: str, keys: Sequence[ReportKey]) -> dict[ReportKey, str]:
        """Stored (reporter, event id) -> content digest ('' for rows stored before digests, or by
        ingest-history). ``keys`` are all of ``table``'s kind: ``lab:ID`` keys for lab detections."""
        if not keys:
            return {}
        column, prefix = REPORTER_COLUMN[table]
        wanted = set(keys)
        # By event id alone, the pairs kept in Python: bound as an array of (reporter, id) tuples, the pairs made
        # this check ~3.5 x dearer (clickhouse-connect formats each value in Python, the engine parses them; `synthwatch
        # bench sink`). Another reporter's rows under one of these ids come back too, and are left out here.
        rows = self.client.query(  # ``event_id IN``: the bloom filter index skips granules by it
            f"SELECT {column}, event_id, any(content_hash) FROM {table} "
            f"WHERE event_id IN {{ids:Array(String)}} GROUP BY {column}, event_id",
            parameters={"ids": sorted({event_id for _, event_id in wanted})},
        ).result_rows
        found: dict[ReportKey, str] = {}
        for who, event_id, digest in rows:
            key = (prefix + who, event_id)
            if key in wanted:
                found[key] = digest
        return found

    def _insert_new(
        self,
        table: str,
        items: list[EnrichedEvent],
        columns: list[str],
        to_row: Callable[..., Sequence[Any]],
        changed: list[EnrichedEvent],
        kept: list[EnrichedEvent],
    ) -> tuple[int, int]:
        """Insert the events not stored yet; an id stored with another digest goes to ``changed``. ``kept``
        gets the events whose row is now stored with their content: inserted now, or before with the same
        digest (a replay, or a retry after a crash between this insert and the retractions)."""
        stored = self._stored_digests(table, [item.key for item in items])
        fresh = []
        for item in items:  # a checkpoint spans batches: an id may come twice in one call (a re-send)
            known = stored.get(item.key)
            if known is None:
                stored[item.key] = item.digest
                fresh.append(to_row(item))
                kept.append(item)
            elif known and item.digest and known != item.digest:
                changed.append(item)
            elif known and known == item.digest:
                kept.append(item)
        if fresh:
            self.client.insert(
                table,
                _columns(fresh, len(columns)),
                column_names=columns,
                column_oriented=True,
                settings=INSERT_SETTINGS,
            )
        return len(fresh), len(items) - len(fresh) - len(changed)

    def store_events(self, items: Sequence[EnrichedEvent]) -> StoreResult:
        """Insert the events not stored yet; safe to call again with the same batch after a failure.

        Then the retractions of the corrections among them (``retracts`` set by the judge) not stored yet,
        by the correction's reporter and id: after the rows, so a crash in between leaves a correction whose
        retraction the retry adds (its row is found stored with the same content); never twice."""
        labs = [item for item in items if isinstance(item.event, LabDetection)]
        seizures = [item for item in items if isinstance(item.event, BorderSeizure)]
        changed_labs: list[EnrichedEvent] = []
        changed_seizures: list[EnrichedEvent] = []
        kept: list[EnrichedEvent] = []
        with self.lock:
            new_labs, old_labs = self._insert_new(LAB_TABLE, labs, SINK_LAB_COLUMNS, lab_row, changed_labs, kept)
            new_seizures, old_seizures = self._insert_new(
                SEIZURE_TABLE, seizures, SINK_SEIZURE_COLUMNS, seizure_row, changed_seizures, kept
            )
            retractions = {i.key: retraction_row(i, i.retracts) for i in kept if i.retracts is not None}
            retracted = self._insert_retractions(retractions)
        return StoreResult(
            new_labs, new_seizures, old_labs + old_seizures, (*changed_labs, *changed_seizures), retracted
        )

    def stored_event_digests(self, items: Sequence[EnrichedEvent]) -> dict[ReportKey, str]:
        """Which of these events are already stored, by (reporter, event id), with their stored content
        digest ('' when unknown)."""
        labs = [i.key for i in items if isinstance(i.event, LabDetection)]
        seizures = [i.key for i in items if isinstance(i.event, BorderSeizure)]
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
        return self._insert_rows(table, [row for key, row in rows.items() if key not in existing], columns)

    def _insert_retractions(self, rows: dict[ReportKey, list[Any]]) -> int:
        """Insert the retractions whose correction (reporter, event id) has none yet (caller holds the lock).

        A row stored before migration 0013 has reporter '' (unknown). Then every event id was unique per
        table (the sink refused a second report under an id), so it is the retraction of the one correction
        of its kind stored under its id before the upgrade: the one stored first (another reporter's report
        under that id came after the upgrade), whose reporter it stands for. Matching it by kind, id and
        corrected id instead withheld the retraction of another lab's correction numbered alike (its LIMS
        numbers report and correction as the first lab's did), which then counted twice. Only when no report
        of its kind is stored under its id does it stand for the correction of that kind, id and corrected id."""
        if not rows:
            return 0
        mine: set[tuple[str, str]] = set()
        legacy: set[tuple[str, str, str]] = set()  # (event_id, kind, corrected) of reporter-less rows
        for who, event_id, kind, corrected in self.client.query(
            f"SELECT reporter, event_id, kind, corrected FROM {RETRACTION_TABLE} "
            "WHERE event_id IN {ids:Array(String)}",
            parameters={"ids": sorted({event_id for _, event_id in rows})},
        ).result_rows:
            mine.add((str(who), str(event_id)))
            if who == "":
                legacy.add((str(event_id), str(kind), str(corrected)))
        unowned: set[tuple[str, str, str]] = set()
        if legacy:
            first = self._first_reporters(legacy)
            for event_id, kind, corrected in legacy:
                owner = first.get((kind, event_id))
                if owner is None:
                    unowned.add((event_id, kind, corrected))
                else:
                    mine.add((owner, event_id))
        fresh = [
            row
            for key, row in rows.items()
            if key not in mine
            and (row[0], row[2], row[1]) not in unowned  # RETRACTION_COLUMNS: event_id, corrected, kind
        ]
        return self._insert_rows(RETRACTION_TABLE, fresh, RETRACTION_COLUMNS)

    def _first_reporters(self, legacy: set[tuple[str, str, str]]) -> dict[tuple[str, str], str]:
        """(kind, event id) -> the claimed reporter of the first report of that kind stored under that id."""
        found: dict[tuple[str, str], str] = {}
        for table, kind in ((LAB_TABLE, "lab_detection"), (SEIZURE_TABLE, "border_seizure")):
            ids = sorted({event_id for event_id, of, _ in legacy if of == kind})
            if not ids:
                continue
            column, prefix = REPORTER_COLUMN[table]
            for who, event_id in self.client.query(
                f"SELECT {column}, event_id FROM {table} WHERE event_id IN {{ids:Array(String)}} "
                f"ORDER BY ingested_at, {column} LIMIT 1 BY event_id",
                parameters={"ids": ids},
            ).result_rows:
                found[(kind, str(event_id))] = prefix + str(who)
        return found

    def _insert_rows(self, table: str, rows: list[Any], columns: list[str]) -> int:
        """Insert ``rows`` (found not stored yet) column-oriented; returns how many (caller holds the lock)."""
        if rows:
            self.client.insert(
                table,
                _columns(rows, len(columns)),
                column_names=columns,
                column_oriented=True,
                settings=INSERT_SETTINGS,
            )
        return len(rows)

    def learnt_structures(self, as_of: datetime) -> list[LearntStructure]:
        """The structures learnt from reports stored at or before ``as_of`` (see :mod:`.learnt`), under the lock."""
        with self.lock:
            return self._learnt.as_of(self.client, as_of)

    def store_alerts(self, alerts: Sequence[Alert]) -> int:
        """Insert alerts not stored yet (one row per alert_id); returns how many were new."""
        with self.lock:
            return self._insert_unique(
                ALERT_TABLE, "alert_id", {a.alert_id: alert_row(a) for a in alerts}, ALERT_COLUMNS
            )
