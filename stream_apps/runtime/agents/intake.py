"""The ``intake`` agent on both input topics: validate and enrich, run the region stage, send on.

Both input topics are keyed by region and co-partitioned, so one region's events are processed in order
by one worker. Per batch: validate and enrich; run the region stage (lateness: a late report is stored
and flagged, not refused; duplicates, spikes); send rejects and sightings (keyed by substance). At
checkpoints: store new events in ClickHouse, write changed detector state to the region table's
changelog, then send the spike alerts that state decided (an outbox in the series records: a crash
cannot re-decide a sent alert differently): a spike alert waits up to one checkpoint interval,
``SYNTHWATCH_CHECKPOINT_SECONDS``.

A batch is validated and run through the region stage a slice at a time (:data:`SLICE_EVENTS`), with a turn of
the event loop between slices: under load a batch of up to 10,000 events held the loop for over 10 s in one
piece, and offset commits, the alerts' sends, the watchdog's looks and ``/ready`` all waited for it. The batch's
outputs (rejects, sightings, held events) are still built and sent once, after its last slice, exactly as in one
piece; nothing of it is held for a checkpoint before then, and a checkpoint starts only from this agent's own
loop between batches, so a half-done batch is never acknowledged, committed or drained. A rebalance that begins
at a turn leaves the rest of the batch alone (read again from the committed offset, as after any other wait).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from itertools import chain
from typing import Any

import faust
from pydantic_core import to_json

from synthwatch.schemas import Alert, Reject
from synthwatch.schemas.topics import Sighting
from synthwatch.stream_apps.detect.intake import EnrichedEvent, IntakeResult, RawMessage
from synthwatch.stream_apps.detect.region import Observation, RegionResult
from synthwatch.stream_apps.detect.replay import position_of
from synthwatch.stream_apps.runtime.context import SLICE_RECORDS, AgentContext, send_all, slices, turn
from synthwatch.stream_apps.runtime.corrections import correction_notices, judge_batch
from synthwatch.stream_apps.runtime.metrics import ingest_times
from synthwatch.stream_apps.runtime.outbox import Outbox, SpikeOutbox
from synthwatch.stream_apps.runtime.state_tables import Change, StateTables
from synthwatch.stream_apps.runtime.transport import drain_mark, revoked, state_write
from synthwatch.stream_apps.storage.sink import StoreResult

log = logging.getLogger("synthwatch.stack.worker")

LateEvent = tuple[EnrichedEvent, RegionResult]  # a late report and what the region stage made of it

#: Input events validated and enriched, run through the region stage, or their sightings encoded, between two turns
#: of the event loop: each stage takes ~25 µs an event (CPU, bench workload, compiled core), so ~6 ms a slice.
SLICE_EVENTS = SLICE_RECORDS


def received_time(timestamp: float | None, now: float) -> datetime:
    """A Kafka record's timestamp (seconds) as the time its report was received, never after the worker's clock
    ``now`` (seconds; to the millisecond, below): the receipt that bounds the record's event time.

    Why the worker's clock too: the timestamp is the producer's own (CreateTime, the default topic setting) unless
    the topic says LogAppendTime, and even then the broker's clock may run ahead. A producer that set it to 2099
    (with an event time of 2099), to -1 (Kafka's "none") or past what a datetime holds escaped the bound, so its
    report moved the watermarks the bound is there to keep. Bounded by ``now`` an honest record is judged by its
    timestamp (at or before ``now``), so a replay judges it the same; a record with none, or one ahead of the
    clock, by ``now``, which is before the row's ``ingested_at`` (the engine's clock at insert, to the ms), so the
    state rebuild keeps every report the intake took.
    """
    return Receipts(now)(timestamp)


class Receipts:
    """:func:`received_time` of one batch's records (one ``now``), one datetime built per distinct millisecond:
    a producer's records share milliseconds (~25 a millisecond from the publisher), and building a zoned
    datetime for each record was ~1.4 % of the worker's samples (py-spy, backlog drain)."""

    __slots__ = ("_at", "_bound", "_millis")

    def __init__(self, now: float) -> None:
        self._bound = math.floor(now * 1000)
        self._millis: int | None = None
        self._at = datetime.min.replace(tzinfo=UTC)

    def __call__(self, timestamp: float | None) -> datetime:
        millis = self._bound
        if timestamp is not None and timestamp > 0 and math.isfinite(timestamp):
            millis = min(millis, math.floor(timestamp * 1000))
        if millis != self._millis:
            self._millis, self._at = millis, datetime.fromtimestamp(millis / 1000, UTC)
        return self._at


