"""What a worker keeps of partitions a rebalance revokes: nothing it may acknowledge or commit for them once the
revoke has begun (the revoke forgets the detector state their events changed), and its stored-not-committed
offsets only as facts about ClickHouse, never as a reason to commit.

Faust's own consumer, app and rebalance callbacks, with the broker's side (the commit request, the seek's
committed offsets) stubbed; the checkpoint is the worker's own (:mod:`.checkpoints`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from faust.events import Event
from faust.types import TP
from faust.types.tuples import ConsumerMessage

from synthwatch.settings import Settings
from synthwatch.stack.broker import unstored
from synthwatch.stream_apps.runtime.checkpoints import Checkpoint
from synthwatch.stream_apps.runtime.state_tables import SEAL_KEY as SEAL
from synthwatch.stream_apps.runtime.transport import note_stored, stored_uncommitted, worker_app

TOPIC = "lab-detections"
GENERATION = 3


class _Worker:
    """A worker's app and consumer, built only (nothing connects), holding partition 0 of the input topic at
    committed offset 5 in consumer generation 3; the broker's side of commits and seeks stubbed."""

    def __init__(self, tmp_path: Path) -> None:
        self.app: Any = worker_app(Settings(data_dir=tmp_path), "127.0.0.1:9", 6066)
        self.consumer: Any = self.app.consumer
        self.tp = TP(TOPIC, 0)
        self.assigned = {self.tp}
        self.commits: list[dict[Any, int]] = []  # what reached the broker
        self.group_committed = 5  # the group's committed offset, as the broker would answer a seek
        self.forgotten: list[str] = []
        self.app.consumer_generation_id = GENERATION
        self.app.topics._acking_topics.add(TOPIC)  # as when the intake agent subscribes
        self.consumer.assignment = lambda: set(self.assigned)
        self.consumer._committed_offset[self.tp] = self.group_committed

        async def commit_request(offsets: Any) -> bool:
            self.commits.append(dict(offsets))
            return True

        async def flush() -> None:
            return None

        async def seek_to_committed() -> dict[Any, int]:
            return {tp: self.group_committed for tp in self.assigned}

        async def revoked(revoked: Any) -> None:  # the app's side: the worker forgets its detector state
            self.forgotten.append("detector state")

        async def assigned(assigned: Any, generation_id: int) -> None:  # the app's side: recovery, started
            return None

        # Faust's driver commit: its check of the assignment, then the OffsetCommit request. The request is the
        # broker's side; the worker consumer's own _commit (the stored-offset bookkeeping) still runs around it.
        self.consumer._thread = type("Thread", (), {"commit": staticmethod(commit_request)})()
        self.app.producer.flush = flush
        self.consumer.seek_to_committed = seek_to_committed
        self.consumer._on_partitions_revoked = revoked
        self.consumer._on_partitions_assigned = assigned

    def event(self, offset: int, generation: int = GENERATION) -> Any:
        """An event of the partition as the conductor hands it over and the intake agent tracks it."""
        message = ConsumerMessage(TOPIC, 0, offset, 0.0, 0, None, b"k", b"v", None, generation_id=generation)
        message.tracked = True
        self.consumer._unacked_messages.add(message)
        return Event(self.app, b"k", b"v", None, message)

    async def revoke(self) -> None:
        """A rebalance begins: aiokafka's listener calls Faust's on_rebalance_start, then the consumer's
        on_partitions_revoked (which drops Faust's per-partition state and runs the app's callbacks). aiokafka
        still lists the old assignment until the new one arrives."""
        self.app.on_rebalance_start()
        await self.consumer.on_partitions_revoked(set(self.assigned))

    async def assign_again(self) -> None:
        """The new assignment gives the partition back: new generation, seek to the group's committed offset,
        streams resumed (Faust's recovery ends the rebalance)."""
        self.app.consumer_generation_id = GENERATION + 1  # aiokafka's listener, before the consumer's callback
        await self.consumer.on_partitions_assigned(set(self.assigned), GENERATION + 1)
        await self.consumer.perform_seek()  # recovery, before it resumes the streams
        self.app.on_rebalance_end()


async def _nothing() -> None:
    return None


