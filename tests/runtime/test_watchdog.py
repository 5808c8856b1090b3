"""The consumer watchdog's decision: when a partition counts as stalled, and when the worker is unhealthy."""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from typing import Any, cast

import pytest

from synthwatch.stream_apps.runtime.metrics import PartitionOffsets
from synthwatch.stream_apps.runtime.watchdog import StallWatch


def at(committed: int, end: int = 100, partition: int = 0, topic: str = "labs") -> PartitionOffsets:
    return PartitionOffsets(topic, partition, end=end, committed=committed)


def test_a_lagging_partition_whose_commit_does_not_move_stalls_once_then_makes_the_worker_unhealthy() -> None:
    watch = StallWatch(after=30)
    assert watch.check([at(10)], now=0) == []
    assert watch.check([at(10)], now=29.9) == []
    assert watch.check([at(10)], now=30) == [at(10)]  # stalled: seek it back
    assert watch.healthy
    assert watch.check([at(10)], now=45) == []  # the seek-back gets its own `after` seconds
    assert watch.check([at(10)], now=60) == []
    assert not watch.healthy
    assert "labs[0]: committed offset 10 of 100" in watch.reason()


def test_progress_after_a_seek_back_makes_the_worker_healthy_again() -> None:
    watch = StallWatch(after=10)
    watch.check([at(10)], now=0)
    assert watch.check([at(10)], now=10) == [at(10)]
    watch.check([at(10)], now=20)
    assert not watch.healthy
    assert watch.check([at(11)], now=21) == []
    assert watch.healthy
    assert watch.check([at(11)], now=30) == []  # a new stall starts counting from the last progress
    assert watch.check([at(11)], now=31) == [at(11)]


def test_nothing_to_read_is_never_a_stall() -> None:
    watch = StallWatch(after=5)
    for now in range(0, 100, 5):
        assert watch.check([at(100, end=100)], now=now) == []
    assert watch.healthy


def test_a_failing_sink_holds_the_consumer_on_purpose_and_is_not_a_stall() -> None:
    watch = StallWatch(after=5)
    for now in range(0, 60, 5):
        assert watch.check([at(10)], now=now, sink_failing=True) == []
    # counting starts again from the last look at which ClickHouse was failing (55)
    assert watch.check([at(10)], now=59) == []
    assert watch.check([at(10)], now=60) == [at(10)]


def test_partitions_are_watched_apart_and_revoked_ones_forgotten() -> None:
    watch = StallWatch(after=5)
    held = PartitionOffsets("labs", 0, end=100, committed=10, held=True)  # stalls while partition 1 moves
    watch.check([held, at(20, partition=1)], now=0)
    stalled = watch.check([held, at(25, partition=1)], now=5)
    assert stalled == [held]
    watch.check([held, at(30, partition=1)], now=10)
    assert not watch.healthy
    watch.check([at(30, partition=1)], now=11)  # partition 0 went to another worker
    assert watch.healthy


def test_a_partition_waiting_its_turn_behind_a_backlog_is_not_stalled() -> None:
    """Under a backlog the consumer hands over one partition's records at a time: the sightings waited tens
    of seconds between turns while the inputs committed, and were sought back, then reported not ready
    (an orchestrator would have restarted a busy worker). While another partition commits, a lagging
    partition with nothing processed past its committed offset is waiting, not stalled."""
    watch = StallWatch(after=30)
    sightings, labs = partial(at, topic="sightings"), partial(at, topic="labs")
    for now in range(0, 300, 5):  # labs commits at every look; sightings never moves
        assert watch.check([sightings(10), labs(100 + now, end=10_000)], now=now) == []
    assert watch.healthy


def test_a_partition_starved_for_ten_times_the_stall_time_is_stalled_even_while_others_commit() -> None:
    watch = StallWatch(after=30)
    sightings, labs = partial(at, topic="sightings"), partial(at, topic="labs")
    for now in range(0, 300, 5):
        assert watch.check([sightings(10), labs(100 + now, end=10_000)], now=now) == []
    assert watch.check([sightings(10), labs(400, end=10_000)], now=300) == [sightings(10)]


