"""Faust's aiokafka transport with changes to its consumer (everything else is Faust's own driver).

1. ``fetch_max_wait_ms`` from the app instead of Faust's fixed 1.5 s. A broker may hold a fetch
   until that wait ends when less than ``fetch_min_bytes`` is there; Tansu (the embedded broker)
   answers a waiting fetch only when the wait ends, not when data arrives. Every hop of the
   pipeline (input topics, then sightings) cost up to 1.5 s of alert latency at a low rate.
2. Handing a fetched message to the conductor without four asyncio tasks per message. Faust runs
   ``wait_first(callback(message), suspend_flow.wait())`` for every message, which creates tasks for
   the callback, the suspend event and the service's stopped and crashed events, then
   ``asyncio.wait``. The callback almost always completes without waiting (it puts the event on a
   channel queue that has room), so it is first run directly; only a callback that has to wait
   (a full queue, flow control) is finished under ``wait_first`` as Faust does.
3. Recovery stops the flow before it resumes the stream partitions and seeks them to their committed
   offsets (:class:`Recovery`). Faust does that only when a rebalance revokes partitions; on the first
   rebalance of a fresh process (nothing to revoke) the fetcher, running for the changelogs, delivered
   stream records into the agents' queues during the seek, and ``flow_control.resume()`` then cleared
   those queues: events dropped after their offsets were fetched, never fetched again. Either the
   committed offsets stopped for good (a silent stall) or a later record opened a gap that Faust counts
   as acknowledged (events lost). Issue 11 has the diagnosis; docs/performance.md the runs before and
   after.
4. No commit past an event still being processed (:meth:`Consumer._filter_committable_offsets`).
   Faust commits the run of acknowledged offsets after the committed one, and tolerates a gap of
   exactly one offset at its head (faust-streaming issue 606, open): with offset C in flight and C+1,
   C+2 acknowledged it commits C+3, and a worker that dies before C is done never processes C again.
   The delivery agent acknowledges each alert when its deliveries are final, so a slow receiver's
   alert at C was committed past by the next alerts' quick deliveries: after a crash, that officer
   never got it. On a never-committed partition Faust does not look at the head at all.
5. The offsets acknowledged (checkpointed: stored), or whose rows are stored by a checkpoint not finished
   yet (:func:`note_stored`), and not committed to the broker yet, per partition
   (:attr:`Consumer.stored`, :func:`stored_uncommitted`). A worker stopped while its broker is unwell
   (frozen, gone) stores what it had fetched but cannot commit it; ``synthwatch up`` counts what is not
   stored from the group's lag once the worker is down, and without these it counted stored records as
   lost. Faust's own ``_acked`` cannot say: a commit takes its offsets out whether or not it succeeds.
   Rows written in a thread are marked stored by that thread (:class:`RowsBeingStored`): a stop that
   cancels the coroutine waiting for the write does not stop the write.
   A revoke keeps a partition's noted offsets on purpose: they say what is in ClickHouse, whoever owns the
   partition now, and nothing commits from them; the count takes only those at or above the group's committed
   offset, and the seek drops the ones below it when the partition comes back.
6. No acknowledgement, from the start of a revoke until the next assignment, of anything fetched before it
   (:attr:`Consumer.revoking`, :func:`revoked`). The revoke forgets the detector state that events held for
   their checkpoint had changed (dirty records, spike alerts waiting in outboxes), and Faust drops its committed
   offset for every revoked partition; the consumer generation, though, changes only with the new assignment
   (seconds later with Tansu). A checkpoint finishing meanwhile acknowledged those events, and Faust committed
   them, in the rebalance (aiokafka still lists the partition; a broker takes a commit from a member of the
   generation) or once the partition came back: events whose detector state and spike alerts were never
   written, never read again. Refused, they are read again from the committed offset by the next owner.
   For the same reason a checkpoint writes the detector state it drained, and sends its outbox, only if no
   revoke began since (:attr:`Consumer.revocations`) and none was under way as it drained (:func:`drain_mark`:
   the revoke forgets the state only after Faust's own steps, such as the producer's flush): written later,
   during or after the rebalance, it could land in the changelog after the next owner's records of the same keys.
   And a revoke that begins while such a write is under way (checked, then sending records and awaiting their
   acknowledgements, its seal and spike alerts: :func:`state_write`, :class:`StateWrite`) waits for it before
   anything else, Faust's producer flush and the forgetting included, so its records are in the changelog
   before the worker rejoins the group. The wait is bounded (:attr:`Consumer.state_write_wait`, by default half
   the broker session timeout: 2 s; a write takes milliseconds to ~0.2 s): past it, a broker that does not
   answer, the revoke goes on, logs an error and abandons the writes, which send nothing more (no further
   record, no seal: recovery reads an unsealed write's prefix, as after a kill; no spike alert); what they had
   sent is flushed by Faust's revoke, but a record the broker takes only after that can still land after the
   next owner's. ClickHouse is never waited for: rows are stored before a write registers. The order holds only
   if the broker completes the new assignment after this worker rejoins (Kafka waits for every member up to the
   rebalance timeout); that Tansu does for a worker still in its revoke was not measured.

docs/performance.md has the measurements.
"""

