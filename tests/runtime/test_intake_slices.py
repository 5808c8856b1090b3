"""The intake agent gives the event loop a turn within a batch (validation and region stage in slices), with the
same outputs and state as in one piece, and a rebalance beginning at such a turn leaves the rest of the batch alone.

The intake agent as ``create_app`` wires it (:class:`tests.runtime.test_revoked_partitions._Intake`); turns are
counted, never timed.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.runtime.test_revoked_partitions import _Intake
from tests.support.factories import lab

SLICE = 8  # events per slice in these tests (the shipped one is larger): a batch of a few slices stays small
FIRST = 5  # the partition's committed offset: the batch starts there


def _reports(n: int) -> dict[int, dict[str, Any]]:
    """``n`` reports of one region from offset :data:`FIRST`: one a day for 30 days, then a burst on one day (a
    spike, once the series is old enough), a few of another substance, an invalid report, and a duplicate and a
    changed re-send of earlier reports in a later slice."""
    reports: dict[int, dict[str, Any]] = {}
    start = datetime(2026, 2, 1, 9, tzinfo=UTC)
    for k in range(n):
        at = start + (timedelta(days=k) if k < 30 else timedelta(days=31, minutes=k))
        other = {"substance": {"name": "Tramadol"}} if k % 7 == 6 else {}
        reports[FIRST + k] = lab(event_id=f"l-{k}", sample_id=f"S-{k}", occurred_at=at.isoformat(), **other)
    reports[FIRST + 3] = {"event_id": "bad-3", "kind": "lab_detection"}  # refused: fields missing
    reports[FIRST + n - 4] = reports[FIRST + 1]  # the same report again: a duplicate within the batch
    reports[FIRST + n - 2] = {**reports[FIRST + 2], "purity_pct": 12.0}  # same id, other content: refused
    return reports


def _storing_into(stored: list[str]) -> Any:
    """A stand-in for the sink's ``store_events``: notes the ids it is given, in order, and stores them all."""
    from synthwatch.stream_apps.storage.sink import StoreResult

    def store(items: list[Any]) -> StoreResult:
        stored.extend(item.event_id for item in items)
        return StoreResult(lab_detections=len(items))

    return store


class _Turns:
    """Another coroutine of the worker's loop: counts the turns it gets while a batch is in the agent's hands,
    with the number of reports validated so far at each; ``at_turn(self)``, if given, is awaited at each."""

    def __init__(self, intake: _Intake, at_turn: Any = None) -> None:
        self.in_batch = False
        self.validated = 0
        self.seen: list[int] = []  # reports validated at each turn during the batch
        self.at_turn = at_turn
        enrich = intake.ctx.intake.enrich

        def counting(*args: Any, **kwargs: Any) -> Any:
            self.validated += 1
            return enrich(*args, **kwargs)

        intake.ctx.intake.enrich = counting  # type: ignore[method-assign]

    async def run(self) -> None:
        while True:
            if self.in_batch:
                self.seen.append(self.validated)
                if self.at_turn is not None:
                    await self.at_turn(self)
            await asyncio.sleep(0)


def _run(intake: _Intake, n: int, at_turn: Any = None, again: bool = False) -> _Turns:
    """One batch of ``n`` reports (``again``: then the same reports fetched again, in the consumer's generation
    by then), then a quiet stream (the agent checkpoints)."""
    turns = _Turns(intake, at_turn)

    async def batches() -> AsyncIterator[list[Any]]:
        ticker = asyncio.ensure_future(turns.run())
        try:
            turns.in_batch = True
            yield [intake.event(FIRST + k) for k in range(n)]
            turns.in_batch = False
            if again:
                events = [intake.event(FIRST + k) for k in range(n)]
                for e in events:
                    e.message.generation_id = intake.app.consumer_generation_id
                yield events
            yield []
        finally:
            ticker.cancel()

    intake.batches = batches
    intake.run()
    return turns


def _recorded(intake: _Intake) -> list[tuple[Any, ...]]:
    """Every record the worker sends from here on: (topic, key, value, partition, headers)."""
    sent: list[tuple[Any, ...]] = []
    send = intake.app.producer.send

    async def recording(topic: str, key: Any, value: Any, partition: Any, *args: Any, **kwargs: Any) -> Any:
        sent.append((topic, key, value, partition, *args, *kwargs.items()))
        return await send(topic, key, value, partition, *args, **kwargs)

    intake.app.producer.send = recording
    return sent


