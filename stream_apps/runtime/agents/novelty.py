"""The ``novelty`` agent on the sightings topic (keyed by substance): new substances, first appearances in a
region, spread. Its alerts go out with each batch; the substance state they changed is written to the
substance table's changelog at its checkpoints.

A batch is judged and sent a slice at a time (:data:`SLICE_SIGHTINGS`), with a turn of the event loop
between slices: under load one batch held ~1,000 first-in-region sightings, and every one of its alerts
waited until all of them were built and signed, while the intake agent and the producer's sender waited
too. Alerts are the same, in the same order; a slice's events are held for the checkpoint with its sends.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import faust

from synthwatch.schemas.topics import Sighting
from synthwatch.stream_apps.detect.replay import Position
from synthwatch.stream_apps.runtime.batches import novelty_batches
from synthwatch.stream_apps.runtime.context import AgentContext
from synthwatch.stream_apps.runtime.state_tables import Change, StateTables

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

    async def novelty_agent(stream: faust.StreamT[bytes]) -> None:
        held = agents.checkpoint()
        partitions: dict[str, int] = {}

        async def write(changes: list[Change]) -> None:
            await tables.write(tables.substances, changes)

        async for events in batches(stream):
            if events:
                await agents.until_state_ready()
                metrics.consumed(events)
                read: list[tuple[Any, list[tuple[Sighting, Position]]]] = []
                for e in events:
                    of_event: list[tuple[Sighting, Position]] = []
                    read.append((e, of_event))  # a refused record is held (acknowledged) like the others
                    if not agents.produced_by_a_worker(e):
                        continue
                    at = (f"{e.message.topic}:{e.message.partition}", e.message.offset)
                    for data in json.loads(e.value):
                        sighting = Sighting.from_dict(data)
                        partitions[sighting.key] = e.message.partition
                        of_event.append((sighting, at))
                generation = agents.app.consumer_generation_id
                for n, (sliced, batch_sightings) in enumerate(slices(read)):
                    if n:
                        await asyncio.sleep(0)  # alerts sent so far leave; the other agents get a turn
                        if agents.app.consumer_generation_id != generation:
                            break  # a rebalance meanwhile: the rest is fetched again, as any stale event
                    # In the order read; those a record holds already (read again after a restart) skipped.
                    alerts, taken = ctx.novelty.observe_batch(batch_sightings)
                    metrics.sightings_processed(len(batch_sightings))
                    agents.replayed_records("novelty", len(batch_sightings) - taken)
                    sent = [
                        await agents.send(agents.topics.alerts, a.alert_id.encode(), a.model_dump_json().encode())
                        for a in alerts
                    ]
                    held.hold(sliced, sent)
                    metrics.produced(settings.topic_alerts, len(alerts))
                    if alerts:
                        # from the sighting's Kafka timestamp: the intake stage's time before it is not included
                        metrics.alerts_published(alerts, min(e.message.timestamp or time.time() for e in sliced))
                    metrics.alerts_raised(len(alerts))
            if held.due(quiet=not events):
                await held.start(write([(partitions[k], k, v) for k, v in ctx.novelty.drain_dirty()]))

    agents.app.agent(agents.topics.sightings, name="novelty")(novelty_agent)