from __future__ import annotations

import asyncio
import logging
import types
from collections.abc import Awaitable, Callable, Coroutine, Generator, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ClassVar, cast

import aiokafka
import faust
from faust.app import base as faust_app_base
from faust.tables import TableManager as FaustTableManager
from faust.tables.recovery import Recovery as FaustRecovery
from faust.transport import consumer as faust_consumer
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import AppT, TransportT
from faust.utils import venusian as faust_venusian
from mode import SupervisorStrategyT

from synthwatch.kafka_clients import faust_credentials
from synthwatch.settings import Settings

log = logging.getLogger(__name__)


class ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    """Faust's consumer thread, with the app's ``fetch_max_wait_ms`` on the consumer it creates."""

    fetch_max_wait_ms: ClassVar[int] = 1500

    def _create_worker_consumer(self, transport: Any) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        # aiokafka keeps the constructor argument here and hands it to its Fetcher in start().
        if not hasattr(consumer, "_fetch_max_wait_ms"):
            raise RuntimeError("aiokafka changed: AIOKafkaConsumer._fetch_max_wait_ms is gone")
        consumer._fetch_max_wait_ms = getattr(self.app, "fetch_max_wait_ms", self.fetch_max_wait_ms)
        return consumer

    def verify_event_path(self, now: float, tp: Any) -> None:
        """Faust's livelock check, skipped for a partition that has no fetch position (yet, or any more).

        Why: Faust reads aiokafka's ``position`` without asking ``has_valid_position``; right after a
        seek to the beginning (:meth:`Consumer.perform_seek`, never-committed partitions) it is None until
        the reset is fetched, and the AssertionError crashed the consumer and so the worker (seen in the
        burst test under load, after a watchdog seek-back). Looking first is not enough: the check runs on
        the event loop's thread while the seek (and a revoke) run in this consumer thread, so the position
        can go between the look and Faust's read (seen under load: the worker crashed on that
        AssertionError 0.07 s after the seek's log line). Nor is looking again after the error: the position
        can come back just as fast (the reset fetched, the partition assigned again). So a check that Faust's
        read of that state fails is skipped, with a warning; the check only logs, and the next one, a few
        seconds on, looks again.
        """
        if not _fetch_position_known(self, tp):
            return None
        try:
            return cast(None, faust_aiokafka.AIOKafkaConsumerThread.verify_event_path(self, now, tp))
        except (AssertionError, AttributeError) as error:  # position gone (reset), partition gone (revoked)
            log.warning(
                "Livelock check of %s:%s skipped: its fetch state changed while the check read it (%r); "
                "the next check looks again.",
                tp.topic,
                tp.partition,
                error,
            )
            return None


def _fetch_position_known(thread: Any, tp: Any) -> bool:
    """Whether aiokafka has a fetch position for ``tp`` now: assigned, and not awaiting a reset."""
    subscription = thread._ensure_consumer()._fetcher._subscriptions.subscription
    assignment = subscription.assignment if subscription is not None else None
    state = assignment.state_value(aiokafka.TopicPartition(tp.topic, tp.partition)) if assignment else None
    return state is not None and bool(state.has_valid_position)


@types.coroutine
def _resumed(coro: Coroutine[Any, Any, Any], yielded: Any) -> Generator[Any, Any, Any]:
    """Go on driving ``coro``, which was started by hand and has just yielded ``yielded`` (``yield from``
    would start it again). The task that awaits this receives what ``coro`` yields and sends back."""
    while True:
        try:
            sent = yield yielded
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as error:  # thrown in (a cancellation): hand it on
            try:
                yielded = coro.throw(error)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                yielded = coro.send(sent)
            except StopIteration as stop:
                return stop.value


async def _finish(coro: Coroutine[Any, Any, Any], yielded: Any) -> Any:
    """:func:`_resumed` as a coroutine object (``wait_first`` takes awaitables, not generators)."""
    return await _resumed(coro, yielded)


