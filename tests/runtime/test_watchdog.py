"""The consumer watchdog's decision: when a partition counts as stalled, and when the worker is unhealthy."""

from __future__ import annotations

from functools import partial

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
    assert not watch.healthy and "though later records were processed" in watch.reason()


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