@pytest.mark.parametrize("partition_back", [False, True], ids=["during the rebalance", "partition back"])
def test_events_held_when_a_rebalance_begins_are_never_acknowledged_or_committed(
    tmp_path: Path, partition_back: bool
) -> None:
    """Events 5 and 6 went through the region stage and wait for their checkpoint when a rebalance begins. The
    revoke forgets the detector state they changed (``forget_state``: dirty records and outboxes dropped, so
    their spike alerts and counts are never written). The checkpoint that then stores their rows ran, before
    this fix, while the consumer generation was still the old one (it changes only with the new assignment,
    seconds later with Tansu): it acknowledged 5 and 6, and Faust, which had dropped its committed offset for
    the partition, committed 7 in the rebalance (aiokafka still lists the partition; a broker accepts a commit
    from a member of the generation), or once the partition came back. Nothing then replayed them: their
    detector state and spike alerts were lost. They must stay unacknowledged: whoever owns the partition next
    reads them again from 5."""
    worker = _Worker(tmp_path)

    async def run() -> list[Any]:
        held = Checkpoint(worker.app, every=0.0, most=100)
        events = [worker.event(5), worker.event(6)]
        held.hold(events, [])
        await worker.revoke()
        assert worker.forgotten == ["detector state"]
        await held.start(_nothing())  # the checkpoint that stores their rows, due in the rebalance
        await held.wait()
        if partition_back:
            await worker.assign_again()
        await worker.consumer.commit()
        return events

    events = asyncio.run(run())
    assert worker.commits == []
    assert [e.message.acked for e in events] == [False, False]


def test_events_of_the_new_assignment_are_acknowledged_and_committed_as_before(tmp_path: Path) -> None:
    """The other side of the rule: once the partition is assigned again and the rebalance has ended, events
    read anew are acknowledged at their checkpoint and committed."""
    worker = _Worker(tmp_path)

    async def run() -> None:
        await worker.revoke()
        await worker.assign_again()
        held = Checkpoint(worker.app, every=0.0, most=100)
        held.hold([worker.event(5, GENERATION + 1), worker.event(6, GENERATION + 1)], [])
        await held.start(_nothing())
        await held.wait()
        await worker.consumer.commit()

    asyncio.run(run())
    assert worker.commits == [{worker.tp: 7}]


def test_stored_offsets_of_a_revoked_partition_stay_count_nothing_below_the_committed_offset_and_go_when_it_returns(
    tmp_path: Path,
) -> None:
    """``Consumer.stored`` notes offsets whose rows are in ClickHouse (item 5 of the transport), for the count of
    what a stopped worker left unstored. A revoke does not drop them, on purpose: they are facts about ClickHouse,
    not about ownership, and nothing commits from them (commits come from Faust's acknowledged offsets, which the
    revoke drops). Dropping them would count stored records as lost when a single worker stops between a revoke
    and the commit of its partitions coming back (Tansu puts a restarted worker through two rebalances). Kept,
    they cannot miscount: the count takes only offsets at or above the group's committed offset, so once another
    worker has committed past them they count nothing. When the partition comes back, the seek learns the
    group's committed offset and the ones below it go (they would otherwise stay for the worker's lifetime)."""
    worker = _Worker(tmp_path)
    events = [worker.event(5), worker.event(6)]
    note_stored(worker.consumer, (e.message for e in events))  # the checkpoint stored their rows

    async def revoke() -> None:
        await worker.revoke()

    asyncio.run(revoke())
    assert stored_uncommitted(worker.consumer) == {(TOPIC, 0): frozenset({5, 6})}
    noted = stored_uncommitted(worker.consumer)[(TOPIC, 0)]
    assert unstored(5, 12, noted) == 5  # nobody committed past them: 7..11 are the ones not stored
    assert unstored(9, 12, noted) == 3  # another worker committed 9: 5 and 6 count nothing

    worker.group_committed = 9

    async def back() -> None:
        await worker.assign_again()

    asyncio.run(back())
    assert stored_uncommitted(worker.consumer) == {}