#: The wall-clock stamps of alerts and rejects, in a record or quoted in a changelog record's JSON (pinned, as in
#: tests/detect/test_backtest_identical.py: the clock's, not the batch's).
_STAMP = re.compile(rb'((?:detected_at|rejected_at)\\?":\\?")[0-9T:.+Z-]*')


def _comparable(record: tuple[Any, ...]) -> tuple[Any, ...]:
    """A sent record as (topic, key, value, partition), its wall-clock stamps pinned.

    Not its signature header: each run has a worker key of its own (made in its data directory), and the
    signature is a function of the key and the record's topic, key, value and partition."""
    topic, key, value, partition, *_ = record
    return (topic, key, _STAMP.sub(rb"\1PINNED", value), partition)


def test_other_coroutines_get_turns_while_a_large_batch_is_validated_and_detected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: the whole batch (up to 10,000 events) ran without a turn of the loop; under load that was over
    10 s with no commit, no alert sent, no look of the watchdog and no answer to /ready. Now no more than a slice
    of reports is validated between two turns, and the stages after it give turns too (all validated by then)."""
    from synthwatch.stream_apps.runtime.agents import intake as intake_module

    monkeypatch.setattr(intake_module, "SLICE_EVENTS", SLICE)
    n = 5 * SLICE
    intake = _Intake(tmp_path, _reports(n))
    turns = _run(intake, n)

    assert turns.seen, "no other coroutine ran while the batch was processed"
    validated = n - 3  # the invalid report, the duplicate and the changed re-send are not enriched
    steps = [b - a for a, b in zip([0, *turns.seen], [*turns.seen, validated], strict=True)]
    assert max(steps) <= SLICE, f"reports validated between turns: {steps}"
    assert turns.seen.count(validated) >= validated // SLICE, (
        f"the stages after validation gave too few turns: {turns.seen}"
    )


def test_a_batch_in_slices_sends_and_writes_exactly_what_it_did_in_one_piece(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rejects, sightings, spike alerts and changelog records are the same, byte for byte, in the same
    order, whether the batch is taken in one slice or in many; so are the detector state and what is committed."""
    from synthwatch.stream_apps.runtime.agents import intake as intake_module

    n = 6 * SLICE
    runs = []
    for size in (10 * n, SLICE):  # one slice, then several
        monkeypatch.setattr(intake_module, "SLICE_EVENTS", size)
        intake = _Intake(tmp_path / str(size), _reports(n))
        sent = _recorded(intake)
        turns = _run(intake, n)
        state = {key: _STAMP.sub(rb"\1PINNED", value) for key, value in intake.tables.regions.data.items()}
        runs.append(([_comparable(record) for record in sent], state, intake.worker.commits, len(turns.seen)))

    (whole, whole_state, whole_commits, whole_turns), (sliced, sliced_state, sliced_commits, sliced_turns) = runs
    assert sliced_turns > whole_turns  # the second run was sliced
    topics = {record[0] for record in whole}
    changelog = intake.tables.regions.changelog_topic.get_topic_name()
    assert {
        intake.settings.topic_rejects,
        intake.settings.topic_sightings,
        intake.settings.topic_alerts,
        changelog,
    } <= topics
    assert sum(1 for record in whole if record[0] == intake.settings.topic_rejects) == 2
    assert sliced == whole
    assert sliced_state == whole_state
    assert sliced_commits == whole_commits != []