class Consumer(faust_aiokafka.Consumer):
    #: Per partition, the lowest offset still in flight, during one :meth:`_filter_committable_offsets`.
    _in_flight: dict[Any, int] = {}  # noqa: RUF012 (replaced, never mutated, per instance)
    #: Seeks so far (:meth:`perform_seek`); the drain loop drops what it fetched before the latest one.
    seeks: int = 0
    #: Per partition, the offset of the last record handed to the agents since the latest seek. Faust's own
    #: read offset cannot say: a seek sets it to the committed offset, the next record *to* read.
    handed: dict[Any, int]
    #: True while the drain loop hands the records of one fetch to the agents (they come one ``deliver`` at a
    #: time, with a loop turn every 100): an agent's batch lingers for the rest of that fetch, not longer
    #: (:func:`.batches.channel_batches`).
    delivering: bool = False
    #: Per topic, batches the agents reading it have taken or finished (:func:`.batches.channel_batches`): it moves
    #: while they work, however long their records wait in a queue or a checkpoint; it stops when they hang. The
    #: watchdog's sign that records handed over to them are being worked through (:mod:`.watchdog`).
    worked: dict[str, int]
    #: Per topic, checkpoints its agents have completed (:class:`.checkpoints.Checkpoint`): a record an agent took
    #: is acknowledged at the latest by the second checkpoint that completes after it was taken, so a record at
    #: the committed offset still in hand after two of them was leaked, not waiting (:mod:`.watchdog`).
    checkpoints: dict[str, int]
    #: Per partition, the offsets acknowledged (their checkpoint is done: stored) that no successful commit
    #: has covered yet (item 5 above). Kept across a restart of the consumer: stored stays stored.
    stored: dict[Any, set[int]]
    #: Checkpoints' rows being written in a thread (:func:`rows_being_stored`), until their coroutine notes them.
    writes: list[RowsBeingStored]

    #: True from the start of a revoke until the next assignment (item 6). A consumer generation, to the worker,
    #: ends when its partitions are revoked: Faust changes ``consumer_generation_id`` only with the new assignment.
    revoking: bool = False
    #: Revokes so far: a checkpoint writes the detector state it drained only if none began since (item 6).
    revocations: int = 0
    #: Checkpoints writing detector state (and sending its spike alerts) now (:func:`state_write`): a revoke waits
    #: for them before Faust's steps and before the worker forgets the state (item 6).
    state_writes: set[StateWrite]
    #: Longest a revoke waits for them, in seconds; None: half the app's broker session timeout (item 6).
    state_write_wait: float | None = None

    async def on_partitions_revoked(self, revoked: Any) -> None:
        """Faust's revoke (it drops its acknowledged offsets and committed offset of every revoked partition,
        flushes the producer, then runs the app's callbacks: the worker forgets its detector state), with
        acknowledgements refused from its start until the next assignment, and begun only once the checkpoints
        writing detector state have finished (or the bound passed: :meth:`wait_for_state_writes`), item 6."""
        self.revoking = True
        self.revocations += 1
        await self.wait_for_state_writes()
        await super().on_partitions_revoked(revoked)

    async def wait_for_state_writes(self) -> None:
        """Wait for the checkpoints writing detector state when a revoke began, up to :attr:`state_write_wait`.

        Why: such a write checked that no revoke had begun (:func:`state_write`) and then sends records and awaits
        their acknowledgements; had the revoke gone on, the state would be forgotten and the partition handed over
        while the write's records still landed in the changelog, after the next owner's records of the same keys
        perhaps. Waited for, every record it sent is acknowledged (or left to Faust's producer flush, next) before
        the worker rejoins the group. Past the bound (a broker that does not answer; ClickHouse is not waited on:
        rows are stored before a write registers) the revoke goes on and the writes are abandoned: they send
        nothing more (no further record, no seal, no spike alert), and what they had sent is flushed by Faust's
        revoke like any record; a record the broker takes only after that can still land late. Logged.
        """
        writes = [write for write in self.state_writes if not write.finished.done()]
        if not writes:
            return
        bound = self.state_write_wait
        if bound is None:  # Tansu holds a JoinGroup about this long: a worker back by then is in the new generation
            bound = float(self.app.conf.broker_session_timeout) / 2
        _, late = await asyncio.wait([write.finished for write in writes], timeout=bound)
        if late:
            for write in writes:
                if not write.finished.done():
                    write.abandoned = True
            log.error(
                "revoke: %d checkpoint write(s) of detector state unfinished after %.1f s (broker not answering?); "
                "going on without them: they send nothing more, and a record of theirs the broker takes after the "
                "producer's flush can land in the changelog after the next owner's",
                len(late),
                bound,
            )

    async def on_partitions_assigned(self, assigned: Any, generation_id: int = 0) -> None:
        """Faust's assignment; what is fetched from here on, in the new generation, may be acknowledged again."""
        self.revoking = False
        await super().on_partitions_assigned(assigned, generation_id)

    def _reset_state(self) -> None:
        super()._reset_state()  # at construction and on a restart of the consumer, as Faust's own state
        self.handed = {}
        if not hasattr(self, "stored"):
            self.worked = {}
            self.checkpoints = {}
            self.stored = {}
            self.writes = []
            self.state_writes = set()

    def ack(self, message: Any) -> bool:
        """Faust's ack, refused for a message fetched before the latest rebalance began (item 6); an offset it
        counts is noted as stored until a commit covers it (item 5)."""
        if message.generation_id != self.app.consumer_generation_id or self.revoking:
            return False
        counted = cast(bool, super().ack(message))
        if counted:
            self.stored.setdefault(message.tp, set()).add(message.offset)
        return counted

    async def _commit(self, offsets: Mapping[Any, int]) -> bool:
        """Faust's commit; on success, what it covers no longer needs noting as stored-not-committed.

        Only partitions still assigned: the commit leaves out the others (Faust's driver), so their
        offsets stay noted.
        """
        committed = cast(bool, await super()._commit(offsets))
        if committed:
            assigned = self.assignment()
            for tp, offset in offsets.items():
                noted = self.stored.get(tp)
                if noted and tp in assigned:
                    noted.difference_update([o for o in noted if o < offset])
        return committed

    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def perform_seek(self) -> None:
        """Faust's seek to the committed offsets, and to the start for stream partitions that have none.

        aiokafka seeks only partitions whose committed offset is above 0 (``AIOKafkaConsumer.seek_to_committed``):
        one never committed keeps its fetch position, past the records that the flow-control queues held and
        clear when flow resumes, so those records were never fetched again (the rejects shortfall after a kill:
        a sparse topic is often uncommitted when Tansu's second rebalance clears the queues; and the watchdog's
        seek-back). Such partitions start over from the beginning, where ``auto_offset_reset='earliest'`` put
        them: what was already stored is skipped by id, nothing is lost. Changelogs are recovery's business.
        """
        self.seeks += 1  # before the seek: what the drain loop holds from an earlier fetch is stale from here on
        self.handed = {}
        await super().perform_seek()
        for tp, committed in self._committed_offset.items():  # the group's, as the seek learnt it
            noted = self.stored.get(tp)
            if noted and committed:  # below it they count for nothing (stored_uncommitted): a partition back
                noted.difference_update([o for o in noted if o < committed])  # from another worker, mostly
        changelogs = set(self.app.tables.changelog_topics)
        fresh = sorted(
            tp for tp in self.assignment() if tp.topic not in changelogs and not self._committed_offset.get(tp)
        )
        if fresh:
            self.log.info("Seek %d never-committed stream partitions to their beginning.", len(fresh))
            await self._thread.seek_to_beginning(*(aiokafka.TopicPartition(tp.topic, tp.partition) for tp in fresh))

    def _filter_committable_offsets(self, tps: Any) -> dict[Any, int]:
        """Faust's committable offsets, each capped below the lowest event of its partition still in flight
        (tracked, not acknowledged, of this consumer generation): item 4 above."""
        self._in_flight = unacked_heads(self._unacked_messages, self._committed_offset, self.app.consumer_generation_id)
        try:
            return cast(dict[Any, int], super()._filter_committable_offsets(tps))
        finally:
            self._in_flight = {}

    def _new_offset(self, tp: Any) -> int | None:
        """Faust's new offset for ``tp`` from the acknowledged offsets below its in-flight head only.

        The ones above the head are set aside for the call and kept (Faust's ``_new_offset`` removes
        what it returns from its list): they are committed once the head is acknowledged. So the run
        below the head is committed now and nothing passes the head.
        """
        head = self._in_flight.get(tp)
        acked = self._acked[tp]
        if head is None or not acked or max(acked) < head:
            return cast(int | None, super()._new_offset(tp))
        above = [offset for offset in acked if offset > head]
        acked[:] = [offset for offset in acked if offset <= head]  # the head itself: acked by a copy fetched again
        try:
            return cast(int | None, super()._new_offset(tp)) if acked else None
        finally:
            acked.extend(above)

    async def deliver(self, callback: Callable[[Any], Awaitable[Any]], message: Any) -> None:
        """``callback(message)`` run directly; only if it has to wait, finished as Faust does."""
        if self.suspend_flow.is_set():
            await self.wait_first(callback(message), self.suspend_flow.wait())
            return
        coro = cast(Coroutine[Any, Any, Any], callback(message))  # the conductor's on_message, an async def
        try:
            yielded = coro.send(None)
        except StopIteration:
            return
        await self.wait_first(_finish(coro, yielded), self.suspend_flow.wait())

    async def _drain_messages(self, fetcher: Any) -> None:  # pragma: no cover - Faust's loop, one call changed
        # faust/transport/consumer.py Consumer._drain_messages (faust-streaming 0.15.x); two changes:
        # ``await deliver(callback, message)`` instead of ``await self.wait_first(callback(message),
        # self.suspend_flow.wait())``; and the rest of a fetch is dropped once a seek has happened since it
        # was fetched. Faust went on delivering it: after a seek back to the committed offset C, a leftover
        # record at C+k made Faust count C+1..C+k-1 as a gap (acknowledged, committed) and skip the records
        # fetched again below its read offset, so k events were lost with committed = end (a watchdog
        # seek-back under a burst lost 67 of 200,000). The seek has put the fetch position back: the
        # dropped records are fetched again. A seek during the fetch itself leaves it unknown which side
        # of the seek the records are from (dropping records fetched after it stalled every partition of
        # a restarted worker): that case seeks again. A seek that begins and ends while a record is in hand
        # (during the inline commit) is checked again right before the hand-over: that record is stale too.
        callback = self.callback
        deliver = self.deliver
        getmany = self.getmany
        consumer_should_stop = self._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set
        get_read_offset = self._read_offset.__getitem__
        set_read_offset = self._read_offset.__setitem__
        flag_consumer_fetching = faust_consumer.CONSUMER_FETCHING
        set_flag = self.diag.set_flag
        unset_flag = self.diag.unset_flag
        commit_every = self._commit_every
        acks_enabled_for = self.app.topics.acks_enabled_for
        yield_every = 100
        num_since_yield = 0
        sleep = asyncio.sleep
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                set_flag(flag_consumer_fetching)
                seeks = self.seeks
                first = True
                ait = cast(Any, getmany(timeout=1.0))
                await self.sleep(0)
                if not self.should_stop:
                    async for tp, message in ait:
                        if self.seeks != seeks:
                            await ait.aclose()
                            if first:
                                # A seek landed while this fetch was under way: its records may come from
                                # before or after it, and dropping records fetched after it would skip
                                # them for good. Seek again: whatever follows the committed offsets comes
                                # again (duplicates are skipped by event id).
                                try:
                                    await self.perform_seek()
                                except Exception as error:  # as Faust's getmany: a rebalance seeks anyway
                                    self.log.warning("seek again after a seek during a fetch failed: %r", error)
                            # Else fetched before a seek that came during delivery: stale, fetched again.
                            break
                        first = False
                        self.delivering = True
                        num_since_yield += 1
                        if num_since_yield > yield_every:
                            await sleep(0)
                            num_since_yield = 0
                        offset = message.offset
                        r_offset = get_read_offset(tp)
                        if r_offset is None or offset >= r_offset:
                            gap = offset - (r_offset or 0)
                            if gap > 1 and r_offset and acks_enabled_for(message.topic):
                                await self._add_gap(tp, r_offset + 1, offset)
                            if commit_every is not None and self._n_acked >= commit_every:
                                self._n_acked = 0
                                await self.commit()
                            if self.seeks != seeks:
                                # Sought during the awaits above (the commit flushes the producer and may
                                # wait for the timer's commit: a whole watchdog seek-back fits in it): this
                                # record was fetched before the seek, and handed over now it would land in
                                # the queues the seek has just cleared, ahead of the records fetched again
                                # from the committed offset (the region stage then takes those for replays
                                # and skips them: events lost). Fetched again from the committed offset.
                                await ait.aclose()
                                break
                            await deliver(callback, message)
                            if self.seeks != seeks:  # sought while it was delivered: its read offset is the seek's
                                await ait.aclose()
                                break
                            set_read_offset(tp, offset)
                            self.handed[tp] = offset
                    self.delivering = False
                    unset_flag(flag_consumer_fetching)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                self.log.info("Broker stopped consumer, shutting down...")
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                self.log.info("Consumer shutting down for user cancel.")
                return
            raise
        except Exception as exc:
            self.log.exception("Drain messages raised: %r", exc)
            raise
        finally:
            self.delivering = False
            unset_flag(flag_consumer_fetching)