class _Intake:
    """The intake and novelty agents, wired as ``create_app`` wires them, on a :class:`_Worker` holding partition 0
    of lab detections and of sightings; ClickHouse (``store_events``, the corrections' reads) and the producer's
    broker side stubbed. Every send is recorded with the number of revokes begun before it. The intake agent takes
    its batches from ``batches``, the novelty agent from ``sightings``."""

    def __init__(self, tmp_path: Path, reports: dict[int, dict[str, Any]], store_events: Any = None) -> None:
        import threading
        import time
        from types import SimpleNamespace

        from synthwatch.stream_apps.detect.intake import Intake
        from synthwatch.stream_apps.detect.novelty import NoveltyDetector
        from synthwatch.stream_apps.detect.region import DetectionConfig, RegionDetector
        from synthwatch.stream_apps.runtime.agents import intake as intake_module
        from synthwatch.stream_apps.runtime.agents import novelty as novelty_module
        from synthwatch.stream_apps.runtime.context import AgentContext, Topics, WorkerContext
        from synthwatch.stream_apps.runtime.outbox import SpikeOutbox
        from synthwatch.stream_apps.runtime.recovery import add_recovery
        from synthwatch.stream_apps.runtime.state_tables import StateTables
        from synthwatch.stream_apps.runtime.transport import unmarked
        from synthwatch.stream_apps.runtime.worker_signature import WorkerSigner, settings_worker_keys
        from synthwatch.stream_apps.storage.sink import StoreResult

        self.module = intake_module
        self.settings = settings = Settings(data_dir=tmp_path, checkpoint_seconds=600)  # checkpoints when quiet
        self.config = DetectionConfig.from_settings(settings)
        self.topic = topic = settings.topic_lab_detections
        self.reports = reports
        stored = store_events or (lambda items: StoreResult(lab_detections=len(items)))
        self.ctx = WorkerContext(
            settings=settings,
            client=None,  # type: ignore[arg-type]  # the sink below stands in for ClickHouse
            sink=SimpleNamespace(lock=threading.Lock(), store_events=stored),  # type: ignore[arg-type]
            intake=Intake(),
            regions=RegionDetector(self.config),
            novelty=NoveltyDetector(self.config.novelty),
            started_at=time.monotonic(),
            state_ready=True,
        )
        self.worker = worker = _Worker(tmp_path)
        self.app = app = worker.app
        worker.tp = TP(topic, 0)
        worker.assigned = {worker.tp, TP(settings.topic_sightings, 0)}
        app.topics._acking_topics.update((topic, settings.topic_sightings))
        self.sends: list[tuple[str, int]] = []  # (topic, revokes begun before the send)
        self.batches: Any = None
        self.sightings: Any = None

        async def sent(topic: str, *args: Any, **kwargs: Any) -> Any:  # the producer: acknowledged at once
            self.sends.append((topic, getattr(worker.consumer, "revocations", 0)))
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done

        async def revoked_signal(revoked: Any) -> None:  # the app's side of the revoke: its signal's receivers
            await app.on_partitions_revoked.send(revoked)

        app.producer.send = sent
        worker.consumer._on_partitions_revoked = revoked_signal
        self.checkpoints: list[Checkpoint] = []
        with unmarked(app):
            signer = WorkerSigner(settings_worker_keys(settings))
            self.tables = tables = StateTables.create(app, self.ctx, signer)
            agents = AgentContext(
                self.ctx,
                app,
                Topics.of(app, settings),
                signer,
                lambda stream: self.batches(),
                partition_of=lambda k, n: 0,
            )
            outbox = SpikeOutbox(agents, tables)
            make_checkpoint = agents.checkpoint
            agents.checkpoint = lambda: self.checkpoints.append(make_checkpoint()) or self.checkpoints[-1]  # type: ignore[method-assign]
            intake_module.add_intake_agent(agents, tables, outbox)
            novelty_batches = novelty_module.novelty_batches  # the novelty agent picks its own batching
            novelty_module.novelty_batches = lambda settings: lambda stream: self.sightings()
            try:
                novelty_module.add_novelty_agent(agents, tables)
            finally:
                novelty_module.novelty_batches = novelty_batches
            add_recovery(agents, tables, outbox)  # forget_state: what the revoke does to detector state
        self.signer = signer

    def event(self, offset: int) -> Any:
        import json

        value = json.dumps(self.reports[offset]).encode()
        message = ConsumerMessage(self.topic, 0, offset, 0.0, 0, None, b"FR-75C", value, None, generation_id=GENERATION)
        return Event(self.app, b"FR-75C", value, None, message)

    def sighting(self, offset: int) -> Any:
        """A signed sightings record at ``offset`` of partition 0: a substance never seen, in region FR-75C."""
        import json

        from tests.support.factories import sighting

        topic, key = self.settings.topic_sightings, "NOVELSUBSTANCE"
        raw_key = key.encode()
        value = json.dumps([sighting(event_id=f"l-{offset}", key=key).to_dict()]).encode()
        headers = self.signer.headers(topic, raw_key, value)
        message = ConsumerMessage(topic, 0, offset, 0.0, 0, headers, raw_key, value, None, generation_id=GENERATION)
        return Event(self.app, raw_key, value, None, message)

    def run(self, agent: str = "intake") -> None:
        """``agent`` over its batches (``self.batches()`` or ``self.sightings()``), then its checkpoints' end and
        one commit."""

        async def run() -> None:
            await self.app.agents[agent].fun(None)
            for checkpoint in self.checkpoints:
                await checkpoint.wait()
            await self.worker.consumer.commit()

        asyncio.run(run())

    def replayed(self, offset: int) -> bool:
        """Whether a worker taking the partition over, its state restored from the changelog (the table here),
        takes the report at ``offset`` for a replay."""
        from synthwatch.stream_apps.detect.intake import Intake, RawMessage
        from synthwatch.stream_apps.detect.region import Observation, RegionDetector
        from synthwatch.stream_apps.detect.replay import position_of
        from synthwatch.stream_apps.runtime.state_tables import load_record

        taker = RegionDetector(self.config, fetch=lambda key: load_record(self.tables.regions.data, key))
        raw = RawMessage(f"{self.topic}:0:{offset}", self.event(offset).value, self.topic, b"FR-75C", None)
        (item,) = Intake().process([raw]).events
        return bool(taker.observe(Observation.of(item), at=position_of(item.source)).replayed)

    def sighting_replayed(self, offset: int) -> bool:
        """Whether a worker taking the sightings partition over, its state restored from the changelog (the table
        here), takes the sightings record at ``offset`` for a replay (skips it: none of it taken)."""
        from synthwatch.stream_apps.detect.novelty import NoveltyDetector
        from synthwatch.stream_apps.runtime.agents.novelty import parse_sightings
        from synthwatch.stream_apps.runtime.state_tables import load_record

        taker = NoveltyDetector(self.config.novelty, fetch=lambda key: load_record(self.tables.substances.data, key))
        event = self.sighting(offset)
        at = (f"{event.message.topic}:0", offset)
        _, taken = taker.observe_batch([(s, at) for s in parse_sightings(event)])
        return taken == 0