def test_a_rebalance_beginning_at_a_turn_within_a_batch_leaves_the_rest_of_it_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rebalance begins at a turn during the region stage, and the partition comes back (new generation): the
    batch is fetched again. The slices applied before the turn changed only the state the revoke forgot; applying
    the rest to the state reloaded without them would mark the region's record as holding every report up to the
    batch's last, and the batch fetched again would be skipped as replays: never stored, never counted, committed.
    The rest must be left alone: the batch read again is applied and stored whole, and only then committed."""
    from synthwatch.stream_apps.runtime.agents import intake as intake_module

    monkeypatch.setattr(intake_module, "SLICE_EVENTS", SLICE)
    n = 4 * SLICE
    stored: list[str] = []
    store = _storing_into(stored)
    reports = _reports(n)
    intake = _Intake(tmp_path, reports, store_events=store)
    rebalanced: list[int] = []

    async def rebalance_once_detection_is_under_way(turns: _Turns) -> None:
        if not rebalanced and turns.validated == n - 3:  # all validated: the region stage is under way
            rebalanced.append(len(turns.seen))
            await intake.worker.revoke()
            await intake.worker.assign_again()

    _run(intake, n, at_turn=rebalance_once_detection_is_under_way, again=True)

    assert rebalanced, "no turn during the region stage"
    valid = [f"l-{k}" for k in range(n) if k not in (3, n - 4, n - 2)]  # less the invalid, duplicate, changed
    assert stored == valid
    assert [max(commit.values()) for commit in intake.worker.commits] == [FIRST + n]


def test_the_storing_agents_give_turns_while_they_read_a_large_batch() -> None:
    """The rejects and alerts agents check and parse every record of a batch (up to 10,000 signed records) before
    holding it: in slices, with a turn between, and the batch held whole, once."""
    from types import SimpleNamespace

    from synthwatch.stream_apps.runtime.agents.storing import add_storing_agent
    from synthwatch.stream_apps.runtime.context import SLICE_RECORDS

    n = 3 * SLICE_RECORDS + 1
    parsed: list[int] = []
    seen: list[int] = []  # records parsed at each turn the other coroutine gets during the batch
    held: list[int] = []  # the size of each batch held for a checkpoint
    in_batch = [False]
    agent: list[Any] = []

    async def batches(stream: Any) -> AsyncIterator[list[Any]]:
        in_batch[0] = True
        yield list(range(n))
        in_batch[0] = False

    async def other() -> None:
        while True:
            if in_batch[0]:
                seen.append(len(parsed))
            await asyncio.sleep(0)

    checkpoint = SimpleNamespace(hold=lambda events, sends: held.append(len(events)), due=lambda quiet: False)
    worked: dict[str, int] = {}  # the consumer's count of the agents' work, per topic (the watchdog's)
    agents = SimpleNamespace(
        metrics=SimpleNamespace(consumed=lambda events: None),
        checkpoint=lambda: checkpoint,
        batches=batches,
        app=SimpleNamespace(agent=lambda topic, name: agent.append, consumer=SimpleNamespace(worked=worked)),
    )
    topic = SimpleNamespace(topics=("synthwatch.alerts",))
    add_storing_agent(agents, topic, "alerts", lambda e: parsed.append(e), lambda items: 0)  # type: ignore[arg-type]

    async def run() -> None:
        ticker = asyncio.ensure_future(other())
        await agent[0](None)
        ticker.cancel()

    asyncio.run(run())
    assert parsed == list(range(n))
    assert held == [n]
    assert seen == [SLICE_RECORDS, 2 * SLICE_RECORDS, 3 * SLICE_RECORDS]
    assert worked == {"synthwatch.alerts": 3}  # each turn noted as work: the watchdog looks on time meanwhile


def test_the_watchdog_looking_between_the_slices_of_a_long_batch_finds_no_stall(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The watchdog does not count time the event loop was held by a batch (a look that came late), and takes a
    partition whose records were handed to agents that took or finished a batch within ``after`` seconds for one
    waiting for them. A batch in slices holds the loop no more: the watchdog looks on time between its slices, and
    before this fix the agents' work counter moved only when the batch was taken and when it was done, so a batch
    that took longer than ``after`` under load (a 10,000-event batch, over 10 s) made its partition stalled: sought
    back, its records read again (the false stalls the slicing was to end). Here every turn the watchdog gets in
    the batch is ``after`` / 6 seconds of the batch's work (its look interval), on a clock of the test's own."""
    from synthwatch.stream_apps.runtime.agents import intake as intake_module
    from synthwatch.stream_apps.runtime.batches import _count_work
    from synthwatch.stream_apps.runtime.metrics import PartitionOffsets
    from synthwatch.stream_apps.runtime.watchdog import StallWatch

    monkeypatch.setattr(intake_module, "SLICE_EVENTS", SLICE)
    n = 8 * SLICE
    intake = _Intake(tmp_path, _reports(n))
    after = 6.0
    interval = after / 6
    watch = StallWatch(after=after, step=2 * interval)  # as watch_worker makes it
    worked: dict[str, int] = intake.worker.consumer.worked
    topic = intake.topic
    clock = [0.0]
    stalls: list[str] = []  # why a look during the batch found the partition stalled

    async def look(turns: _Turns) -> None:
        clock[0] += interval
        offsets = PartitionOffsets(
            topic, 0, FIRST + n, FIRST, handed_over=True, worked=worked.get(topic, 0), in_hand=True
        )
        if watch.check([offsets], clock[0]):
            stalls.append(f"at {clock[0]:.0f} s: {watch.reasons}")

    turns = _Turns(intake, look)

    async def batches() -> AsyncIterator[list[Any]]:
        """As :func:`.batches.channel_batches`: the batch counted as taken, and as finished once done with."""
        ticker = asyncio.ensure_future(turns.run())
        try:
            events = [intake.event(FIRST + k) for k in range(n)]
            _count_work(worked, (topic,), events)
            turns.in_batch = True
            yield events
            turns.in_batch = False
            _count_work(worked, (topic,), events)
            yield []
        finally:
            ticker.cancel()

    intake.batches = batches
    intake.run()

    assert clock[0] > 2 * after, f"the batch took {clock[0]:.0f} s of the test's clock: too short to tell"
    assert stalls == []