def revoked(app: Any, message: Any) -> bool:
    """Whether ``message`` was fetched before the latest rebalance began: its partition was revoked then, and
    whatever the worker does with it from there on may not be acknowledged nor applied to detector state (item 6).
    """
    if message.generation_id != app.consumer_generation_id:
        return True
    return bool(getattr(app.consumer, "revoking", False))  # False: not this transport's consumer (a test's app)


def revocations(app: Any) -> int:
    """Revokes so far (item 6); 0 for another consumer (a test's own app)."""
    return int(getattr(app.consumer, "revocations", 0))


def drain_mark(app: Any) -> int | None:
    """What a checkpoint notes as it drains detector state, for :func:`still_current` when it writes it (item 6).

    None while a revoke is under way: the state drained then was the revoked partitions' too (the revoke forgets
    it only after Faust's own steps, e.g. the producer's flush), so it must not be written after the rebalance.
    """
    return None if getattr(app.consumer, "revoking", False) else revocations(app)


def still_current(app: Any, mark: int | None) -> bool:
    """Whether state drained at ``mark`` may be written now: drained outside a revoke and no revoke began since."""
    return mark is not None and revocations(app) == mark


class StateWrite:
    """A checkpoint's write of the detector state it drained and of the spike alerts that state holds, from the
    check that no revoke began since the drain to its end; a revoke waits for it (item 6). Use it as a context
    manager: leaving it (done, failed or cancelled) lets the revoke go on."""

    def __init__(self, registry: set[StateWrite] | None) -> None:
        self.registry = registry
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        #: Set by a revoke that stopped waiting for this write (:meth:`Consumer.wait_for_state_writes`).
        self.abandoned = False

    def __enter__(self) -> StateWrite:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.finished.done():
            self.finished.set_result(None)
        if self.registry is not None:
            self.registry.discard(self)


