"""The ``rejects`` and ``alerts`` agents: store those topics in ClickHouse at their checkpoints.

Only records a worker signed are stored (the delivery agent reads the alerts topic too, with the same
check); a reject that is not a reject record is stored as a reject of its own, saying why. A batch is checked and
parsed in slices with a turn of the event loop between them (:func:`.context.slices`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Any

import faust

from synthwatch.schemas import Alert, Reject
from synthwatch.stream_apps.runtime.context import SLICE_RECORDS, AgentContext, slices, turn

log = logging.getLogger("synthwatch.stack.worker")


def add_storing_agent(
    agents: AgentContext,
    topic: faust.TopicT,
    what: str,
    parse: Callable[[Any], Any | None],
    store: Callable[[list[Any]], int],
) -> None:
    """An agent named ``what`` that stores the records of ``topic`` in ClickHouse at its checkpoints."""
    metrics = agents.metrics

    async def agent(stream: faust.StreamT[bytes]) -> None:
        held = agents.checkpoint()
        items: list[Any] = []

        async def write(taken: list[Any]) -> None:
            timed = metrics.timed_call(what, len(taken), partial(store, taken))
            new = await agents.with_retries(f"storing {what}", timed)
            metrics.records_stored(what, new)

        async for events in agents.batches(stream):
            metrics.consumed(events)
            for n, part in enumerate(slices(events, SLICE_RECORDS)):
                if n:
                    await turn(agents.app, topic)  # a batch of 10,000 signed records to parse: not in one piece
                for e in part:
                    item = parse(e)
                    if item is not None:
                        items.append(item)
            held.hold(events, [])  # only now, whole: its checkpoint (started below, never at a turn) takes all of it
            if held.due(quiet=not events):
                taken, items = items, []
                await held.start(write(taken))

    agents.app.agent(topic, name=what)(agent)


def parse_reject(agents: AgentContext, e: Any) -> Reject | None:
    """A signed reject record; one that does not parse becomes a reject saying so."""
    if not agents.produced_by_a_worker(e):  # only workers (and publishers holding the worker key) write rejects
        return None
    try:
        return Reject.model_validate_json(e.value)
    except ValueError as error:
        source = f"{e.message.topic}:{e.message.partition}:{e.message.offset}"
        return Reject.of(e.value or b"", source=source, reason=f"not a reject record: {error}", stage="worker")


def parse_alert(agents: AgentContext, e: Any) -> Alert | None:
    """A signed alert record; one that does not parse is logged and skipped."""
    if not agents.produced_by_a_worker(e):
        return None
    try:
        return Alert.model_validate_json(e.value)
    except ValueError as error:
        log.error("alerts topic: not an alert at %s:%s (%s)", e.message.partition, e.message.offset, error)
        return None


def add_storing_agents(agents: AgentContext) -> None:
    """Define the ``rejects`` and ``alerts`` storing agents."""
    sink = agents.worker.sink
    add_storing_agent(agents, agents.topics.rejects, "rejects", partial(parse_reject, agents), sink.store_rejects)
    add_storing_agent(agents, agents.topics.alerts, "alerts", partial(parse_alert, agents), sink.store_alerts)
