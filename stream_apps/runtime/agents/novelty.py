"""The ``novelty`` agent on the sightings topic (keyed by substance): new substances, first appearances in a
region, spread. Its alerts go out with each batch; the substance state they changed is written to the
substance table's changelog at its checkpoints."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from functools import partial

import faust

from synthwatch.schemas import Alert
from synthwatch.schemas.topics import Sighting
from synthwatch.stream_apps.detect.replay import Position
from synthwatch.stream_apps.runtime.batches import novelty_batches
from synthwatch.stream_apps.runtime.context import AgentContext
from synthwatch.stream_apps.runtime.state_tables import Change, StateTables


def add_novelty_agent(agents: AgentContext, tables: StateTables) -> None:
    """Define the ``novelty`` agent on the sightings topic."""
    ctx, metrics, settings = agents.worker, agents.metrics, agents.settings
    batches = novelty_batches(settings)  # no linger: see novelty_batches
    settle = timedelta(seconds=settings.learnt_settle_seconds)

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
            if alert.alert_type == "new_substance" and found is not None:
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

        async def write(changes: list[Change]) -> None:
            await tables.write(tables.substances, changes)

        async for events in batches(stream):
            if events:
                await agents.until_state_ready()
                metrics.consumed(events)
                batch_sightings: list[tuple[Sighting, Position]] = []
                raised_by: dict[tuple[str, str], tuple[Sighting, float | None]] = {}
                for e in events:
                    if not agents.produced_by_a_worker(e):
                        continue
                    at = (f"{e.message.topic}:{e.message.partition}", e.message.offset)
                    for data in json.loads(e.value):
                        sighting = Sighting.from_dict(data)
                        partitions[sighting.key] = e.message.partition
                        batch_sightings.append((sighting, at))
                        raised_by.setdefault((sighting.key, sighting.event_id), (sighting, e.message.timestamp))
                # In the order read; those a record holds already (read again after a restart) skipped.
                alerts, taken = ctx.novelty.observe_batch(batch_sightings)
                alerts = await with_learnt(alerts, raised_by)
                metrics.sightings_processed(len(batch_sightings))
                agents.replayed_records("novelty", len(batch_sightings) - taken)
                sent = [
                    await agents.send(agents.topics.alerts, a.alert_id.encode(), a.model_dump_json().encode())
                    for a in alerts
                ]
                held.hold(events, sent)
                metrics.produced(settings.topic_alerts, len(alerts))
                if alerts:
                    # from the sighting's Kafka timestamp: the intake stage's time before it is not included
                    metrics.alerts_published(alerts, min(e.message.timestamp or time.time() for e in events))
                metrics.alerts_raised(len(alerts))
            if held.due(quiet=not events):
                await held.start(write([(partitions[k], k, v) for k, v in ctx.novelty.drain_dirty()]))

    agents.app.agent(agents.topics.sightings, name="novelty")(novelty_agent)