def state_write(app: Any, mark: int | None) -> StateWrite | None:
    """A :class:`StateWrite` for state drained at ``mark``, that a revoke beginning from now on waits for; None if
    it may not be written (:func:`still_current`).

    Why: checked and registered in one step (no await between), so a revoke either began before (nothing is
    written) or waits for the write to end before it forgets the state and the partition moves on.
    """
    if not still_current(app, mark):
        return None
    registry: set[StateWrite] | None = getattr(app.consumer, "state_writes", None)  # None: a test's own app
    write = StateWrite(registry)
    if registry is not None:
        registry.add(write)
    return write


class RowsBeingStored:
    """The messages of a checkpoint whose rows a thread is writing to ClickHouse (item 5).

    Why: the coroutine that waits for the thread notes the messages as stored once the write returns
    (:func:`note_stored`), but a stop cancels the tasks still running (a second after the worker's services
    stopped) and cannot stop the thread: its rows were stored and never noted, so the count of what the stop
    lost called them lost. The thread calls :meth:`done` itself as soon as they are in ClickHouse; it only
    sets a flag, read once the threads have ended (:func:`stored_uncommitted`).
    """

    def __init__(self, messages: Iterable[Any]) -> None:
        self.messages = list(messages)
        self.stored = False

    def done(self) -> None:
        """The rows are in ClickHouse (called in the writing thread)."""
        self.stored = True


