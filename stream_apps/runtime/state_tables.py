"""Detector state in two changelog-backed Faust tables, and the writer that sends it to their changelogs.

Faust would pick a table's changelog partition from "the current event", which a batch does not have,
so the agents send each record to the table's changelog topic on the partition the records arrived
on: a region's state stays with the region's partition and is restored to whichever worker owns it.
Every record is signed as the worker's (:mod:`.worker_signature`) and checked when a table is restored:
restored state is trusted (a series record's outbox is sent as alerts).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, cast

import faust
from pydantic_core import from_json, to_json

from synthwatch.schemas.text import visible
from synthwatch.stream_apps.detect.alerting import day_start
from synthwatch.stream_apps.detect.novelty import HealedSubstance
from synthwatch.stream_apps.detect.region import Healed
from synthwatch.stream_apps.runtime.context import WorkerContext, send_all
from synthwatch.stream_apps.runtime.transport import StateWrite
from synthwatch.stream_apps.runtime.worker_signature import WorkerSigner, verified_changelog

log = logging.getLogger("synthwatch.stack.worker")

#: A detector state change: (changelog partition, record key, record).
Change = tuple[int, str, Any]  # the record: a dict, or its JSON bytes (drained encoded: written as it is)

#: The key of the record that ends a changelog write on each partition (see :meth:`StateTables.seal`).
SEAL_KEY = "~sealed"
SEAL_VALUE = b"{}"

#: How long a checkpoint's changelog write sends records before it gives the event loop a turn
#: (:meth:`StateTables.save`): ~115-140 records at the 7-9 us a record costs alone on a quiet machine (signature
#: 2.5, Faust's producer.send 4.3), fewer when the worker's main thread is slowed (docs/performance.md, "The
#: alert tail, per alert").
SAVE_TURN_SECONDS = 0.001

#: The key an undecodable changelog key is read as: refused by the signature check, never applied.
UNDECODABLE_KEY = "~undecodable"


class StateSchema(faust.Schema):
    """The detector tables' schema: a changelog key that is not JSON decodes to :data:`UNDECODABLE_KEY`.

    Why: Faust decodes a changelog record's key before the table sees it, and a key it cannot decode
    raised inside recovery, which then never read that partition's offset and waited forever: one record
    with a non-JSON key, written by anyone who can reach the changelog, stalled every restart. Decoded this
    way, the record reaches the signature check (:func:`.worker_signature.verified_changelog`) and is refused.
    """

    def loads_key(self, app: Any, message: Any, *, loads: Any = None, serializer: Any = None) -> Any:
        try:
            return super().loads_key(app, message, loads=loads, serializer=serializer)
        except Exception:  # KeyDecodeError (Faust wraps the codec's error)
            return UNDECODABLE_KEY


def load_record(data: Any, key: str) -> dict[str, Any] | None:
    """A detector state record from a table (JSON bytes), or None if the table has none."""
    raw = data.get(key)
    return cast(dict[str, Any], from_json(raw)) if raw is not None else None


def outbox_series(data: Any) -> list[str]:
    """Series whose stored record (full or delta) holds outbox entries (``"x"``, only there when non-empty)."""
    names = set()
    for key, raw in list(data.items()):
        if isinstance(key, str) and key.startswith(("S:", "S+:")) and b'"x":' in raw:
            names.add(key.split(":", 1)[1])
    return sorted(names)


@dataclass
class StateTables:
    """The region and substance tables, and the signed writes to their changelogs."""

    app: faust.App
    signer: WorkerSigner
    regions: Any  # faust Table of region/series records (JSON bytes)
    substances: Any  # faust Table of substance records
    clock: Callable[[], float] = time.perf_counter  # what :meth:`save` measures its turns by

    @classmethod
    def create(cls, app: faust.App, ctx: WorkerContext, signer: WorkerSigner) -> StateTables:
        """Declare both tables, point the detectors at them and refuse unsigned records at recovery."""
        # Values are JSON text serialised by pydantic-core (in Rust), not by Faust's json codec per record; the
        # table keeps them as bytes (restored from the changelog as the same bytes): compact, and decoded
        # only when a record is loaded into the detectors.
        state_schema: faust.Schema = StateSchema(key_serializer="json", value_serializer="raw")
        tables: dict[str, Any] = {"partitions": ctx.settings.partitions, "schema": state_schema, "value_type": bytes}
        region_table = app.Table("detector-regions", **tables)  # value_type=bytes: restored raw, too
        substance_table = app.Table("detector-substances", **tables)
        ctx.regions.fetch = partial(load_record, region_table.data)
        # A record a report dated past the intake's bound changed (taken before the bound existed) is healed as it
        # is loaded, and written back at the next checkpoint (RegionState.heal, SeriesState.heal).
        ctx.regions.bound = partial(latest_event_time, ctx.intake.limits.future_allowed)
        ctx.regions.on_healed = log_healed
        ctx.regions.outbox = True  # spike alerts are sent after the checkpoint that writes the state deciding them
        ctx.novelty.fetch = partial(load_record, substance_table.data)
        # So is a substance record a far-future sighting changed (SubstanceState.heal).
        ctx.novelty.bound = ctx.regions.bound
        ctx.novelty.on_healed = log_healed_substance
        for table in (region_table, substance_table):
            # restored state is trusted (a series record's outbox is sent as alerts): only what a worker signed
            table.apply_changelog_batch = verified_changelog(  # type: ignore[method-assign,assignment]
                table.apply_changelog_batch, signer, partial(refuse_state_records, ctx)
            )
        return cls(app, signer, region_table, substance_table)

    @property
    def empty(self) -> bool:
        """Nothing recovered: a first start, or changelogs lost (the state is rebuilt from ClickHouse)."""
        return len(self.regions.data) == 0 and len(self.substances.data) == 0

    async def save(self, table: Any, changes: list[Change], writing: StateWrite | None = None) -> list[Awaitable[Any]]:
        """Keep each record in the table and send it to the table's changelog, on the given partition.

        Straight to Faust's producer: ``Table.send_changelog`` builds a FutureMessage and goes through
        Faust's producer buffer for every record, and its callback only matters to RocksDB stores. Keys
        are encoded as Faust's json codec does, so compaction and recovery see the same keys.

        Gives the event loop a turn once it has held it for :data:`SAVE_TURN_SECONDS`: a checkpoint writes
        1,000-2,000 records at 1,000 events/s, which held the loop for 25-220 ms in one piece (measured,
        docs/performance.md), and every alert and sighting whose batch arrived meanwhile waited for all of it.
        By time, not by a count of records: a record costs ~9 us alone on a quiet machine (200 of them ~1.5 ms),
        but in the worker the main thread shares the interpreter and two cores with the consumer's and the sink's
        threads, the broker and the producers, and the loop was traced stalling 13-48 ms at a time while the write
        ran in slices of 200. When the turns come is all the clock decides: the records, their order and what the
        checkpoint waits for are the same.

        ``writing``: the checkpoint's :class:`.transport.StateWrite`; once a revoke has given up waiting for it,
        nothing more is sent (the records sent so far are returned).
        """
        data, topic, send = table.data, table.changelog_topic.get_topic_name(), self.app.producer.send
        clock, futures = self.clock, []
        turn = clock() + SAVE_TURN_SECONDS
        for partition, key, value in changes:
            if clock() >= turn:
                await asyncio.sleep(0)
                turn = clock() + SAVE_TURN_SECONDS
            if writing is not None and writing.abandoned:
                break
            encoded = data[key] = value if isinstance(value, bytes) else to_json(value)  # bytes: drained encoded
            raw_key = json.dumps(key).encode()
            headers = self.signer.headers(topic, raw_key, encoded, partition)  # checked at recovery
            futures.append(await send(topic, raw_key, encoded, partition, None, headers))
        return futures

    async def seal(self, table: Any, changes: list[Change]) -> None:
        """After a write is acknowledged, end each partition it wrote with one record in a batch of its own.

        Why: Tansu 0.6 answers ListOffsets "latest" with the first offset of the partition's last record
        batch plus one, and Faust's recovery reads a changelog up to that offset: the other records of a
        checkpoint's last batch were never restored, so a restarted worker lost part of its last
        checkpoint's state while the offsets of the events behind it were committed. A lone last record
        makes the answer the true end. A worker killed before the seal leaves the last batch unsealed:
        recovery then reads a prefix of it (in send order), which the replay marks cover.
        """
        topic, send = table.changelog_topic.get_topic_name(), self.app.producer.send
        key = json.dumps(SEAL_KEY).encode()
        futures = []
        for partition in sorted({partition for partition, _, _ in changes}):
            table.data[SEAL_KEY] = SEAL_VALUE
            headers = self.signer.headers(topic, key, SEAL_VALUE, partition)
            futures.append(await send(topic, key, SEAL_VALUE, partition, None, headers))
        await send_all(futures)

    async def write(self, table: Any, changes: list[Change], writing: StateWrite | None = None) -> bool:
        """Save ``changes``, wait for their acknowledgement, then seal the partitions they wrote; False if a revoke
        gave up waiting for ``writing`` meanwhile (:meth:`.transport.Consumer.wait_for_state_writes`): the write
        stopped where it was, unsealed (recovery reads a prefix of it, as after a kill)."""
        await send_all(await self.save(table, changes, writing))
        if writing is not None and writing.abandoned:
            return False
        await self.seal(table, changes)
        return True


def latest_event_time(allowed: timedelta) -> datetime:
    """The latest event time the intake takes now: the worker's clock plus SYNTHWATCH_MAX_FUTURE_HOURS (every report
    it took was received before now, so no watermark it set is later)."""
    return datetime.now(UTC) + allowed


def log_healed(key: str, healed: Healed) -> None:
    """One warning per healed record: which (escaped: a region is a sender's text), which watermarks went where,
    which far-future days were dropped."""
    kind, _, name = key.partition(":")
    what = "region" if kind == "R" else "series"
    moved = "; ".join(
        f"{visible(k)} watermark {was.isoformat()} -> {to.isoformat() if to is not None else 'none'}"
        for k, (was, to) in sorted(healed.watermarks.items())
    )
    days = [day_start(d).date().isoformat() for d in healed.days]
    parts = [moved] if moved else []
    if days:
        parts.append(f"dropped {len(days)} day(s): {', '.join(days[:5])}{', ...' if len(days) > 5 else ''}")
    if healed.pruned is not None:
        parts.append(f"pruned as of {day_start(healed.pruned).date().isoformat()}: its older days are lost")
    log.warning(
        "detector state of %s %s held what a report dated past SYNTHWATCH_MAX_FUTURE_HOURS left (taken before that "
        "bound existed): healed, written back at the next checkpoint (%s)",
        what,
        visible(name[:200]),
        "; ".join(parts),
    )


def log_healed_substance(key: str, healed: HealedSubstance) -> None:
    """One warning per healed substance record, as :func:`log_healed`: which (escaped: a substance key and a region
    come from a sender's text), which regions' spans were ended earlier or dropped, what became of its spread."""

    def day(n: int) -> str:
        return day_start(n).date().isoformat()

    parts = [
        f"region {visible(region[:200])} last seen {day(was)} -> {day(now)}"
        for region, (was, now) in sorted(healed.moved.items())[:5]
    ]
    if len(healed.moved) > 5:
        parts.append(f"{len(healed.moved) - 5} more region(s) ended earlier")
    if healed.dropped:
        names = ", ".join(visible(r[:200]) for r in healed.dropped[:5]) + (", ..." if len(healed.dropped) > 5 else "")
        parts.append(f"dropped {len(healed.dropped)} region(s) seen only then: {names}")
    if healed.spread is not None:
        parts.append(f"spread episode {day(healed.spread[0])}..{day(healed.spread[1])} dropped or ended earlier")
    if healed.emptied:
        parts.append("no sighting left: its next one is a new substance")
    log.warning(
        "detector state of substance %s held what a report dated past SYNTHWATCH_MAX_FUTURE_HOURS left (taken before "
        "that bound existed): healed, written back at the next checkpoint (%s)",
        visible(key[:200]),
        "; ".join(parts),
    )


def refuse_state_records(ctx: WorkerContext, events: list[Any]) -> None:
    """Changelog records no worker signed are not restored: counted and logged, one line per batch."""
    where: dict[tuple[str, int], list[int]] = defaultdict(list)
    for e in events:
        where[(e.message.topic, e.message.partition)].append(e.message.offset)
    for (topic, partition), offsets in sorted(where.items()):
        ctx.metrics.refused_forged(topic, len(offsets))
        log.error(
            "%s[%s]: %d detector state record(s) without a valid worker signature refused at recovery "
            "(offsets %s..%s); not restored, their outbox not sent",
            topic,
            partition,
            len(offsets),
            min(offsets),
            max(offsets),
        )
