"""`synthwatch up` with the order of things in its stop fixed, for the ``[timeout, fetched...]`` cases of
tests/stack/test_stack.py.

``python -m tests.support.stop_faults FAULT up ...``: runs ``synthwatch up ...`` with FAULT (below); nothing
else changes (same broker, ClickHouse, agents, count and report). Either way it logs :data:`UNDER_WAY` once a
checkpoint of input records is under way, which the test waits for while the broker is frozen.

Why: a worker that read a fetch while its broker was frozen holds a checkpoint of those records that can
store nothing until the broker answers again (it first waits for the broker's acknowledgement of the
sightings the records produced; then rows, detector state, acknowledgement). Once the broker continues,
during the stop, that checkpoint stores the rows while the stop runs its last commit and tears the worker
down: what happens to the records is decided in milliseconds inside the stop, and no signal the test can
wait on with the broker frozen decides it (nothing can be stored while it is frozen).

``cut``: the stop's last commit comes after the checkpoints of input records stored their rows, and no
commit covers them (stored, not committed, not counted as lost). Other orders (stored and committed) are
right too; only this one exercises the count of what was stored but not committed. Two waits on events:

1. a checkpoint of input records acknowledges its records only once the consumer has stopped (its last
   commit and its commit timer are over): as if the broker never took its detector state in time;
2. the consumer's last commit (its ``on_stop``) waits until every checkpoint of input records under way has
   stored its rows (:meth:`Checkpoint.rows_stored`) or ended, so the stop cannot end before the rows are in.

``abandoned``: every checkpoint of input records writes its rows only once the stop has cancelled the tasks
still running (mode's ``_gather_all``, a second after the services stopped) and closed the event loop, and
ends before the worker closes ClickHouse: as if ClickHouse were slow. The checkpoints awaiting those writes
were cancelled, so their rows are in ClickHouse and only the writing threads can say so
(:class:`~synthwatch.stream_apps.runtime.transport.RowsBeingStored`), after the writes, which the count must
wait for.

Why "every": the test hands the worker a fetch by letting it run for moments while the broker runs, so a
checkpoint may begin (or its sightings be acknowledged) before the broker froze; holding every checkpoint of
input records makes the order the same whichever checkpoint holds which records.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from collections.abc import Awaitable, Coroutine
from typing import Any

import mode.worker

from synthwatch.settings import Settings
from synthwatch.stream_apps.runtime.checkpoints import Checkpoint
from synthwatch.stream_apps.runtime.transport import Consumer
from synthwatch.stream_apps.storage.clickhouse import OpeningClient
from synthwatch.stream_apps.storage.sink import ClickHouseSink

log = logging.getLogger(__name__)

#: What it logs once a checkpoint of input records is under way (the test waits for it, broker frozen).
UNDER_WAY = "checkpoint under way with input records:"

#: Per checkpoint of input records under way: set once its rows are stored or it ended.
_UNDER_WAY: dict[asyncio.Future[None], asyncio.Event] = {}
#: Set once the consumer has stopped: nothing commits after that.
_CONSUMER_STOPPED = asyncio.Event()


def log_under_way(input_topics: tuple[str, ...]) -> dict[int, asyncio.Event]:
    """Log :data:`UNDER_WAY` when a checkpoint of input records starts; returns, per Checkpoint (an agent's),
    an event set once its checkpoint under way ended (its rows stored, for :func:`cut`)."""
    start = Checkpoint.start
    noted: dict[int, asyncio.Event] = {}

    async def started(self: Checkpoint, write_coro: Coroutine[Any, Any, None]) -> None:
        await start(self, write_coro)
        running = self.running
        if running is not None and any(e.message.topic in input_topics for e in self.writing):
            event = noted[id(self)] = _UNDER_WAY[running] = asyncio.Event()
            running.add_done_callback(lambda _: event.set())
            log.warning("%s %d", UNDER_WAY, len(self.writing))

    Checkpoint.start = started
    return noted


def cut(noted: dict[int, asyncio.Event], input_topics: tuple[str, ...]) -> None:
    """The ``cut`` order (module docstring), in this process."""
    rows_stored, complete = Checkpoint.rows_stored, Checkpoint._complete
    on_stop, stop = Consumer.on_stop, Consumer.stop

    def stored(self: Checkpoint) -> None:
        rows_stored(self)
        if id(self) in noted:
            noted[id(self)].set()

    async def completed(self: Checkpoint, events: list[Any], sends: list[Any], write: Awaitable[None]) -> None:
        async def then_wait() -> None:
            await write
            await _CONSUMER_STOPPED.wait()  # Checkpoint._complete acknowledges the events after this

        held = any(e.message.topic in input_topics for e in events)
        await complete(self, events, sends, then_wait() if held else write)

    async def last_commit(self: Consumer) -> None:
        for event in list(_UNDER_WAY.values()):
            await event.wait()
        await on_stop(self)

    async def stopped(self: Consumer) -> None:
        await stop(self)
        _CONSUMER_STOPPED.set()

    Checkpoint.rows_stored = stored
    Checkpoint._complete = completed
    Consumer.on_stop = last_commit
    Consumer.stop = stopped


def abandoned() -> None:
    """The ``abandoned`` order (module docstring), in this process."""
    schedule, shutdown_loop, store, close = (
        mode.worker.Worker._schedule_shutdown,
        mode.worker.Worker._shutdown_loop,
        ClickHouseSink.store_events,
        OpeningClient.close,
    )
    stopping, closed, inserted = threading.Event(), threading.Event(), threading.Event()

    def schedule_shutdown(self: Any, sig: Any) -> None:
        stopping.set()
        schedule(self, sig)

    def shut_down_loop(self: Any) -> None:
        try:
            shutdown_loop(self)  # cancels the tasks still running, then closes the loop
        finally:  # also when it re-raises what crashed the worker
            closed.set()

    def store_events(self: ClickHouseSink, items: Any) -> Any:
        try:
            closed.wait()
            return store(self, items)
        finally:
            inserted.set()

    def close_client(self: OpeningClient) -> None:
        if stopping.is_set():
            inserted.wait(120)  # a bound for a hang only: the held inserts come once the loop is closed
        close(self)

    mode.worker.Worker._schedule_shutdown = schedule_shutdown  # type: ignore[method-assign,assignment]
    mode.worker.Worker._shutdown_loop = shut_down_loop  # type: ignore[method-assign]
    ClickHouseSink.store_events = store_events
    OpeningClient.close = close_client


def main() -> None:
    fault = sys.argv[1]
    input_topics = Settings().input_topics
    noted = log_under_way(input_topics)
    if fault == "cut":
        cut(noted, input_topics)
    elif fault == "abandoned":
        abandoned()
    else:
        raise SystemExit(f"unknown fault {fault!r}: cut or abandoned")
    sys.argv = ["synthwatch", *sys.argv[2:]]
    from synthwatch.cli.main import main as cli

    cli()


if __name__ == "__main__":
    main()