def rows_being_stored(consumer: Any, messages: Iterable[Any]) -> RowsBeingStored:
    """A :class:`RowsBeingStored` for ``messages``, kept by ``consumer`` until :func:`note_stored` takes it back."""
    rows = RowsBeingStored(messages)
    writes: list[RowsBeingStored] | None = getattr(consumer, "writes", None)
    if writes is not None:  # else not this transport's consumer (a test's own app): nothing counts on it
        writes.append(rows)
    return rows


def note_stored(consumer: Any, messages: Iterable[Any], rows: RowsBeingStored | None = None) -> None:
    """Note ``messages`` as stored (their records are in ClickHouse) though not acknowledged yet (item 5);
    ``rows``, the thread's record of the same write, is not needed any more."""
    noted: dict[Any, set[int]] | None = getattr(consumer, "stored", None)
    if noted is None:  # not this transport's consumer (a test's own app): nothing counts on it
        return
    for message in messages:
        noted.setdefault(message.tp, set()).add(message.offset)
    writes: list[RowsBeingStored] = getattr(consumer, "writes", [])
    if rows is not None and rows in writes:
        writes.remove(rows)


def stored_uncommitted(consumer: Any) -> dict[tuple[str, int], frozenset[int]]:
    """Per (topic, partition): the offsets ``consumer`` stored that no successful commit covers (item 5),
    with those of rows a thread wrote whose coroutine did not note them (:class:`RowsBeingStored`).

    For the count of what a stopped worker left unstored: the group's lag minus these. Read it once the
    threads that write rows have ended.
    """
    noted: dict[Any, set[int]] = getattr(consumer, "stored", {})
    found: dict[tuple[str, int], set[int]] = {}
    for tp, offsets in list(noted.items()):
        found.setdefault((tp.topic, tp.partition), set()).update(offsets)
    for rows in list(getattr(consumer, "writes", [])):
        if rows.stored:
            for message in rows.messages:
                found.setdefault((message.tp.topic, message.tp.partition), set()).add(message.offset)
    return {key: frozenset(offsets) for key, offsets in found.items() if offsets}


