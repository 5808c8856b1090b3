"""Spike alerts held in the outbox of the series that decided them, sent once that state is written.

The intake agent sends a checkpoint's outbox after the changelog write that holds it is acknowledged;
after a restart or a rebalance the kept outboxes of this worker's regions go out at once (same ids and
content: the alerts sink and delivery skip ids they have).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

from synthwatch.schemas import Alert
from synthwatch.stream_apps.detect.spikes import SeriesState
from synthwatch.stream_apps.runtime.context import AgentContext, send_all
from synthwatch.stream_apps.runtime.state_tables import StateTables, outbox_series

log = logging.getLogger("synthwatch.stack.worker")

#: What ``RegionDetector.take_outbox`` hands a checkpoint: (series, its state, alert JSON entries).
Outbox = list[tuple[str, SeriesState, list[str]]]


@dataclass
class SpikeOutbox:
    """Sends outboxes and remembers when each alert's triggering event was ingested (latency metric)."""

    agents: AgentContext
    tables: StateTables
    ingested: dict[str, float] = field(default_factory=dict)  # alert id -> Kafka timestamp of its trigger

    async def send(self, outbox: Outbox) -> None:
        """Send outbox entries (written to the changelog before), await their acks, then drop them."""
        if not outbox:
            return
        agents, ctx, metrics = self.agents, self.agents.worker, self.agents.metrics
        pending: list[Awaitable[Any]] = []
        published: list[Alert] = []
        for _, _, entries in outbox:
            for entry in entries:
                alert = Alert.model_validate_json(entry)
                published.append(alert)
                pending.append(await agents.send(agents.topics.alerts, alert.alert_id.encode(), entry.encode()))
        await send_all(pending)
        for name, state, entries in outbox:
            ctx.regions.sent(name, state, len(entries))
        metrics.produced(agents.settings.topic_alerts, len(published))
        now = time.time()
        for alert in published:  # re-sent ones after a restart have no ingest time here: counted, latency 0
            metrics.alerts_published([alert], self.ingested.pop(alert.alert_id, now), now)

    async def send_kept(self) -> int:
        """Send the spike alerts kept in the state of this worker's regions; returns how many.

        A worker that died between writing the state that decided a spike and sending it left the alert
        in the series' outbox: send it now (same id and content; the alerts sink and delivery skip ids
        they have). Only series of this worker's regions: the table also holds standby copies of others'.
        """
        agents, settings = self.agents, self.agents.settings
        mine = {tp.partition for tp in agents.app.consumer.assignment() if tp.topic in settings.input_topics}
        loaded = agents.worker.regions.restore_outboxes(
            [
                name
                for name in outbox_series(self.tables.regions.data)
                if agents.partition_of(name.split("|", 1)[0].encode(), settings.partitions) in mine
            ]
        )
        outbox = agents.worker.regions.take_outbox(only=set(loaded))
        await self.send(outbox)
        return sum(len(entries) for _, _, entries in outbox)