def test_a_held_partition_stalls_after_the_stall_time_whatever_the_others_do() -> None:
    """Later records processed, the committed one never (a record lost between fetch and agent: issue 11):
    Faust cannot commit past it, and no turn will come for it."""
    watch = StallWatch(after=30)
    held = PartitionOffsets("labs", 1, end=100, committed=10, held=True)
    watch.check([held, at(100, end=10_000)], now=0)
    assert watch.check([held, at(120, end=10_000)], now=29) == []
    assert watch.check([held, at(140, end=10_000)], now=30) == [held]
    watch.check([held, at(160, end=10_000)], now=45)
    assert watch.check([held, at(180, end=10_000)], now=60) == []
    assert not watch.healthy and "in no agent's hand nor queue" in watch.reason()


def test_the_worker_committing_nowhere_stalls_every_lagging_partition() -> None:
    """The stall the watchdog is for: nothing commits anywhere (a hung sink): waiting needs a busy worker."""
    watch = StallWatch(after=30)
    sightings, labs = partial(at, topic="sightings"), partial(at, topic="labs")
    watch.check([sightings(10), labs(100, end=10_000)], now=0)
    watch.check([sightings(10), labs(150, end=10_000)], now=5)  # the last commit anywhere
    assert watch.check([sightings(10), labs(150, end=10_000)], now=34) == []  # sightings: labs committed 29 s ago
    assert watch.check([sightings(10), labs(150, end=10_000)], now=35) == [sightings(10), labs(150, end=10_000)]


def test_a_partition_whose_records_were_handed_over_is_not_waiting_its_turn() -> None:
    """An agent that hangs or died holds records handed over to it: no turn will move its partition, so it
    is stalled after the stall time even while the worker commits elsewhere (review of the waiting rule)."""
    watch = StallWatch(after=30)
    hung = PartitionOffsets("sightings", 0, end=100, committed=10, handed_over=True)
    labs = partial(at, topic="labs")
    watch.check([hung, labs(100, end=10_000)], now=0)
    assert watch.check([hung, labs(120, end=10_000)], now=29) == []
    assert watch.check([hung, labs(140, end=10_000)], now=30) == [hung]


def _queued(committed: int, worked: int, partition: int = 0, topic: str = "labs") -> PartitionOffsets:
    """A partition whose records were handed over and wait for its agents, which have done ``worked`` batches."""
    return PartitionOffsets(topic, partition, end=10_000, committed=committed, handed_over=True, worked=worked)