def _partition(source: str) -> int:
    """Partition number of a ``topic:partition:offset`` source."""
    return int(source.rsplit(":", 2)[1])


@dataclass
class RegionPass:
    """What the region stage made of a batch's valid events."""

    kept: list[EnrichedEvent] = field(default_factory=list)
    late: list[LateEvent] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)
    sightings: list[Sighting] = field(default_factory=list)
    partitions: dict[str, int] = field(default_factory=dict)  # region -> the partition its events came on
    replayed: int = 0  # read again after a restart: stored, judged and sent before


def detect_regions(agents: AgentContext, events: Iterable[EnrichedEvent], into: RegionPass | None = None) -> RegionPass:
    """Run the region stage over ``events``; late reports are set aside for :func:`keep_late`. With ``into``, go on
    with that pass (a batch taken in slices): the same as one call over all its events."""
    found_all = RegionPass() if into is None else into
    for item in events:
        found = agents.worker.regions.observe(Observation.of(item), at=position_of(item.source))
        found_all.partitions[item.event.region] = _partition(item.source)
        if found.replayed:  # read again after a restart: stored, judged and sent before
            found_all.replayed += 1
            continue
        if found.late_by_hours is not None and not found.duplicate:
            found_all.late.append((item, found))  # kept or not once storage tells a late report from a re-send
            continue
        found_all.kept.append(item)
        found_all.alerts.extend(found.alerts)
        found_all.sightings.extend(found.sightings)
    return found_all


async def keep_late(
    agents: AgentContext, late: list[LateEvent], unstored: Iterable[EnrichedEvent], changed: list[Reject]
) -> tuple[list[EnrichedEvent], list[Sighting], int]:
    """Late events are kept (stored flagged ``late``, their sightings sent), unless already stored (or
    about to be, in ``unstored``): a re-sent old event is a duplicate, or, with other content, a changed
    report refused into ``changed``. Returns (kept, sightings, duplicates)."""
    if not late:
        return [], [], 0
    sink = agents.worker.sink
    stored = await agents.with_retries("checking late events", partial(sink.stored_event_digests, [i for i, _ in late]))
    late_keys = {item.key for item, _ in late}  # (reporter, event id): another reporter's id is not a re-send
    stored.update({item.key: item.digest for item in unstored if item.key in late_keys})
    kept: list[EnrichedEvent] = []
    sightings: list[Sighting] = []
    duplicates = 0
    for item, found in late:
        known = stored.get(item.key)
        if known is not None:
            if known and item.digest and known != item.digest:
                changed.append(item.changed_content_reject())
            else:
                duplicates += 1
            continue
        stored[item.key] = item.digest  # a re-send later in the same batch
        item.late = True
        kept.append(item)
        sightings.extend(found.sightings)
        agents.metrics.late(item.event.kind)
        log.info("late %s %r stored: %.1f h late", item.event.kind, item.event_id, found.late_by_hours)
    return kept, sightings, duplicates


async def send_rejects(agents: AgentContext, rejects: list[Reject], reading: Any = None) -> list[Awaitable[Any]]:
    """Send rejects (keyed by event id, or source when there is none); returns their pending acks.

    A turn of the event loop every :data:`SLICE_EVENTS` rejects, noted as work on ``reading`` (the topic whose batch
    they come from, :func:`.context.turn`): a batch of 10,000 invalid reports made 10,000 rejects to encode, sign
    and hand to the producer in one piece (~0.1 s of CPU with the producer stubbed, 13 slices' worth)."""
    topic = agents.topics.rejects
    pending: list[Awaitable[Any]] = []
    for n, r in enumerate(rejects):
        if n and n % SLICE_EVENTS == 0:
            await turn(agents.app, reading)
        pending.append(await agents.send(topic, (r.event_id or r.source).encode(), r.model_dump_json().encode()))
    return pending