def test_a_batch_whose_rebalance_began_while_it_waited_is_not_applied_to_detector_state(tmp_path: Path) -> None:
    """Report 5 of region FR-75C goes through the region stage and waits for its checkpoint. Report 6 (same
    region) names a report it corrects, so the agent asks ClickHouse about it first; a rebalance begins during
    that wait, and the revoke forgets the detector state (``forget_state``), 5's changes with it. Before this
    fix, 6 then went through the region stage on the region's record reloaded without 5, and its replay mark
    (offset 6) said the record held every event up to 6: written at the checkpoint, that record made whoever
    took the partition next skip 5 as a replay (its counts and spike alerts lost for good). The batch must be
    left alone: both are read again from the committed offset."""
    from tests.support.factories import lab

    intake = _Intake(tmp_path, {5: lab(event_id="l-5", sample_id="S-5"), 6: lab(event_id="l-6", corrects="l-0")})

    async def batches() -> Any:
        yield [intake.event(5)]
        yield [intake.event(6)]  # taken before the rebalance began
        yield []  # the stream is quiet: the agent checkpoints what it holds

    async def judge_while_a_rebalance_begins(agents: Any, events: list[Any], *args: Any) -> Any:
        if any(item.event.corrects for item in events):  # ClickHouse is asked about l-0; meanwhile:
            await intake.worker.revoke()
        return events  # ClickHouse's answer: the corrected report is there, the correction may stand

    async def no_notices(*args: Any) -> list[Any]:  # ClickHouse's side: no alert rests on the corrected report
        return []

    intake.batches = batches
    judge, notices = intake.module.judge_batch, intake.module.correction_notices
    intake.module.judge_batch, intake.module.correction_notices = judge_while_a_rebalance_begins, no_notices
    try:
        intake.run()
    finally:
        intake.module.judge_batch, intake.module.correction_notices = judge, notices

    assert not intake.replayed(5)  # the next owner applies 5
    assert intake.worker.commits == []  # and nothing was committed past 5 or 6: both are read again


