"""Staging tables and the dedup ``INSERT ... SELECT`` that moves a chunk's new rows into the raw tables.

Dedup runs inside ClickHouse (rows whose ``event_id`` is stored already are not inserted), so the file
never needs to fit in memory and re-ingesting a file adds nothing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable

from clickhouse_connect.driver.client import Client

from synthwatch.stream_apps.storage.backfill.arrow import ARROW_COLUMNS
from synthwatch.stream_apps.storage.backfill.jsonrows import (
    LAB_SELECT,
    LAB_STAGING,
    SEIZURE_SELECT,
    SEIZURE_STAGING,
    STAGING_SETTINGS,
)
from synthwatch.stream_apps.storage.tables import (
    HISTORY_LAB_COLUMNS,
    HISTORY_SEIZURE_COLUMNS,
    LAB_COLUMNS,
    LAB_TABLE,
    REPORTER_COLUMN,
    SEIZURE_COLUMNS,
    SEIZURE_TABLE,
)

# Rows are unique per key already (ids deduplicated, MVs group by key): collapsing them again on insert
# costs a third of the insert for nothing; merges still collapse across inserts.
_INSERT_SETTINGS = {"optimize_on_insert": 0}
# When the engine parses (no worker processes hold the cores): the raw table and its views in parallel.
_PARALLEL_INSERT_SETTINGS = {**_INSERT_SETTINGS, "max_insert_threads": 2, "parallel_view_processing": 1}


class Store:
    """Staging tables and the dedup ``INSERT ... SELECT`` (this process owns the client).

    ``suffix`` names this load's scratch tables. The ``sql`` encoding stages nothing here: its rows are
    committed from the engine's own parsed table (``commit(..., source=...)``).
    """

    def __init__(self, client: Client, encoding: str = "arrow", exclusive: bool = False) -> None:
        # exclusive: nothing else writes the raw tables meanwhile (the embedded engine, held by this process)
        self.client, self.encoding, self.exclusive = client, encoding, exclusive
        self.suffix = f"{os.getpid()}_{int(time.time() * 1000) % 10**9}"
        self.staging: dict[str, str] = {}
        if encoding == "sql":
            return
        self.staging = {LAB_TABLE: f"_ingest_labs_{self.suffix}", SEIZURE_TABLE: f"_ingest_seizures_{self.suffix}"}
        structures = {LAB_TABLE: LAB_STAGING, SEIZURE_TABLE: SEIZURE_STAGING}
        if encoding != "json":
            structures = {t: ", ".join(f"{n} {ch}" for n, _, ch in cols) for t, cols in ARROW_COLUMNS.items()}
        for table, staging in self.staging.items():
            client.command(f"DROP TABLE IF EXISTS {staging}")
            client.command(f"CREATE TABLE {staging} ({structures[table]}) ENGINE = Memory")

    def close(self) -> None:
        for staging in self.staging.values():
            self.client.command(f"DROP TABLE IF EXISTS {staging}")

    def insert(self, table: str, lines: list[str], arrow: Iterable[bytes] = (), count: int = 0) -> tuple[int, int]:
        """Insert rows whose event_id is not stored yet; returns (stored, already stored).

        ``lines``: JSONEachRow rows (json encoding); ``arrow``: Arrow IPC streams holding ``count`` rows.
        """
        count += len(lines)
        if not count:
            return 0, 0
        staging = self.staging[table]
        self.client.command(f"TRUNCATE TABLE {staging}")
        if self.encoding == "json":
            self.client.raw_insert(
                staging, None, ("\n".join(lines) + "\n").encode(), settings=STAGING_SETTINGS, fmt="JSONEachRow"
            )
        else:
            for block in arrow:
                if block:
                    self.client.raw_insert(staging, None, block, fmt="ArrowStream")
        return self.commit(table, count)

    def commit(self, table: str, count: int, source: tuple[str, str] | None = None) -> tuple[int, int]:
        """Move the ``count`` staged rows of ``table`` whose event_id is not stored yet into ``table``.

        ``source``: (a query of the rows' ids, each id once, a query of the rows in ``table``'s column order)
        to insert from instead of the staging table.
        """
        if not count:
            return 0, 0
        columns = LAB_COLUMNS if table == LAB_TABLE else SEIZURE_COLUMNS
        # Event ids are unique per reporter only: a row is stored already if its reporter's id is.
        reporter, prefix = REPORTER_COLUMN[table]
        if source is not None:
            ids, rows = f"({source[0]})", f"({source[1]})"
            who, select, event_id = reporter, "*", f"({reporter}, event_id)"
        elif self.encoding == "json":
            ids = rows = self.staging[table]
            who, select = f"e.{reporter}", LAB_SELECT if table == LAB_TABLE else SEIZURE_SELECT
            event_id = f"(e.{reporter}, e.event_id)"
        else:
            ids = rows = self.staging[table]
            who, select, event_id = reporter, ", ".join(columns), f"({reporter}, event_id)"
        # And the claimed reporter column, as the sink writes it (``lab:ID``/``agency:NAME``): in the sorting key
        # since migration 0014, so two reporters' rows under one id, place and time never merge into one.
        columns = HISTORY_LAB_COLUMNS if table == LAB_TABLE else HISTORY_SEIZURE_COLUMNS
        select = f"{select}, concat('{prefix}', {who})"
        stored_ids = (
            f"SELECT {reporter}, event_id FROM {table} WHERE ({reporter}, event_id) IN (SELECT {event_id} FROM {ids})"
        )
        # An empty table holds none of them (a first load's first chunk): its count is read from the parts'
        # metadata, where the lookup would hash every id of the chunk for nothing.
        empty = int(str(self.client.command(f"SELECT count() FROM {table}"))) == 0
        if empty:
            already = 0
        elif source is not None:
            # The source's (reporter, id) pairs are distinct (the first line of each), so the pairs already
            # stored are the distinct stored pairs among them: one read of the source, where counting the source's rows
            # whose id is among the stored ones read and hashed the source twice.
            already = int(
                str(
                    self.client.command(
                        f"SELECT uniqExact({reporter}, event_id) FROM {table} "
                        f"WHERE ({reporter}, event_id) IN ({source[0]})"
                    )
                )
            )
        else:
            already = int(str(self.client.command(f"SELECT count() FROM {ids} WHERE {event_id} IN ({stored_ids})")))
        if already < count:
            # When none is stored and no other writer can store one meanwhile, the filter would read every
            # stored event_id a second time for nothing (a first load: each chunk, the whole table so far).
            unfiltered = already == 0 and self.exclusive
            self.client.command(
                f"INSERT INTO {table} ({', '.join(columns)}) SELECT {select} FROM {rows}"
                + ("" if unfiltered else f" WHERE {event_id} NOT IN ({stored_ids})"),
                settings=_PARALLEL_INSERT_SETTINGS if self.encoding == "sql" else _INSERT_SETTINGS,
            )
        return count - already, already