def unacked_heads(
    messages: Iterable[Any], committed: Mapping[Any, int | None], generation: int | None = None
) -> dict[Any, int]:
    """Per partition, the lowest offset of a tracked event not acknowledged yet, at or above the committed
    offset. Events below it, or of an earlier consumer generation (fetched before a rebalance: the new
    assignment fetches them again from the committed offset and tracks its own), hold nothing."""
    heads: dict[Any, int] = {}
    for message in list(messages):  # a WeakSet: an event dropped meanwhile leaves it
        if message.acked or (generation is not None and message.generation_id != generation):
            continue
        tp, offset = message.tp, message.offset
        floor = committed.get(tp)
        if floor is not None and offset < floor:
            continue
        if offset < heads.get(tp, offset + 1):
            heads[tp] = offset
    return heads


class Transport(faust_aiokafka.Transport):
    Consumer = Consumer


def stop_flow(app: AppT) -> None:
    """Stop fetched records from reaching the agents, as Faust does before a rebalance.

    The consumer's flow: a fetch under way is abandoned, the record being handed over is not delivered
    (``Consumer.deliver`` gives up when ``suspend_flow`` is set), no new fetch starts. Flow control:
    nothing more is put in the agents' queues. Both resume with ``flow_control.resume()`` (which clears
    the queues) and ``consumer.resume_flow()``, after the partitions have been sought to their committed
    offsets, so whatever was fetched, delivered or cleared meanwhile is fetched again from there.
    """
    app.consumer.stop_flow()
    app.flow_control.suspend()


class Recovery(FaustRecovery):
    """Faust's table recovery, with the flow stopped before the stream partitions are resumed and sought,
    and the app's ``after_recovery`` hooks run once the tables hold the partitions assigned."""

    async def on_recovery_completed(self, generation_id: int = 0) -> None:
        stop_flow(self.app)
        await super().on_recovery_completed(generation_id)
        self._after_recovery(generation_id)

    async def _resume_streams(self, generation_id: int = 0) -> None:
        stop_flow(self.app)
        await super()._resume_streams(generation_id)
        self._after_recovery(generation_id)

    def _after_recovery(self, generation_id: int) -> None:
        """Start the hooks in the background (recovery does not wait for them), unless a newer
        rebalance has begun: its own recovery will run them."""
        if self.app.consumer_generation_id != generation_id:
            return
        for hook in getattr(self.app, "after_recovery", ()):
            task = asyncio.ensure_future(hook())
            _hooks.add(task)
            task.add_done_callback(_hook_done)


_hooks: set[asyncio.Future[None]] = set()  # running after-recovery hooks (a task needs a reference to live)


def _hook_done(task: asyncio.Future[None]) -> None:
    _hooks.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.error("after-recovery hook failed: %r", task.exception())


class TableManager(FaustTableManager):
    """Faust's table manager, with :class:`Recovery`, and without the second it sleeps when it starts.

    Faust sleeps 1 s before it registers the tables' changelog channels, for tables defined while the
    worker starts; the conductor subscribes only after that, so every start-up waited 1 s before its
    group join. The worker's tables are all defined when the app is built (``create_app``), before it
    starts, and Faust refuses a table added later (``TableManager.add``), so nothing is missed.
    """

    async def on_start(self) -> None:
        # faust/tables/manager.py TableManager.on_start (faust-streaming 0.15.x) without ``await self.sleep(1.0)``
        if not self.should_stop:
            await self._update_channels()
            await self.recovery.start()

    @property
    def recovery(self) -> FaustRecovery:
        if self._recovery is None:
            self._recovery = Recovery(self.app, self, beacon=self.beacon, loop=self.loop)
        return self._recovery