class _SlowClickHouse:
    """The sink's insert, held in its thread until the test lets ClickHouse answer (``answers``)."""

    def __init__(self) -> None:
        import threading

        self.answers = threading.Event()
        self.stored: list[str] = []

    def store(self, items: list[Any]) -> Any:  # in the sink's thread
        from synthwatch.stream_apps.storage.sink import StoreResult

        assert self.answers.wait(30), "the test never let ClickHouse answer"
        self.stored.extend(item.event_id for item in items)
        return StoreResult(lab_detections=len(items))


def test_state_a_checkpoint_drained_before_a_rebalance_began_is_not_written_after_it(tmp_path: Path) -> None:
    """Report 5's checkpoint drains the detector state it changed, then stores its rows: ClickHouse is slow, and
    a rebalance begins meanwhile. Before this fix the checkpoint then wrote that state to the changelog, during
    the rebalance or after it (as late as ClickHouse let it), where it could land after the records the next
    owner of the region writes for it, and a later restore would read this older record over theirs. It is not
    written (nor its outbox sent): the revoke forgot that state, 5 is not acknowledged, the next owner reads it
    again. Its row is stored (by id: harmless when read again)."""
    from tests.support.factories import lab

    clickhouse = _SlowClickHouse()
    intake = _Intake(tmp_path, {5: lab(event_id="l-5", sample_id="S-5")}, store_events=clickhouse.store)

    async def batches() -> Any:
        yield [intake.event(5)]
        yield []  # quiet: the checkpoint drains the state and begins storing the row
        await intake.worker.revoke()  # a rebalance begins while ClickHouse is slow
        clickhouse.answers.set()

    intake.batches = batches
    intake.run()

    changelog = intake.tables.regions.changelog_topic.get_topic_name()
    assert clickhouse.stored == ["l-5"]
    assert [topic for topic, _ in intake.sends if topic == changelog] == []  # sightings went out with the batch
    assert intake.worker.commits == []
    assert not intake.replayed(5)


def test_state_drained_between_the_start_of_a_revoke_and_forget_state_is_not_written_after_the_rebalance(
    tmp_path: Path,
) -> None:
    """Report 5 goes through the region stage. A rebalance begins: ``Consumer.on_partitions_revoked`` sets
    ``revoking`` and bumps ``revocations`` first, then Faust's ``App._on_partitions_revoked`` awaits the
    producer's flush (and more) before it sends the signal whose receiver (``forget_state``) forgets the
    detector state. In that gap the stream is quiet, so the intake checkpoints: it drains 5's region record
    (not forgotten yet) with ``drained_at`` = the *new* revocation count, and stores the row (ClickHouse slow).
    The revoke then forgets the state, the new assignment comes (generation + 1), and only then does ClickHouse
    answer: ``revocations == drained_at``, so the record is written to the changelog after the rebalance, where
    it can land after the next owner's records of the region (claim 3's hazard). Expected: not written."""
    from tests.support.factories import lab

    clickhouse = _SlowClickHouse()
    intake = _Intake(tmp_path, {5: lab(event_id="l-5", sample_id="S-5")}, store_events=clickhouse.store)
    worker, app = intake.worker, intake.app
    changelog = intake.tables.regions.changelog_topic.get_topic_name()

    # Faust's App._on_partitions_revoked awaits the producer flush before it sends on_partitions_revoked.
    flushed: dict[str, asyncio.Event] = {}
    signal = worker.consumer._on_partitions_revoked

    async def revoked_after_a_flush(revoked: Any) -> None:
        await flushed["event"].wait()
        await signal(revoked)

    worker.consumer._on_partitions_revoked = revoked_after_a_flush

    # Which generation each changelog record was sent in.
    send = app.producer.send
    changelog_sends: list[int] = []

    async def sent(topic: str, *args: Any, **kwargs: Any) -> Any:
        if topic == changelog:
            changelog_sends.append(app.consumer_generation_id)
        return await send(topic, *args, **kwargs)

    app.producer.send = sent

    async def batches() -> Any:
        flushed["event"] = asyncio.Event()
        yield [intake.event(5)]
        revoke = asyncio.ensure_future(worker.revoke())
        await asyncio.sleep(0)
        assert worker.consumer.revoking and worker.consumer.revocations == 1  # the revoke has begun
        yield []  # quiet: the agent drains the state (5's record, not forgotten yet) and stores the row
        flushed["event"].set()
        await revoke  # forget_state ran
        await worker.assign_again()  # the rebalance is over: generation + 1
        clickhouse.answers.set()  # only now does ClickHouse answer the rows write

    intake.batches = batches
    intake.run()

    assert clickhouse.stored == ["l-5"]
    assert worker.commits == []  # 5 is read again: not acknowledged
    # Failed before drain_mark: [GENERATION + 1], a pre-revoke region record written after the new assignment.
    assert changelog_sends == [], f"changelog written in generation(s) {changelog_sends} (revoke began in {GENERATION})"