def test_a_batch_of_invalid_reports_sends_its_rejects_with_turns_between(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every input is hostile: a batch of 10,000 invalid reports is validated in slices, and then each of its
    10,000 rejects was encoded, signed and handed to the producer in one piece (~0.1 s of CPU with the producer
    stubbed, 13 slices' worth; more with aiokafka's). No more than a slice of rejects is sent between two turns,
    in the same order."""
    from synthwatch.stream_apps.runtime.agents import intake as intake_module

    monkeypatch.setattr(intake_module, "SLICE_EVENTS", SLICE)
    n = 5 * SLICE
    reports = {FIRST + k: {"event_id": f"bad-{k}", "kind": "lab_detection"} for k in range(n)}
    intake = _Intake(tmp_path, reports)
    rejects = intake.settings.topic_rejects
    sent: list[int] = []  # rejects sent at each turn the other coroutine gets during the batch

    async def count(turns: _Turns) -> None:
        sent.append(sum(1 for topic, _ in intake.sends if topic == rejects))

    recorded = _recorded(intake)
    _run(intake, n, at_turn=count)

    keys = [record[1] for record in recorded if record[0] == rejects]
    assert keys == [f"bad-{k}".encode() for k in range(n)]
    steps = [b - a for a, b in zip([0, *sent], [*sent, n], strict=True)]
    assert max(steps) <= SLICE, f"rejects sent between turns: {steps}"


@pytest.mark.parametrize("stage", ["validation", "region stage", "sightings"])
def test_a_rebalance_at_any_turn_of_a_batch_counts_its_reports_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    """A rebalance begins at a turn within a batch (while it is validated, run through the region stage, or its
    sightings encoded and sent) and the partition comes back: the batch is fetched again. The slices applied
    before the turn changed only state the revoke forgot; the batch read again is applied once. The detector state
    written to the changelog is that of a run without the rebalance (no report counted twice, none lost), every
    report is stored (rows of a batch whose rebalance began once its region stage was done are stored again:
    skipped by id in ClickHouse) and the committed offset is past the batch."""
    from synthwatch.stream_apps.runtime.agents import intake as intake_module

    monkeypatch.setattr(intake_module, "SLICE_EVENTS", SLICE)
    n = 4 * SLICE
    valid = n - 3  # less the invalid, the duplicate and the changed re-send
    runs = []
    for rebalancing in (False, True):
        stored: list[str] = []
        store = _storing_into(stored)
        intake = _Intake(tmp_path / str(rebalancing), _reports(n), store_events=store)
        rebalanced: list[int] = []

        async def at_turn(turns: _Turns, intake: _Intake = intake, rebalanced: list[int] = rebalanced) -> None:
            if rebalanced:
                return
            if stage == "validation" and not 0 < turns.validated < valid:
                return
            # the region stage's turns come once all are validated; the sightings' after its slices (4 here)
            if stage == "region stage" and not (turns.validated == valid and turns.seen.count(valid) == 2):
                return
            if stage == "sightings" and not (turns.validated == valid and turns.seen.count(valid) == 6):
                return
            rebalanced.append(len(turns.seen))
            await intake.worker.revoke()
            await intake.worker.assign_again()

        _run(intake, n, at_turn=at_turn if rebalancing else None, again=rebalancing)
        state = {key: _STAMP.sub(rb"\1PINNED", value) for key, value in intake.tables.regions.data.items()}
        runs.append((sorted(set(stored)), state, [max(commit.values()) for commit in intake.worker.commits]))
        assert rebalanced or not rebalancing, "no such turn"

    (rows, state, commits), (rows_again, state_again, commits_again) = runs
    assert rows_again == rows and len(rows) == valid
    assert state_again == state != {}
    assert commits_again == commits == [FIRST + n]


def test_an_exception_in_a_later_slice_leaves_nothing_of_the_batch_written_sent_or_acknowledged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A defect raises in the region stage's third slice, after two slices changed detector state in memory. The
    agent raises (the worker then stops and its restart reads the batch again from the committed offset into the
    state of the changelog, :mod:`.supervision`): nothing of the batch may be sent, written to the changelog,
    stored or acknowledged on the way out, as when the batch was one piece."""
    from synthwatch.stream_apps.runtime.agents import intake as intake_module

    monkeypatch.setattr(intake_module, "SLICE_EVENTS", SLICE)
    n = 4 * SLICE
    stored: list[str] = []
    store = _storing_into(stored)
    intake = _Intake(tmp_path, _reports(n), store_events=store)
    sent = _recorded(intake)
    regions = intake.ctx.regions
    observed: list[str] = []

    class Failing:
        """The region stage, with a defect at the fourth report of its third slice."""

        def __getattr__(self, name: str) -> Any:
            return getattr(regions, name)

        def observe(self, obs: Any, *args: Any, **kwargs: Any) -> Any:
            if len(observed) == 2 * SLICE + 3:
                raise RuntimeError("a defect in the region stage")
            observed.append(obs.event_id)
            return regions.observe(obs, *args, **kwargs)

    intake.ctx.regions = Failing()  # type: ignore[assignment]
    turns = _Turns(intake)

    async def batches() -> AsyncIterator[list[Any]]:
        ticker = asyncio.ensure_future(turns.run())
        try:
            turns.in_batch = True
            yield [intake.event(FIRST + k) for k in range(n)]
            yield []
        finally:
            ticker.cancel()

    intake.batches = batches
    with pytest.raises(RuntimeError, match="a defect"):
        intake.run()

    assert len(observed) == 2 * SLICE + 3 and regions.dirty_regions  # changed in memory only
    assert sent == [] and stored == [] and intake.tables.regions.data == {}
    assert intake.worker.commits == [] and all(not e.events for e in intake.checkpoints)


def _live(kind: type) -> int:
    import gc

    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is kind)


