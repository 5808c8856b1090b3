"""`synthwatch up` whose stop ends a checkpoint under way after its rows and before its acknowledgement,
for the ``[timeout, fetched]`` case of tests/stack/test_stack.py.

``python -m tests.support.stop_faults up ...``: runs ``synthwatch up ...`` with the order of two things in
its stop fixed; nothing else changes (same broker, ClickHouse, agents, count and report).

Why: a worker that read a fetch while its broker was frozen holds a checkpoint of those records that can
store nothing until the broker answers again (it first waits for the broker's acknowledgement of the
sightings the records produced; then rows, detector state, acknowledgement). Once the broker continues,
during the stop, that checkpoint stores the rows while the stop runs its last commit: whether the commit
comes before the checkpoint acknowledges the records (stored, not committed, not counted as lost) or after
(stored and committed) is decided in milliseconds inside the stop. Both outcomes are right; only the first
exercises the count of what was stored but not committed, and no signal the test can wait on, with the
broker frozen, decides it (nothing can be stored while it is frozen). So here, two waits on events:

1. the consumer's last commit (its ``on_stop``) waits until every checkpoint of input records under way has
   stored its rows (:meth:`Checkpoint.rows_stored`) or ended;
2. a detector-state write of a stopping worker waits until the consumer has stopped (its last commit, and
   its commit timer, are over), so the checkpoint acknowledges its records, if at all, when nothing can
   commit them any more.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Coroutine
from typing import Any

from synthwatch.settings import Settings
from synthwatch.stream_apps.runtime.checkpoints import Checkpoint
from synthwatch.stream_apps.runtime.state_tables import StateTables
from synthwatch.stream_apps.runtime.transport import Consumer

log = logging.getLogger(__name__)

#: What it logs once a checkpoint of input records is under way (the test waits for it, broker frozen).
UNDER_WAY = "checkpoint under way with input records:"

#: Per checkpoint of input records under way: set once its rows are stored or it ended.
_UNDER_WAY: dict[asyncio.Future[None], asyncio.Event] = {}
#: Set once the consumer has stopped: nothing commits after that.
_CONSUMER_STOPPED = asyncio.Event()


def inject(input_topics: tuple[str, ...]) -> None:
    """Fix the order described in the module docstring, in this process."""
    start, rows_stored, write = Checkpoint.start, Checkpoint.rows_stored, StateTables.write
    on_stop, stop = Consumer.on_stop, Consumer.stop
    noted: dict[int, asyncio.Event] = {}  # per Checkpoint (an agent's), the event of its checkpoint under way

    async def started(self: Checkpoint, write_coro: Coroutine[Any, Any, None]) -> None:
        await start(self, write_coro)
        running = self.running
        if running is not None and any(e.message.topic in input_topics for e in self.writing):
            event = noted[id(self)] = _UNDER_WAY[running] = asyncio.Event()
            running.add_done_callback(lambda _: event.set())
            log.warning("%s %d", UNDER_WAY, len(self.writing))

    def stored(self: Checkpoint) -> None:
        rows_stored(self)
        if id(self) in noted:
            noted[id(self)].set()

    async def last_commit(self: Consumer) -> None:
        for event in list(_UNDER_WAY.values()):
            await event.wait()
        await on_stop(self)

    async def stopped(self: Consumer) -> None:
        await stop(self)
        _CONSUMER_STOPPED.set()

    async def state_write(self: StateTables, table: Any, changes: list[Any]) -> None:
        if self.app.should_stop:
            await _CONSUMER_STOPPED.wait()
        await write(self, table, changes)

    Checkpoint.start = started
    Checkpoint.rows_stored = stored
    Consumer.on_stop = last_commit
    Consumer.stop = stopped
    StateTables.write = state_write


def main() -> None:
    inject(Settings().input_topics)
    sys.argv = ["synthwatch", *sys.argv[1:]]
    from synthwatch.cli.main import main as cli

    cli()


if __name__ == "__main__":
    main()