async def seek_to_committed(app: AppT) -> None:
    """Seek every assigned partition back to its committed offset, as recovery does: flow stopped, seek,
    flow resumed (queues cleared: what they held is fetched again from the committed offsets)."""
    stop_flow(app)
    try:
        await app.consumer.perform_seek()
    finally:
        app.flow_control.resume()
        app.consumer.resume_flow()


class App(faust.App):
    """``faust.App`` with ``fetch_max_wait_ms`` (milliseconds) for its worker consumer."""

    def __init__(self, *args: Any, fetch_max_wait_ms: int = 1500, **kwargs: Any) -> None:
        self.fetch_max_wait_ms = fetch_max_wait_ms
        #: Run after every recovery once the tables hold the assigned partitions (:class:`Recovery`).
        self.after_recovery: list[Callable[[], Awaitable[None]]] = []
        kwargs.setdefault("TableManager", TableManager)
        super().__init__(*args, **kwargs)

    def _new_transport(self) -> TransportT:
        return Transport(self.conf.broker_consumer, self)


class _NoDiscoveryMarks:
    """Stands in for Faust's venusian module while an app is built: marks nothing (see :func:`unmarked`)."""

    @staticmethod
    def attach(*args: Any, **kwargs: Any) -> None:
        return None


@contextmanager
def unmarked(app: faust.App) -> Iterator[faust.App]:
    """Build ``app``'s agents, tasks, timers and views without Faust's marks for autodiscovery.

    Why: each of Faust's decorators (``app.agent``, ``app.task``, ``app.page``, ...) marks the function for
    venusian, which ``app.discover()`` scans to import the modules of a project; the mark reads the caller's
    source through ``inspect``, whose first call maps every loaded module to its file: ~25 ms of CPU on a
    worker's path to its group join (in ``create_app``, or else when Faust's web server adds its own views
    as the worker starts: the worker runs under this too). The worker's app is built by calls, never
    discovered (``autodiscover`` off, refused here otherwise), so the marks were never read. Not
    thread-safe: Faust's decorators used in another thread meanwhile would not mark either.
    """
    if cast(Any, app.conf).autodiscover:
        raise ValueError("an app that autodiscovers needs Faust's venusian marks")
    faust_app_base.venusian = _NoDiscoveryMarks  # type: ignore[assignment]
    try:
        yield app
    finally:
        faust_app_base.venusian = faust_venusian


def worker_app(
    settings: Settings, bootstrap_servers: str, web_port: int, agent_supervisor: type[SupervisorStrategyT] | None = None
) -> App:
    """The worker's Faust app, configured from the settings (no module-level app: tests build several).

    ``agent_supervisor``: what an agent that raises does to the worker (:mod:`.supervision`); None: Faust's
    default, which restarts the agent in place.
    """
    return App(
        settings.app_id,
        agent_supervisor=agent_supervisor,
        fetch_max_wait_ms=settings.consumer_fetch_max_wait_ms,
        stream_buffer_maxsize=settings.stream_buffer_maxsize,
        broker_max_poll_records=settings.consumer_max_poll_records,
        consumer_max_fetch_size=settings.consumer_partition_fetch_bytes,
        producer_max_batch_size=settings.producer_batch_bytes,
        producer_linger=settings.producer_linger_ms / 1000,
        broker=[f"kafka://{server.strip()}" for server in bootstrap_servers.split(",")],
        broker_credentials=faust_credentials(settings),  # SASL_SSL / mTLS from SYNTHWATCH_KAFKA_*
        store="memory://",
        datadir=str(settings.data_dir / "faust"),
        web_host=settings.web_host,
        web_bind=settings.web_host,
        web_port=web_port,
        # Faust's own views list table contents (/table/...: event ids, unauthenticated) and the
        # partition routing (/router/); the debug ones show the graph and stats. None is served.
        web_router_enabled=False,
        web_tables_enabled=False,
        web_graph_enabled=False,
        web_stats_enabled=False,
        web_metrics_enabled=False,
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        consumer_auto_offset_reset="earliest",
        # Start-up: Tansu completes a group join after about half the session timeout; the default
        # 60 s session made the worker take ~30 s to become ready.
        broker_session_timeout=settings.broker_session_timeout,
        broker_heartbeat_interval=min(1.0, settings.broker_session_timeout / 4),
        broker_commit_interval=1.0,
        stream_wait_empty=False,
        producer_acks=-1,
    )