def test_the_intake_agent_keeps_nothing_of_a_processed_batch_but_its_rows_while_it_waits_for_the_next(
    tmp_path: Path,
) -> None:
    """The agent's loop kept what it made of a batch (the validated events, the region stage's pass, the sightings,
    sorted and grouped by substance, the rejects) in locals until its next batch with events: behind a backlog the
    next batch is fetched and decoded while the last one's sightings and results are still alive, and an idle worker
    holds them for good (docs/performance.md, "Session 22"). The novelty agent did the same (513bf18). Two reports
    taken (their sightings sent): while the agent asks for its next batch, no ``Sighting``, ``Reject``,
    ``IntakeResult`` or ``RegionPass`` of theirs is alive; the kept events wait in the checkpoint's rows, as they must.
    """
    from synthwatch.schemas import Reject
    from synthwatch.schemas.topics import Sighting
    from synthwatch.stream_apps.detect.intake import IntakeResult
    from synthwatch.stream_apps.runtime.agents.intake import RegionPass

    kinds = (Sighting, Reject, IntakeResult, RegionPass)
    reports = _reports(3 * SLICE)
    intake = _Intake(tmp_path, reports)
    sent = _recorded(intake)
    before: list[tuple[int, ...]] = []
    after: list[tuple[int, ...]] = []

    async def batches() -> AsyncIterator[list[Any]]:
        before.append(tuple(_live(kind) for kind in kinds))
        yield [intake.event(offset) for offset in sorted(reports)]  # an invalid report among them: a reject
        after.append(tuple(_live(kind) for kind in kinds))  # the batch is processed; the agent asks for the next
        yield []

    intake.batches = batches
    intake.run()

    assert any(topic == intake.settings.topic_sightings for topic, *_ in sent)  # the batch's sightings went out
    assert any(topic == intake.settings.topic_rejects for topic, *_ in sent)  # and its rejects
    # Failed before the batch was taken in a function of its own: its sightings, rejects and passes were still held.
    assert after == before, (kinds, before, after)
