"""Checkpoints: acknowledge consumed events only once everything they caused is durable.

Why: an agent's outputs (alerts, sightings, rejects) go out with each batch, so an alert is not held
back by storage (but spike alerts: they wait in an outbox in the state that decided them and go out
inside the intake agent's ``write``, after that state is written, see :mod:`.agents.intake`); the costly,
per-batch-fixed work (a ClickHouse insert with its materialized views, rewriting every changed
detector state record to the changelog) runs once per checkpoint instead of
once per batch. A checkpoint, in this order: the batches' produced records are acknowledged by the
broker; their rows are in ClickHouse; the detector state they changed is in the changelog; then
their offsets are acknowledged (and committed by Faust). A worker that dies before the end of a
checkpoint replays its events from state that has not seen them and produces the same records again
(same ids, deduplicated downstream): nothing is lost, nothing is stored twice.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Coroutine
from typing import Any

import faust
from faust.types import EventT

from synthwatch.stream_apps.runtime.transport import RowsBeingStored, note_stored, rows_being_stored


class Checkpoint:
    """What an agent holds since its last checkpoint: consumed events and records being produced.

    ``every`` seconds at most between checkpoints (0: after every batch), or sooner once ``most``
    events are held. Events of an older consumer generation (their partitions were reassigned
    meanwhile) are not acknowledged: the new owner replays them from the state it restored. From the
    start of a revoke the consumer refuses every acknowledgement until the next assignment (the revoke
    forgets the detector state the held events changed: :mod:`.transport`, item 6), and a revoke waits, up to
    a bound, for a checkpoint writing detector state (:func:`.transport.state_write`) before it goes on.
    """

    def __init__(self, app: faust.App, every: float, most: int) -> None:
        self.app = app
        self.every = every
        self.most = most
        self.events: list[EventT] = []
        self.sends: list[Awaitable[Any]] = []
        self.since = time.monotonic()
        self.running: asyncio.Future[None] | None = None
        self.writing: list[EventT] = []  # the events of the checkpoint under way
        self.storing: RowsBeingStored | None = None  # their rows, while a thread writes them

    def hold(self, events: list[EventT], sends: list[Awaitable[Any]]) -> None:
        if not self.events:
            self.since = time.monotonic()
        self.events.extend(events)
        self.sends.extend(sends)

    def due(self, quiet: bool = False) -> bool:
        """Something is held and it has been held long enough, or there is a lot of it, or the stream
        is ``quiet`` (nothing arrived for a while: checkpointing costs nothing then, and the held
        events reach ClickHouse without waiting out the interval)."""
        if not self.events:
            return False
        return quiet or len(self.events) >= self.most or time.monotonic() - self.since >= self.every

    async def start(self, write: Coroutine[Any, Any, None]) -> None:
        """Checkpoint what is held now in the background; the agent goes on with its next batches.

        ``write`` is the coroutine that stores what the held events produced (rows, detector state);
        the agent builds it from a snapshot taken when it calls this. Checkpoints run one at a time:
        this first waits for the previous one (so a slow or unreachable ClickHouse holds the agent
        back after one checkpoint's worth of events, instead of letting it run ahead without bound)
        and raises what it raised.
        """
        try:
            await self.wait()
        except BaseException:
            write.close()  # never started: the agent fails with the previous checkpoint's error
            raise
        events, sends = self.events, self.sends
        self.events, self.sends = [], []
        self.writing = events
        self.running = asyncio.ensure_future(self._complete(events, sends, write))

    def rows_stored(self) -> None:
        """Note the events of the checkpoint under way as stored: ``write`` calls it once their rows are in
        ClickHouse (or they are refused with a reason), before it writes detector state.

        Why: a stop can cut a checkpoint short after that (a broker that was unwell while the worker stopped);
        the events are then neither acknowledged nor committed, but their reports are stored, and the count
        of what a stop lost (``synthwatch up``) must not call them lost.
        """
        note_stored(self.app.consumer, (event.message for event in self.writing), self.storing)
        self.storing = None

    def rows_being_stored(self) -> RowsBeingStored:
        """For the thread that writes the rows of the checkpoint under way: its :meth:`RowsBeingStored.done`
        marks them stored as :meth:`rows_stored` does, even if a stop cancels the coroutine that waits for it.
        """
        self.storing = rows_being_stored(self.app.consumer, (event.message for event in self.writing))
        return self.storing

    async def wait(self) -> None:
        """Wait for the checkpoint under way, if any."""
        running, self.running = self.running, None
        if running is not None:
            await running

    async def _complete(self, events: list[EventT], sends: list[Awaitable[Any]], write: Awaitable[None]) -> None:
        for send in sends:
            await send  # delivered (or raises) before the offsets that caused them are committed
        await write
        generation = self.app.consumer_generation_id
        for event in events:
            if event.message.generation_id == generation:
                event.ack()
        counts: dict[str, int] | None = getattr(getattr(self.app, "consumer", None), "checkpoints", None)
        if counts is not None:  # the watchdog's sign that a record still in hand after two of them was leaked
            for topic in {event.message.topic for event in events}:
                counts[topic] = counts.get(topic, 0) + 1