class _HeldChangelog:
    """The broker's side of a detector table's changelog (the region table's unless told) for :class:`_Intake`:
    records sent to it are acknowledged only once the test lets the broker answer (:meth:`answer`); every changelog
    send and the moment the revoke reaches the app's side (whose ``forget_state`` forgets the detector state) are
    noted in ``order``, as they happen."""

    def __init__(self, intake: _Intake, table: str = "regions") -> None:
        self.order: list[str] = []
        self.held: list[asyncio.Future[None]] = []
        self.answering = False
        self.sending = asyncio.Event()  # the first changelog record is sent: the write is under way
        changelog = getattr(intake.tables, table).changelog_topic.get_topic_name()
        send, app_side = intake.app.producer.send, intake.worker.consumer._on_partitions_revoked

        async def sent(topic: str, key: bytes, *args: Any, **kwargs: Any) -> Any:
            acknowledged = await send(topic, key, *args, **kwargs)
            if topic != changelog:
                return acknowledged
            self.order.append(f"changelog {key.decode()}")
            self.sending.set()
            if self.answering:
                return acknowledged
            self.held.append(asyncio.get_running_loop().create_future())
            return self.held[-1]

        async def forgetting(revoked: Any) -> None:  # the app's side of the revoke: forget_state among its receivers
            self.order.append("forget")
            await app_side(revoked)

        intake.app.producer.send = sent
        intake.worker.consumer._on_partitions_revoked = forgetting

    def answer(self) -> None:
        """The broker acknowledges what it holds, and whatever comes from now on at once."""
        self.answering = True
        for ack in self.held:
            ack.set_result(None)


def _a_revoke_during_the_changelog_write(
    intake: _Intake, event: Any, table: str
) -> tuple[Callable[[], AsyncIterator[list[Any]]], list[_HeldChangelog]]:
    """An agent's batches: ``event``, then a quiet stream (its checkpoint drains the state and begins writing it to
    ``table``'s changelog); once the first record is sent, unacknowledged, a rebalance begins, the broker answers,
    the revoke ends and the partition comes back. With the broker's side (:class:`_HeldChangelog`, made as the agent
    starts), in the list."""
    broker: list[_HeldChangelog] = []
    worker = intake.worker

    async def batches() -> AsyncIterator[list[Any]]:
        broker.append(_HeldChangelog(intake, table))
        yield [event]
        yield []  # quiet: the checkpoint drains the state (and stores the rows) and begins the changelog write
        await broker[0].sending.wait()
        revoke = asyncio.ensure_future(worker.revoke())  # a rebalance begins during the write
        await asyncio.sleep(0)
        assert worker.consumer.revoking
        broker[0].answer()
        await revoke
        await worker.assign_again()

    return batches, broker


