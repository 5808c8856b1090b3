"""Batches of events straight from a Faust agent's channel: one loop step per batch, not per event.

Why: Faust's stream iteration (``async for``, and ``take``/``noack_take`` built on it) runs its
machinery for every event: processors, sensors, the current-event context variable, a loop yield.
On this machine that alone caps a bare agent at ~12,000 events/s; the worker needs its event loop
for validation, detection and storage too. The conductor already puts decoded events in the
channel's queue; this reads that queue directly and hands the agent whatever has arrived, up to
``size`` events. A batch forms as soon as events are there: large under load (cheap per event),
one event when the stream is quiet (no batch window to wait out, so alerts are not delayed).

What Faust's own loop does per event and must still be done (faust/streams.py ``_py_aiter``):
events of an older consumer generation, or taken while flow control is off, are skipped; an event is
tracked as unacknowledged before it is processed, so the consumer never commits past it; it is
acknowledged only after the agent is done with its batch. One difference: skipped events are *not*
acknowledged (Faust acknowledges them): a rebalance or a seek fetches them again, and an acknowledged
offset could be committed for a partition that came back to this worker before the event was processed.
Per-event stream sensors are not called (the worker counts events in its own metrics). Events are
yielded unacknowledged: the worker acknowledges them at its next checkpoint (:mod:`.checkpoints`),
once what they changed is durable.

Every agent's batching is chosen here (:func:`agent_batches`, :func:`novelty_batches`,
:func:`delivery_batches`): the storing, intake and novelty agents take what ``SYNTHWATCH_AGENT_BATCHES``
says (the novelty agent without the linger, see :func:`novelty_batches`); the delivery agent always takes
channel batches (see :func:`delivery_batches` for why).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, cast

import faust
from faust.types import EventT

from synthwatch.settings import Settings

#: A stream with nothing new for this long is quiet: its agent checkpoints what it holds at once.
QUIET_SECONDS = 0.2


async def channel_batches(
    stream: faust.StreamT[Any], size: int, idle: float | None = None, linger: float = 0.0, least: int = 1
) -> AsyncIterator[list[EventT]]:
    """Yield lists of at most ``size`` events as they arrive, unacknowledged: the caller acks them.

    A batch of fewer than ``least`` events waits up to ``linger`` seconds for more while more keep
    coming: the conductor hands over a fetch while the agent runs, and every batch has fixed costs. With ``idle``
    (seconds), an empty list comes when nothing arrived for that long, so the caller can finish work
    it holds (a checkpoint) on a quiet stream.
    """
    s = cast(faust.Stream[Any], stream)
    app = s.app
    started_here = await s.maybe_start()
    queue = s.channel.queue  # type: ignore[attr-defined]  # the topic channel the conductor fills
    errors = queue._errors  # exceptions thrown into the channel (ThrowableQueue)
    consumer = app.consumer
    unacked = consumer.unacked
    # the worker's consumer (:class:`.transport.Consumer`) says when it is handing a fetch over
    delivering = (lambda: consumer.delivering) if hasattr(consumer, "delivering") else None
    # and counts its seeks (:meth:`.transport.Consumer.perform_seek`): each clears the queues and fetches again
    seeks = (lambda: consumer.seeks) if hasattr(consumer, "seeks") else (lambda: 0)
    acking_topics = app.topics.acking_topics
    flow_control = app.flow_control
    # and counts, per topic, the batches its agents take and finish (:attr:`.transport.Consumer.worked`): the
    # watchdog's sign that this agent works through what was handed over to it, however long that waits
    worked: dict[str, int] | None = getattr(consumer, "worked", None)
    topics = tuple(getattr(s.channel, "topics", ()) or ())
    try:
        while not s.should_stop:
            if errors:
                error = errors.popleft()
                if isinstance(error, StopAsyncIteration):  # thrown in when the stream stops: as below
                    return
                raise error
            try:
                if queue.empty() and idle is not None:
                    try:
                        first = await asyncio.wait_for(queue.get(), idle)
                    except TimeoutError:
                        yield []
                        continue
                else:
                    first = await queue.get()
            except StopAsyncIteration:  # thrown into the channel when the stream stops
                return
            # Whether ``first`` is still current once the batch is complete: the waits below (the linger) leave
            # time for a whole seek-back (flow stopped, seek, queues cleared, flow resumed), after which the
            # queue holds records fetched again from the committed offset and ``first`` is from before.
            first_active, first_seeks = flow_control.is_active(), seeks()
            if linger > 0 and queue.qsize() + 1 < least and delivering is not None:
                # The worker's consumer says when it is handing a fetch over (``Consumer.delivering``, one
                # event at a time, a loop turn every 100): wait for the rest of that fetch, up to ``linger``,
                # and no longer. The polling below (the queue grew in the last 5 ms) went on while later
                # fetches came: at a steady 1,000 events/s it held batches for up to the whole linger.
                deadline = time.monotonic() + linger
                while delivering() and queue.qsize() + 1 < least and time.monotonic() < deadline:
                    await asyncio.sleep(0.001)
            elif linger > 0 and queue.qsize() + 1 < least:
                # Another consumer (Faust's own): the conductor hands a fetch over one event per turn of the
                # loop: while it is still doing so (the queue grew in the last 5 ms), give it time, up to
                # ``linger``. A steady, light stream (a fetch of a few events, then nothing) goes after ~10 ms.
                deadline = time.monotonic() + linger
                seen, still = queue.qsize(), 0
                while still < 2 and seen + 1 < least and (left := deadline - time.monotonic()) > 0:
                    await asyncio.sleep(min(0.005, left))
                    size_now = queue.qsize()
                    still = still + 1 if size_now == seen else 0
                    seen = size_now
            taken = [first]
            while len(taken) < size and not queue.empty():
                taken.append(queue.get_nowait())
            active = flow_control.is_active()
            generation = app.consumer_generation_id
            events: list[EventT] = []
            if not first_active or seeks() != first_seeks:
                # Taken before a seek that has cleared the queues meanwhile: fetched again after the records
                # the queue holds now. Handed on ahead of them, the region stage applied it first and took the
                # unprocessed records below it, of its region, for replays: skipped, never stored, committed.
                taken = taken[1:]
            for event in taken:
                message = event.message
                if message.generation_id != generation or not active:
                    # Stale (fetched before a rebalance) or taken while the flow is stopped for a seek: the
                    # new generation or the seek fetches it again from the committed offset. Not acknowledged,
                    # unlike Faust: Faust's ``Consumer.ack`` does not check the generation, so a partition that
                    # came back to this worker would count the offset as done and commit past an event never
                    # processed (after a SIGKILL Tansu puts the new worker through two rebalances).
                    continue
                if not message.tracked and message.topic in acking_topics:
                    message.tracked = True
                    unacked.add(message)
                events.append(event)
            if events:
                if worked is not None:
                    _count_work(worked, topics, events)
                yield events
                if worked is not None:  # the agent is done with the batch (its checkpoint may still run)
                    _count_work(worked, topics, events)
    finally:
        if started_here:
            await s.stop()


def _count_work(worked: dict[str, int], topics: Sequence[str], events: list[EventT]) -> None:
    """One more batch taken or finished by an agent of ``topics`` (those of its channel; of its events when the
    channel does not say)."""
    for topic in topics or {event.message.topic for event in events}:
        worked[topic] = worked.get(topic, 0) + 1


async def take_batches(stream: faust.StreamT[Any], size: int, within: float) -> AsyncIterator[list[EventT]]:
    """Faust's own batching (``noack_take``), unacknowledged, for comparison with :func:`channel_batches`.

    Not ``take_events``: it acknowledges a batch in a ``finally``, so a batch whose processing was
    cancelled (SIGTERM mid-batch) was committed unprocessed. ``noack_take`` yields no empty batches,
    so the worker checkpoints after every batch with it.
    """
    s = cast(faust.Stream[Any], stream)
    async for taken in s.noack_take(size, within=within):
        yield list(cast(Sequence[EventT], taken))  # noack_take yields the events themselves


def agent_batches(
    settings: Settings, lingering: bool = True
) -> Callable[[faust.StreamT[bytes]], AsyncIterator[list[Any]]]:
    """The batching the settings ask for: straight from the channel, or Faust's ``noack_take``.

    ``lingering=False``: channel batches never wait for more (``batch_linger_seconds`` is not applied), for an
    agent whose batches have no fixed cost worth waiting for (see :func:`novelty_batches`).
    """
    size, within = settings.sink_batch_size, settings.sink_batch_seconds
    idle = min(settings.checkpoint_seconds, QUIET_SECONDS)
    if settings.agent_batches == "channel":
        linger = settings.batch_linger_seconds if lingering else 0.0
        least = settings.batch_least
        return lambda stream: channel_batches(stream, size, idle=idle, linger=linger, least=least)
    return lambda stream: take_batches(stream, size, within)


def novelty_batches(settings: Settings) -> Callable[[faust.StreamT[bytes]], AsyncIterator[list[Any]]]:
    """The novelty agent's batching: :func:`agent_batches` without the linger.

    Why: the linger (at least two 5 ms polls of the queue, up to ``batch_linger_seconds``) pays off where a
    batch has fixed costs, the intake's. A novelty batch has none worth waiting for: no ClickHouse, its
    changelog write is at the checkpoint whatever the batch size, and its input is a few sightings messages
    per intake batch. The linger only delayed every new-substance, first-in-region and spread alert by
    10 ms or more on the second broker hop. Checkpoints and acknowledgements are unchanged.
    """
    return agent_batches(settings, lingering=False)


def delivery_batches(settings: Settings) -> Callable[[faust.StreamT[bytes]], AsyncIterator[list[Any]]]:
    """The delivery agent's batching: channel batches whatever ``SYNTHWATCH_AGENT_BATCHES`` says.

    Why: Faust's ``noack_take`` acknowledges the events it skips (stale generation, flow stopped), which
    could commit an alert never delivered. No idle batches and no linger: the delivery agent holds no
    checkpoint, and an alert should go out as soon as it is read.
    """
    size = settings.sink_batch_size
    return lambda stream: channel_batches(stream, size)


def checkpoint_every(settings: Settings) -> float:
    """Seconds between an agent's checkpoints: Faust's take batches end only when events come, so they
    checkpoint after every batch (0)."""
    return settings.checkpoint_seconds if settings.agent_batches == "channel" else 0.0
