"""What a worker keeps of partitions a rebalance revokes: nothing it may acknowledge or commit for them once the
revoke has begun (the revoke forgets the detector state their events changed), and its stored-not-committed
offsets only as facts about ClickHouse, never as a reason to commit.

Faust's own consumer, app and rebalance callbacks, with the broker's side (the commit request, the seek's
committed offsets) stubbed; the checkpoint is the worker's own (:mod:`.checkpoints`).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from faust.events import Event
from faust.types import TP
from faust.types.tuples import ConsumerMessage

from synthwatch.settings import Settings
from synthwatch.stack.broker import unstored
from synthwatch.stream_apps.runtime.checkpoints import Checkpoint
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