def test_records_waiting_for_agents_that_keep_working_are_not_stalled_though_nothing_commits_for_long() -> None:
    """What the benchmark under load showed (docs/performance.md, "seek-backs"): every stalled partition had its
    records handed over, none held, while the agents kept taking and finishing batches; its committed offset waits
    for its records' turn in the agent's queue, their batch and their checkpoint, which took longer than the stall
    time (15 s without a commit anywhere at a 5 s stall time). Sought back, every queue was cleared and fetched
    again, which delayed every commit further: a cascade of seek-backs. The old rule stalled them at 30 s."""
    watch = StallWatch(after=30)
    for now in range(0, 90, 5):  # no commit anywhere for 90 s; the intake agent takes or finishes a batch every 10 s
        looks = [_queued(100, now // 10), _queued(200, now // 10, partition=1, topic="seizures")]
        assert watch.check(looks, now=now) == [], now
    assert watch.check([_queued(150, 9), _queued(200, 9, partition=1, topic="seizures")], now=90) == []
    assert watch.healthy


def test_records_handed_to_agents_that_stop_working_stall_after_the_stall_time_from_their_last_batch() -> None:
    """An agent that hangs (or a checkpoint that never ends) takes and finishes no more batches: its partitions
    are stalled ``after`` seconds after its last one, whatever other agents do."""
    watch = StallWatch(after=30)
    sightings = partial(at, topic="sightings")
    for now in range(0, 25, 5):  # the agent works until 20 s
        assert watch.check([_queued(100, now), sightings(10 + now, end=10_000)], now=now) == []
    for now in range(25, 50, 5):
        assert watch.check([_queued(100, 20), sightings(10 + now, end=10_000)], now=now) == [], now
    assert watch.check([_queued(100, 20), sightings(60, end=10_000)], now=50) == [_queued(100, 20)]
    assert "taken and finished no batch for 30 s" in watch.reasons[("labs", 0)]


def test_records_waiting_behind_other_partitions_for_ten_times_the_stall_time_are_stalled() -> None:
    watch = StallWatch(after=30)
    for now in range(0, 300, 5):
        assert watch.check([_queued(100, now)], now=now) == []
    assert watch.check([_queued(100, 300)], now=300) == [_queued(100, 300)]
    assert watch.reasons[("labs", 0)].startswith("starved")


def test_a_held_partition_stalls_after_the_stall_time_though_its_agents_work() -> None:
    """Issue 11's loss (a record dropped between fetch and agent, later ones processed) is not excused by work."""
    watch = StallWatch(after=30)
    held = PartitionOffsets("labs", 0, end=10_000, committed=100, held=True, handed_over=True, worked=0)
    for now in range(0, 30, 5):
        assert watch.check([replace(held, worked=now)], now=now) == []
    assert watch.check([replace(held, worked=30)], now=30) == [replace(held, worked=30)]
    assert watch.reasons[("labs", 0)].startswith("held")


def test_a_busy_worker_that_commits_nowhere_for_a_while_lets_a_partition_wait_its_turn() -> None:
    """Nothing of the partition handed over, nothing committed anywhere for longer than the stall time, but the
    agents work (a long batch and checkpoint): it waits its turn, as while the worker commits elsewhere."""
    watch = StallWatch(after=30)
    sightings, labs = partial(at, topic="sightings"), partial(_queued, topic="labs")
    for now in range(0, 120, 5):
        assert watch.check([sightings(10), labs(100, now // 10)], now=now) == [], now


def test_committed_positions_says_held_only_when_no_agent_has_the_committed_record_in_hand() -> None:
    """Seen under load after a seek-back: the record at the committed offset fetched again and in an agent's batch,
    later records acknowledged from their earlier copies. That record is not lost (issue 11's held partition):
    it is being processed, and its agent's work decides. Also: each partition carries its topic's work count."""
    import asyncio
    from types import SimpleNamespace

    from faust.types import TP

    from synthwatch.stream_apps.runtime.watchdog import committed_positions

    tp0, tp1 = TP("labs", 0), TP("labs", 1)
    in_hand = SimpleNamespace(tp=tp0, offset=10, acked=False, generation_id=3)  # the copy fetched again
    stale = SimpleNamespace(tp=tp1, offset=20, acked=False, generation_id=2)  # before a rebalance: holds nothing

    async def highwaters(*tps: Any) -> dict[Any, int]:
        return {tp: 100 for tp in tps}

    consumer = SimpleNamespace(
        assignment=lambda: {tp0, tp1},
        highwaters=highwaters,
        _committed_offset={tp0: 10, tp1: 20},
        _acked={tp0: [11, 12], tp1: [21, 22]},
        handed={tp0: 40, tp1: 40},
        _unacked_messages=[in_hand, stale],
        worked={"labs": 7},
    )
    app = SimpleNamespace(consumer=consumer, monitor=SimpleNamespace(tp_end_offsets={}), consumer_generation_id=3)
    found = asyncio.run(committed_positions(cast(Any, app), {"labs"}))
    by_partition = {item.partition: item for item in found}
    assert not by_partition[0].held and by_partition[0].handed_over and by_partition[0].worked == 7
    assert by_partition[1].held  # record 20 is in no agent's hands: lost, as in issue 11


def test_time_the_event_loop_was_held_by_a_batch_does_not_count_towards_a_stall() -> None:
    """The worker looks from its event loop; an intake batch (validation and detection without a break) held it
    for seconds under load, and the first look after found nothing moved: no commit, no other agent's batch could
    run meanwhile. Looks later than ``step`` count ``step`` seconds; looks on time count in full."""
    watch = StallWatch(after=30, step=10)
    sightings = partial(at, topic="sightings")
    assert watch.check([sightings(10)], now=0) == []
    assert watch.check([sightings(10)], now=5) == []
    assert watch.check([sightings(10)], now=65) == []  # the loop held for 60 s: counts 10 (15 in all)
    assert watch.check([sightings(10)], now=75) == []  # 25 s counted
    assert watch.check([sightings(10)], now=79) == []  # 29 s counted
    assert watch.check([sightings(10)], now=80) == [sightings(10)]  # on time again: stalled at 30 s counted
    assert "nothing committed" in watch.reasons[("sightings", 0)]


def _timeline(watch: StallWatch, look: Any, until: int = 1300, step: int = 5) -> tuple[int | None, int | None]:
    """Looks every ``step`` seconds on the watch's injected clock: (first stall, first unhealthy) times."""
    stalled_at = unhealthy_at = None
    for now in range(0, until, step):
        if watch.check(look(now), now=now) and stalled_at is None:
            stalled_at = now
        if not watch.healthy and unhealthy_at is None:
            unhealthy_at = now
    return stalled_at, unhealthy_at


def _worker(now: int, labs0: dict[str, Any], queued: tuple[int, ...] = ()) -> Any:
    """A worker's consumer and conductor at ``now``: labs[1] is busy (its records handed over, taken, committed
    every look: the intake agent takes and finishes batches and checkpoints); labs[0] is as ``labs0`` says."""
    from collections import deque
    from types import SimpleNamespace

    from faust.types import TP

    tp0, tp1 = TP("labs", 0), TP("labs", 1)

    async def highwaters(*tps: Any) -> dict[Any, int]:
        return {tp0: 10_000, tp1: 10_000}

    def record(tp: Any, offset: int) -> Any:
        return SimpleNamespace(tp=tp, offset=offset, acked=False, generation_id=3)

    in_queue = [SimpleNamespace(message=record(tp1, 100 + now + 1))]
    in_queue += [SimpleNamespace(message=record(tp0, offset)) for offset in queued]
    channel = SimpleNamespace(_queue=SimpleNamespace(_queue=deque(in_queue)))
    consumer = SimpleNamespace(
        assignment=lambda: {tp0, tp1},
        highwaters=highwaters,
        _committed_offset={tp0: 100, tp1: 100 + now},
        _acked={tp0: labs0.get("acked", []), tp1: []},
        handed={tp0: labs0.get("handed", 100), tp1: 200 + now},
        _unacked_messages=[record(tp0, offset) for offset in labs0.get("in_hand", ())],
        worked={"labs": now},  # a batch taken or finished every second
        checkpoints={"labs": now // 5},  # a checkpoint every 5 s
    )
    return SimpleNamespace(
        consumer=consumer,
        monitor=SimpleNamespace(tp_end_offsets={}),
        consumer_generation_id=3,
        topics=SimpleNamespace(_topic_name_index={"labs": [channel]}),
    )


def _positions(app: Any) -> list[PartitionOffsets]:
    import asyncio

    from synthwatch.stream_apps.runtime.watchdog import committed_positions

    return asyncio.run(committed_positions(cast(Any, app), {"labs"}))


@pytest.mark.parametrize(
    ("labs0", "queued"),
    [
        ({}, ()),  # the last record of labs[0]: nothing later processed
        ({"acked": [101, 102], "handed": 200}, ()),  # first or middle: later records processed (issue 11)
        ({"handed": 200}, (101, 102)),  # later records still waiting in the agent's queue
    ],
    ids=["last", "later-processed", "later-queued"],
)
def test_a_lost_record_stalls_at_the_stall_time_though_other_partitions_keep_its_agent_busy(
    labs0: dict[str, Any], queued: tuple[int, ...]
) -> None:
    """Review scenario S1: the record at labs[0]'s committed offset was handed over, then lost before an agent took
    it, while labs[1] keeps the intake agent busy. Decided positively: handed over, not acknowledged, in no agent's
    hand and no queue: lost, whatever later records or other partitions do. Stalled at ``after`` and unhealthy
    ``after`` later, as before the load change (which said 300 s and 600 s for the last record)."""
    watch = StallWatch(after=30)
    assert _timeline(watch, lambda now: _positions(_worker(now, labs0, queued))) == (30, 60)
    assert watch.unhealthy.keys() == {("labs", 0)}


def test_a_committed_record_waiting_in_a_queue_or_in_hand_is_not_lost() -> None:
    """The same labs[0], its record at the committed offset in its agent's queue, or taken and in hand (its
    checkpoint not done yet): not lost; the agent's work decides. Acknowledged (commit pending): not lost."""
    for labs0, queued in (({}, (100,)), ({"in_hand": (100,)}, ()), ({"acked": [100]}, ())):
        found = {p.partition: p for p in _positions(_worker(7, labs0, queued))}
        assert not found[0].held and found[0].handed_over, (labs0, queued)
        assert found[0].in_hand == bool(labs0.get("in_hand"))


def test_a_committed_record_left_in_an_agents_hand_stalls_at_the_stall_time_while_the_agent_works() -> None:
    """Review scenario S2: the record at labs[0]'s committed offset was taken and never acknowledged (parked or
    leaked by an agent), later records acknowledged; the agent goes on taking, finishing and checkpointing batches.
    Each checkpoint acknowledges all its agent took before it began, so two checkpoints later it is not waiting:
    held, stalled at ``after``, unhealthy ``after`` later (the load change said 300 s and 600 s)."""
    labs0 = {"in_hand": (100,), "acked": [101, 102]}
    watch = StallWatch(after=30)
    assert _timeline(watch, lambda now: _positions(_worker(now, labs0))) == (30, 60)
    assert "in an agent's hand through" in watch.reason()


def test_a_committed_record_in_hand_until_its_checkpoint_is_not_stalled_while_the_agent_works() -> None:
    """Under load one checkpoint can take longer than the stall time: a record in hand while its agent works and
    completes fewer than two checkpoints is waiting for them, not leaked (up to ``starved_after``)."""
    watch = StallWatch(after=30)
    for now in range(0, 150, 5):
        looks = [replace(p, checkpoints=7 + (now > 100)) for p in _positions(_worker(now, {"in_hand": (100,)}))]
        assert watch.check(looks, now=now) == [], now


def test_an_intake_agent_that_hangs_stalls_at_the_stall_time_though_the_novelty_agent_works() -> None:
    """Review finding 5: work counts per topic. The intake agent (labs) hangs with its records handed over; the
    novelty agent (sightings) takes, finishes and commits batches at every look. Another agent's work excuses
    nothing: labs[0] is stalled ``after`` seconds after the intake's last batch, unhealthy ``after`` later."""
    watch = StallWatch(after=30)

    def look(now: int) -> list[PartitionOffsets]:
        hung = PartitionOffsets("labs", 0, end=10_000, committed=100, handed_over=True, worked=7)
        novelty = PartitionOffsets("sightings", 0, end=10_000, committed=100 + now, handed_over=True, worked=now)
        return [hung, novelty]

    assert _timeline(watch, look) == (30, 60)
    assert watch.unhealthy.keys() == {("labs", 0)}


def test_a_starved_partition_sought_back_is_unhealthy_the_stall_time_after_not_another_ten_times() -> None:
    """A seek-back keeps the time since the committed offset last moved: still starved, the partition is unhealthy
    ``after`` seconds after the seek-back (330 s), not after another ``starved_after`` (600 s)."""
    watch = StallWatch(after=30)
    assert _timeline(watch, lambda now: [_queued(100, now)]) == (300, 330)


def test_a_stall_reports_how_long_the_committed_offset_has_not_moved() -> None:
    """The warning says the real time (here 50 s: the agent worked until 20 s), not the stall time."""
    watch = StallWatch(after=30)
    for now in range(0, 50, 5):
        assert watch.check([_queued(100, min(now, 20))], now=now) == []
    assert watch.check([_queued(100, 20)], now=50) == [_queued(100, 20)]
    assert watch.stalled_for == {("labs", 0): 50}
