"""The consumer watchdog's decision: when a partition counts as stalled, and when the worker is unhealthy."""

from __future__ import annotations

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
    watch.check([at(10, partition=0), at(20, partition=1)], now=0)
    stalled = watch.check([at(10, partition=0), at(25, partition=1)], now=5)
    assert stalled == [at(10, partition=0)]
    watch.check([at(10, partition=0), at(30, partition=1)], now=10)
    assert not watch.healthy
    watch.check([at(30, partition=1)], now=11)  # partition 0 went to another worker
    assert watch.healthy