def add_intake_agent(agents: AgentContext, tables: StateTables, outbox: SpikeOutbox) -> None:
    """Define the ``intake`` agent on the input topics."""
    ctx, metrics, settings = agents.worker, agents.metrics, agents.settings
    inputs = agents.topics.inputs

    async def intake_agent(stream: faust.StreamT[bytes]) -> None:
        held = agents.checkpoint()
        rows: list[EnrichedEvent] = []  # kept events since the last checkpoint, stored at the next one
        storing: list[EnrichedEvent] = []  # the rows of the checkpoint under way
        partitions: dict[str, int] = {}

        async def write(
            taken: list[EnrichedEvent], changes: list[Change], kept_outbox: Outbox, events: int, drained_at: int | None
        ) -> None:
            # Rows first, then the state that has seen them: a worker killed in between replays events
            # that are stored already (skipped by event_id) into state that has not seen them.
            rows = held.rows_being_stored()

            def store() -> StoreResult:
                result = ctx.sink.store_events(taken)
                if not result.changed:  # else noted below, once their rejects are sent
                    rows.done()  # here, in the thread: a stop that cancels this coroutine does not stop the write
                return result

            stored = await agents.with_retries("storing events", metrics.timed_call("events", len(taken), store))
            if stored.changed:  # ids stored with other content: refused with a reason, like any reject
                refused = [item.changed_content_reject() for item in stored.changed]
                await send_all(await send_rejects(agents, refused, inputs))
                metrics.rejected(refused)
                metrics.produced(settings.topic_rejects, len(refused))
            held.rows_stored()  # stored or refused: a stop from here on loses none of these reports
            # Notices to those alerted on a report these corrections supersede (again after a replay: same ids).
            await correction_notices(agents, [item for item in taken if item not in stored.changed])
            # From here to the end, a revoke beginning waits for this write before it forgets the state (up to its
            # bound, past which the write sends nothing more): state_write.
            writing = state_write(agents.app, drained_at)
            written = False
            if writing is not None:
                with writing:
                    # The spike alerts these records decided, once the records holding them are acknowledged;
                    # acknowledged themselves before this checkpoint's offsets are (Checkpoint._complete).
                    if await tables.write(tables.regions, changes, writing):
                        await outbox.send(kept_outbox)
                        written = True
            # Else a rebalance began since the state was drained, or was under way then: the state is forgotten,
            # the events are read again (not acknowledged), and written now the records could land in the changelog
            # after the next owner's records of the same regions. The rows above are stored by id: counted, harmless.
            checkpointed = events if written else 0  # acknowledged right after this returns
            metrics.events_checkpointed(
                checkpointed, stored.lab_detections, stored.border_seizures, stored.already_stored
            )

        async def take(events: list[Any]) -> bool:
            """One batch: validated, judged, run through the region stage, its outputs sent and the batch held for
            the checkpoint; False when a rebalance began meanwhile (the batch is left alone: read again).

            A function of its own so that what it made of the batch goes when it returns: as locals of the loop
            below, the batch's results, region pass, sightings (sorted, and grouped by substance) and rejects stayed
            alive until the next batch with events, so behind a backlog the next batch was fetched and decoded
            beside them, and an idle worker held them for good (docs/performance.md, "Session 22"; the novelty
            agent's batch, 513bf18). Nothing else changes: the same steps, in the same order, with the same awaits;
            the kept events wait in ``rows`` for the checkpoint, as before.
            """
            await agents.until_state_ready()
            metrics.consumed(events)
            result = IntakeResult()
            receipt = Receipts(time.time())  # the records' receipt is never after this clock (``received_time``)
            for n, part in enumerate(slices(events, SLICE_EVENTS)):
                if n:
                    await turn(agents.app, inputs)  # the other agents, the commits, the watchdog, /ready
                # topic, key and headers: what a signed envelope covers (checked in the intake when configured);
                # the record's timestamp (never after ``now``): when it was received, which bounds its event time
                messages = (
                    RawMessage(
                        f"{e.message.topic}:{e.message.partition}:{e.message.offset}",
                        e.value,
                        e.message.topic,
                        e.message.key,
                        e.message.headers,
                        receipt(e.message.timestamp),
                    )
                    for e in part
                )
                ctx.intake.process(messages, into=result)  # duplicates in the batch found across slices too
            # Corrections that may not correct what they name are refused before anything counts them.
            result.events = await judge_batch(agents, result.events, chain(storing, rows), result.rejects)
            found = RegionPass()
            for n, part in enumerate(slices(result.events, SLICE_EVENTS)):
                if n:
                    await turn(agents.app, inputs)
                if revoked(agents.app, events[0].message):
                    break
                detect_regions(agents, part, into=found)
            if revoked(agents.app, events[0].message):
                # A rebalance began during the awaits above (its partitions revoked, its detector state
                # forgotten): applied now, to state reloaded without the batches before it, its replay marks
                # would cover those batches' events, which the next owner would then skip. Read again (the
                # slices applied before it changed only the state the revoke forgets).
                return False
            agents.replayed_records("intake", found.replayed)
            partitions.update(found.partitions)
            late_kept, late_sightings, late_duplicates = await keep_late(
                agents, found.late, chain(storing, rows, found.kept), result.rejects
            )
            result.duplicates += late_duplicates
            sightings = found.sightings + late_sightings
            rows.extend(found.kept)
            rows.extend(late_kept)
            # Sent now, not at the checkpoint: alerts and the sightings that lead to new-substance
            # alerts are not held back by storage. Acknowledged by the broker before the checkpoint.
            pending = await send_rejects(agents, result.rejects, inputs)
            # Spike alerts wait in the outbox of the series that raised them (RegionDetector.outbox) and
            # go out at the checkpoint that writes that series: up to one checkpoint interval later.
            if found.alerts:
                started = ingest_times(events, found.kept)
                fallback = min(started.values(), default=time.time())
                for a in found.alerts:
                    known = [started[e] for e in a.evidence_event_ids if e in started]
                    outbox.ingested[a.alert_id] = max(known) if known else fallback
            # One message per substance, in event-time order: the novelty stage takes sightings in the
            # order they are on the topic (see NoveltyDetector.observe_batch), so "first" is first reported.
            by_substance: dict[str, list[dict[str, Any]]] = defaultdict(list)
            ordered = sorted(sightings, key=lambda s: (s.occurred_at, s.event_id))
            for n, part in enumerate(slices(ordered, SLICE_EVENTS)):
                if n:
                    await turn(agents.app, inputs)
                for sighting in part:
                    by_substance[sighting.key].append(sighting.to_dict())
            encoded = 0  # sightings encoded since the last turn
            for key, values in by_substance.items():
                if encoded >= SLICE_EVENTS:
                    await turn(agents.app, inputs)
                    encoded = 0
                pending.append(await agents.send(agents.topics.sightings, key.encode(), json.dumps(values).encode()))
                encoded += len(values)
            held.hold(events, pending)
            metrics.skipped_duplicates(result.duplicates)
            metrics.rejected(result.rejects)
            metrics.produced(settings.topic_rejects, len(result.rejects))
            metrics.produced(settings.topic_sightings, len(by_substance))
            metrics.intake_batch(len(events), len(sightings))
            metrics.alerts_raised(len(found.alerts))
            return True

        async for events in agents.batches(stream):
            if events and not await take(events):
                continue  # a rebalance began during it: left alone (read again); no checkpoint here, as before
            if held.due(quiet=not events):
                # A region with no event since the start (a series whose outbox was sent at start) has no
                # partition noted yet: it is the region's own, as the publishers key by region.
                n = settings.partitions
                changes = [
                    (partitions.get(region) or agents.partition_of(region.encode(), n), key, value)
                    for region, key, value in ctx.regions.drain_dirty(encode=to_json)  # freed as built (drain_dirty)
                ]
                taken_outbox = ctx.regions.take_outbox()
                storing, rows = rows, []
                await held.start(write(storing, changes, taken_outbox, len(held.events), drain_mark(agents.app)))

    agents.app.agent(agents.topics.inputs, name="intake")(intake_agent)
