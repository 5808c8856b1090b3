"""The ``novelty`` agent on the sightings topic (keyed by substance): new substances, first appearances in a
region, spread. Its alerts go out with each batch; the substance state they changed is written to the
substance table's changelog at its checkpoints.

A signed sightings record that is not one (not a JSON array of sightings: a worker bug, or a publisher holding
the worker key) is refused into the rejects topic with the reason, like any bad input, before the novelty
stage sees it: it raised out of the agent, and the worker stopped taking sightings.

A batch is judged and sent a slice at a time (:data:`SLICE_SIGHTINGS`), with a turn of the event loop
between slices: under load one batch held ~1,000 first-in-region sightings, and every one of its alerts
waited until all of them were built and signed, while the intake agent and the producer's sender waited
too. Alerts are the same, in the same order; a slice's events are held for the checkpoint with its sends. The
batch's records are read (signature checked, parsed) before that with a turn every :data:`.context.SLICE_RECORDS`
sightings.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import faust

from synthwatch.schemas import Alert, Reject
from synthwatch.schemas.topics import Sighting
from synthwatch.stream_apps.detect.novelty import STRUCTURE_ALERTS
from synthwatch.stream_apps.detect.replay import Position
from synthwatch.stream_apps.runtime.agents.intake import send_rejects
from synthwatch.stream_apps.runtime.batches import novelty_batches
from synthwatch.stream_apps.runtime.context import SLICE_RECORDS, AgentContext, turn
from synthwatch.stream_apps.runtime.state_tables import Change, StateTables
from synthwatch.stream_apps.runtime.transport import drain_mark, revoked, state_write

log = logging.getLogger("synthwatch.stack.worker")


def parse_sightings(e: Any) -> list[Sighting] | Reject:
    """The sightings of one record of the sightings topic, or a reject saying why it holds none."""
    try:
        data = json.loads(e.value)
        if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
            raise ValueError("not a JSON array of objects")
        return [Sighting.from_dict(item) for item in data]
    except (ValueError, TypeError, KeyError) as error:  # JSON, text, a field missing, unknown or malformed
        source = f"{e.message.topic}:{e.message.partition}:{e.message.offset}"
        reason = f"not a sightings record: {type(error).__name__}: {error}"
        log.error("%s refused: %s", source, reason)
        return Reject.of(e.value or b"", source=source, reason=reason, stage="worker")


#: Sightings judged (and their alerts sent) between two turns of the event loop; a message is never split.
SLICE_SIGHTINGS = 64


def slices(sightings: list[tuple[Any, list[tuple[Sighting, Position]]]]) -> Iterator[tuple[list[Any], list[Any]]]:
    """(events, their sightings) in slices of whole messages holding about :data:`SLICE_SIGHTINGS` sightings."""
    events: list[Any] = []
    taken: list[tuple[Sighting, Position]] = []
    for event, of_event in sightings:
        events.append(event)
        taken.extend(of_event)
        if len(taken) >= SLICE_SIGHTINGS:
            yield events, taken
            events, taken = [], []
    if events:
        yield events, taken


def add_novelty_agent(agents: AgentContext, tables: StateTables) -> None:
    """Define the ``novelty`` agent on the sightings topic."""
    ctx, metrics, settings = agents.worker, agents.metrics, agents.settings
    batches = novelty_batches(settings)  # no linger: see novelty_batches
    settle = timedelta(seconds=settings.learnt_settle_seconds)
    sightings_topic = agents.topics.sightings

    async def with_learnt(
        alerts: list[Alert], raised_by: dict[tuple[str, str], tuple[Sighting, float | None]]
    ) -> list[Alert]:
        """New-substance alerts with the nearest learnt structures, read from the store up to each one's cut.

        The cut is the Kafka timestamp of the sightings message that raised the alert, less the settle time:
        a replay after a crash reads that message again (same timestamp), so it asks the store the same
        question, and the stored rows at or before an instant past do not change.
        """
        out = []
        for alert in alerts:
            found = raised_by.get(
                (alert.substance.key, alert.evidence_event_ids[0] if alert.evidence_event_ids else "")
            )
            if alert.alert_type in STRUCTURE_ALERTS and found is not None:
                sighting, stamp = found
                # a message with no timestamp has no cut, and a name-only report no structure: no learnt section
                if stamp is not None and ctx.novelty.compared_by_structure(sighting):
                    as_of = datetime.fromtimestamp(stamp, UTC) - settle
                    learnt = await agents.with_retries(
                        "reading learnt structures", partial(ctx.sink.learnt_structures, as_of)
                    )
                    alert = ctx.novelty.with_learnt(alert, sighting, learnt, as_of)
            out.append(alert)
        return out

    async def novelty_agent(stream: faust.StreamT[bytes]) -> None:
        held = agents.checkpoint()
        partitions: dict[str, int] = {}

        async def write(changes: list[Change], drained_at: int | None) -> None:
            writing = state_write(agents.app, drained_at)  # None: forgotten in a rebalance since, as the intake's
            if writing is not None:
                with writing:  # a revoke beginning meanwhile waits for it (up to its bound)
                    await tables.write(tables.substances, changes, writing)

        async def judge(events: list[Any]) -> None:
            """One batch: its records parsed, then judged in slices and held for the checkpoint.

            A function of its own so that what it parsed goes when it returns: as locals of the loop below,
            ``read`` and ``raised_by`` kept every sighting of the batch alive until the next batch that held
            any. Behind a backlog a batch holds up to ``sink_batch_size`` records of many sightings each:
            276,267 parsed sightings (~155 MiB traced) were still held by an idle worker (docs/performance.md,
            "Session 22"). Nothing else changes: the same steps, in the same order, with the same awaits.
            """
            await agents.until_state_ready()
            metrics.consumed(events)
            read: list[tuple[Any, list[tuple[Sighting, Position]]]] = []
            raised_by: dict[tuple[str, str], tuple[Sighting, float | None]] = {}
            refused: dict[int, Reject] = {}  # by id() of the event it refuses, sent with that event's slice
            parsed_here = 0  # records and sightings read since the last turn of the loop
            for e in events:
                if parsed_here >= SLICE_RECORDS:
                    await turn(agents.app, sightings_topic)  # reading a batch in one piece held the loop too
                    parsed_here = 0
                parsed_here += 1
                of_event: list[tuple[Sighting, Position]] = []
                read.append((e, of_event))  # a refused record is held (acknowledged) like the others
                if not agents.produced_by_a_worker(e):
                    continue
                parsed = parse_sightings(e)
                if isinstance(parsed, Reject):
                    refused[id(e)] = parsed
                    continue
                at = (f"{e.message.topic}:{e.message.partition}", e.message.offset)
                parsed_here += len(parsed)
                for sighting in parsed:
                    partitions[sighting.key] = e.message.partition
                    of_event.append((sighting, at))
                    raised_by.setdefault((sighting.key, sighting.event_id), (sighting, e.message.timestamp))
            for n, (sliced, batch_sightings) in enumerate(slices(read)):
                if n:
                    await turn(agents.app, sightings_topic)  # alerts sent so far leave; the others get a turn
                if revoked(agents.app, events[0].message):
                    # A rebalance began meanwhile (from its revoke, not only once the new assignment has
                    # come): the state is forgotten, and applied to state reloaded without the slices
                    # before it, this slice's marks would cover theirs. The rest is fetched again.
                    break
                # In the order read; those a record holds already (read again after a restart) skipped.
                alerts, taken = ctx.novelty.observe_batch(batch_sightings)
                alerts = await with_learnt(alerts, raised_by)
                metrics.sightings_processed(len(batch_sightings))
                agents.replayed_records("novelty", len(batch_sightings) - taken)
                sent = [
                    await agents.send(agents.topics.alerts, a.alert_id.encode(), a.model_dump_json().encode())
                    for a in alerts
                ]
                rejects = [refused[id(e)] for e in sliced if id(e) in refused]
                sent += await send_rejects(agents, rejects, sightings_topic)
                held.hold(sliced, sent)
                metrics.produced(settings.topic_alerts, len(alerts))
                metrics.rejected(rejects)
                metrics.produced(settings.topic_rejects, len(rejects))
                if alerts:
                    # from the sighting's Kafka timestamp: the intake stage's time before it is not included
                    metrics.alerts_published(alerts, min(e.message.timestamp or time.time() for e in sliced))
                metrics.alerts_raised(len(alerts))

        async for events in batches(stream):
            if events:
                await judge(events)
            if held.due(quiet=not events):
                changes = [(partitions[k], k, v) for k, v in ctx.novelty.drain_dirty()]
                await held.start(write(changes, drain_mark(agents.app)))

    agents.app.agent(agents.topics.sightings, name="novelty")(novelty_agent)