def test_a_revoke_that_begins_during_a_changelog_write_waits_for_it_before_it_forgets_the_state(
    tmp_path: Path,
) -> None:
    """Report 5's checkpoint has checked that no revoke began since it drained the state and is writing it: the
    region's records are sent, the broker has not acknowledged them yet, and a rebalance begins. Before this fix
    the revoke went straight on: it forgot the state (and the partition could go to its next owner) while this
    write went on after it, its acknowledgements, seal record and spike alerts landing in the changelog and the
    alerts topic after the revoke, interleaved with the next owner's records of the same region. The revoke must
    wait for the write: every record of it is sent before the state is forgotten. 5 is still not acknowledged
    (the revoke refuses it); the next owner restores the written state and takes 5, read again, for a replay."""
    from tests.support.factories import lab

    intake = _Intake(tmp_path, {5: lab(event_id="l-5", sample_id="S-5")})
    worker = intake.worker
    intake.batches, broker = _a_revoke_during_the_changelog_write(intake, intake.event(5), "regions")
    intake.run()

    order = broker[0].order
    assert f'changelog "{SEAL}"' in order, order
    # Failed before the fix: ['changelog "S:…"', 'changelog "R:FR-75C"', 'forget', 'changelog "~sealed"'].
    assert order[-1] == "forget", f"the write went on after the revoke forgot the state: {order}"
    assert worker.commits == []
    assert intake.replayed(5)


def test_a_revoke_that_begins_during_the_novelty_agents_changelog_write_waits_for_it_before_it_forgets_the_state(
    tmp_path: Path,
) -> None:
    """The same rule for the novelty agent, whose checkpoint writes the substance table through the same
    ``state_write``: sightings record 5 makes substance NOVELSUBSTANCE new (its alert goes out with the batch); the
    stream is quiet, the checkpoint drains the substance's record and sends it to the changelog; the broker has not
    acknowledged it when a rebalance begins. The revoke must wait for the write (its record and its seal) before it
    forgets the state; 5 is not acknowledged (the revoke refuses it), and the next owner, restoring the written
    record, takes 5, read again, for a replay (no second new-substance alert)."""
    intake = _Intake(tmp_path, {})
    worker = intake.worker
    intake.sightings, broker = _a_revoke_during_the_changelog_write(intake, intake.sighting(5), "substances")
    intake.run("novelty")

    alerts = intake.settings.topic_alerts
    assert [topic for topic, _ in intake.sends if topic == alerts] == [alerts]  # the new-substance alert, sent
    # Failed without the revoke's wait: ['changelog "NOVELSUBSTANCE"', 'forget', 'changelog "~sealed"'].
    assert broker[0].order == ['changelog "NOVELSUBSTANCE"', f'changelog "{SEAL}"', "forget"], broker[0].order
    assert worker.commits == []
    assert intake.sighting_replayed(5)


def test_a_revoke_waits_for_a_changelog_write_only_up_to_its_bound_and_the_write_then_sends_nothing_more(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The same write, but the broker does not answer until the revoke is over: a hung broker must not hold the
    rebalance forever. Past its bound (``Consumer.state_write_wait``, here 10 ms) the revoke goes on, logs it, and
    abandons the write: no seal record (nor spike alert) is sent after the state is forgotten, and the events are
    not acknowledged. Before the fix the revoke did not wait at all and the seal came after it."""
    from tests.support.factories import lab

    intake = _Intake(tmp_path, {5: lab(event_id="l-5", sample_id="S-5")})
    worker = intake.worker
    worker.consumer.state_write_wait = 0.01
    broker: list[_HeldChangelog] = []

    async def batches() -> Any:
        broker.append(_HeldChangelog(intake))
        yield [intake.event(5)]
        yield []
        await broker[0].sending.wait()
        await worker.revoke()  # the broker answers nothing meanwhile
        broker[0].answer()  # late: the revoke gave up on the write
        await worker.assign_again()

    intake.batches = batches
    with caplog.at_level(logging.WARNING, logger="synthwatch.stream_apps.runtime.transport"):
        intake.run()

    order = broker[0].order
    assert "forget" in order
    after = order[order.index("forget") + 1 :]
    assert after == [], f"the write sent {after} after the revoke forgot the state"
    assert f'changelog "{SEAL}"' not in order
    assert worker.commits == []
    logged = [r.getMessage() for r in caplog.records]
    assert any("1 checkpoint write(s) of detector state unfinished" in line for line in logged), logged
