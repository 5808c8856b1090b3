"""The consumer watchdog: a worker that has fallen silent says so, tries to recover, then asks to be restarted.

Why: an embedded worker that stops taking events while its partitions still hold unread ones is the
worst failure of an early-warning service: no error, no crash, no alert. Issue 11's restart stall was
one such case (events dropped from a channel queue after their offsets had been fetched: the
committed offsets never moved again). Its cause is fixed (:mod:`.faust_transport`), but nothing
guarantees it is the only one, so the worker watches itself:

- a partition is **stalled** when it has unread records (lag above zero) and its committed offset has
  not moved for ``after`` seconds while ClickHouse answers (a sink that is down holds the consumer
  back on purpose: :meth:`.context.AgentContext.with_retries` retries, and counts that in its own metric),
  unless its records wait for **agents that are working**, or it is only **waiting its turn**, each for at most
  ``starved_after`` (10 × ``after``):

  - *agents working*: records at or after its committed offset were handed to the agents since the latest
    seek, and the agents reading its topic took or finished a batch within the last ``after`` seconds
    (:attr:`.transport.Consumer.worked`). Its committed offset then waits for its records' turn in the agent's
    queue, their batch and their checkpoint, which under load took longer than ``after``: in the pipeline
    benchmark's RSS phase every stall was of this kind (none held, batches still being taken and finished; 15 s
    without a commit anywhere at a 5 s stall time), and each seek-back cleared every queue and fetched again,
    which delayed every commit further: a cascade of seek-backs (docs/performance.md, "seek-backs"). An agent
    that hangs or died (or a checkpoint that never ends: the agent waits for it before its next batch) takes
    and finishes no batch, so its partitions are stalled ``after`` seconds after its last one;
  - *waiting its turn*: nothing at or after its committed offset handed over since the latest seek, and the worker
    committed on another partition, or its agents took or finished a batch, within those ``after`` seconds.
    Under a backlog the consumer hands over one partition's fetched records at a time; the sightings topic,
    fed by the worker itself, then waits tens of seconds between turns behind the input backlog. Counting
    that as a stall sought every partition back (re-fetching what was already fetched), then answered 503 on
    ``/ready``, so an orchestrator's probe would restart a worker that was busy, not stuck, and restart it
    again under the same backlog.

  Seconds count only while the worker's event loop can look: a look that comes later than twice the interval
  between looks means something held the loop (no commit and no other agent could run meanwhile either), and that
  time is not counted (:attr:`StallWatch.step`). An agent waiting forever does not hold the loop, so it is caught
  as before. The agents' batches no longer hold it: they give the loop a turn between slices of a few hundred
  records (:func:`.context.turn`), and each such turn counts as their work (``worked``), so a batch that takes
  longer than ``after`` under load is an agent working, not a stall.

  A partition is **held**, and stalled after ``after`` seconds whatever other partitions or agents do, when the
  record at its committed offset is decided lost: handed over since the latest seek, yet not acknowledged, in no
  agent's hand and in no agent's channel queue, at two looks running (a record lost between fetch and agent:
  issue 11's stall, also when it is the last record of its partition and later records of other partitions keep
  its agent busy); or when an agent has held it through two of its own checkpoints (each acknowledges all its
  agent took before it began, so the record was leaked, not waiting; topics one agent reads);
- on a stall the worker logs a warning (the reason, and the seconds counted since the last progress), counts
  ``synthwatch_consumer_stalls_total`` and seeks its partitions back to their committed offsets the way recovery
  does (flow stopped, seek, flow resumed: :func:`.faust_transport.seek_to_committed`), so every record after them
  is fetched again (records already processed come back as duplicates, which the region stage and the sink skip
  by event id);
- if the partition is still stalled ``after`` seconds after the seek-back (which keeps the time since the
  committed offset last moved: a starved partition is not given another ``starved_after``), the worker is
  **unhealthy**:
  ``/ready`` answers 503 with the reason, so an orchestrator's probe restarts it (a restart resumes
  from the committed offsets, which lose nothing).

:class:`StallWatch` is the decision alone (pure, tested on its own); :func:`watch_consumer` runs it in
the worker.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import faust

from synthwatch.stream_apps.runtime.metrics import PartitionOffsets
from synthwatch.stream_apps.runtime.transport import seek_to_committed, unacked_heads

if TYPE_CHECKING:
    from synthwatch.stream_apps.runtime.context import WorkerContext

log = logging.getLogger("synthwatch.watchdog")


@dataclass
class _Progress:
    committed: int
    since: float  # when the committed offset last moved, or the partition last had nothing to read
    worked: int = 0  # the batches its agents had taken or finished at the last look (PartitionOffsets.worked)
    worked_at: float = 0.0  # when that last moved (or ``since``, if later)
    sought_back: bool = False  # a seek-back was tried since the last progress
    sought_at: float = 0.0  # when (``since`` is kept: the committed offset has not moved since then either)
    lost_looks: int = 0  # successive looks that found the committed record lost (PartitionOffsets.held)
    hand_mark: int | None = None  # its agent's checkpoints when the committed record was first seen in its hand


@dataclass
class StallWatch:
    """Decides, from successive looks at the assigned partitions, which ones have stalled.

    ``after``: seconds without committed progress while lagging before a partition is stalled.
    """

    after: float
    #: Seconds a partition may wait its turn while the worker commits elsewhere (default: 10 × ``after``).
    starved_after: float | None = None
    _partitions: dict[tuple[str, int], _Progress] = field(default_factory=dict)
    _last_commit: float | None = None  # when any watched partition's committed offset last moved
    _last_work: float | None = None  # when the agents of any watched partition last took or finished a batch
    #: Most seconds between two looks that count (None: all). The worker looks from its event loop: a look later
    #: than this means the loop was held (an agent's batch held it for seconds under load before batches gave turns
    #: between slices, :func:`.context.turn`), and no agent, commit or look could run meanwhile. That time is the
    #: worker working, not stalling: it is not counted. An agent waiting forever does not hold the loop.
    step: float | None = None
    _last_look: float | None = None
    _held_loop: float = 0.0  # seconds not counted so far (see ``step``)
    unhealthy: dict[tuple[str, int], str] = field(default_factory=dict)
    #: Why each partition of the latest :meth:`check` was found stalled (for the log).
    reasons: dict[tuple[str, int], str] = field(default_factory=dict)
    #: Seconds counted without progress for each partition of the latest :meth:`check` found stalled (for the log).
    stalled_for: dict[tuple[str, int], float] = field(default_factory=dict)

    def check(
        self, offsets: Iterable[PartitionOffsets], now: float, sink_failing: bool = False
    ) -> list[PartitionOffsets]:
        """Record one look; returns the partitions that have just stalled (to be sought back).

        A partition already sought back that stalls again is moved to :attr:`unhealthy` instead.
        Partitions no longer in ``offsets`` (revoked) are forgotten. While ``sink_failing``, nothing
        counts as stalled: the consumer waits for ClickHouse on purpose. A partition waiting its turn, or
        whose records wait for agents that are working (see the module's docstring), is not stalled either.
        """
        if self._last_look is not None and self.step is not None:
            self._held_loop += max(0.0, now - self._last_look - self.step)
        self._last_look = now
        now -= self._held_loop  # the watch's own clock from here on
        offsets = list(offsets)
        for item in offsets:
            state = self._partitions.get((item.topic, item.partition))
            if state is not None and item.committed != state.committed:
                self._last_commit = now
            if state is not None and item.worked != state.worked:
                self._last_work = now
        starved_after = self.starved_after if self.starved_after is not None else 10 * self.after
        stalled: list[PartitionOffsets] = []
        self.reasons, self.stalled_for = {}, {}
        seen: set[tuple[str, int]] = set()
        for item in offsets:
            key = (item.topic, item.partition)
            seen.add(key)
            state = self._partitions.get(key)
            if state is None or item.committed != state.committed or item.lag == 0 or sink_failing:
                self._partitions[key] = _Progress(
                    item.committed,
                    now,
                    item.worked,
                    now,
                    lost_looks=int(item.held),
                    hand_mark=item.checkpoints if item.in_hand else None,
                )
                self.unhealthy.pop(key, None)
                continue
            if item.worked != state.worked:
                state.worked, state.worked_at = item.worked, now
            state.lost_looks = state.lost_looks + 1 if item.held else 0
            if not item.in_hand:
                state.hand_mark = None
            elif state.hand_mark is None:
                state.hand_mark = item.checkpoints
            if now - state.since < self.after or (state.sought_back and now - state.sought_at < self.after):
                continue  # a seek-back gets ``after`` seconds to show progress
            reason = self._stalled_why(item, state, now, starved_after)
            if reason is None:
                self.unhealthy.pop(key, None)  # waiting its turn, or for agents that are working
                continue
            if state.sought_back:
                self.unhealthy[key] = (
                    f"{item.topic}[{item.partition}]: committed offset {item.committed} of {item.end} has not moved "
                    f"for {now - state.since:.0f} s, {now - state.sought_at:.0f} s of them after a seek back to it "
                    f"({reason})"
                )
                continue
            # ``since`` is kept: a partition starved for ``starved_after`` is still starved after the seek-back, and
            # unhealthy ``after`` seconds later if nothing moved, not after another ``starved_after``.
            state.sought_back, state.sought_at = True, now
            state.worked_at = max(state.worked_at, now)
            self.reasons[key], self.stalled_for[key] = reason, now - state.since
            stalled.append(item)
        for key in set(self._partitions) - seen:
            del self._partitions[key]
            self.unhealthy.pop(key, None)
        return stalled

    def _stalled_why(self, item: PartitionOffsets, state: _Progress, now: float, starved_after: float) -> str | None:
        """Why a partition whose committed offset has not moved for ``after`` seconds is stalled; None if it is not.

        Held: stalled (no turn and no agent will move it): the committed record lost (two looks running), or in
        an agent's hand through two of its checkpoints (each acknowledges all it took before it began). Otherwise it
        is not stalled, up to ``starved_after``, while its records wait for agents that took or finished a batch
        within ``after`` seconds (handed over), or, nothing of it handed over, while the worker committed or its
        agents worked elsewhere within ``after``.
        """
        still = now - state.since
        if item.held and state.lost_looks >= 2:  # two looks: not a record between the queue and its batch
            return f"held: the committed record was handed over and is in no agent's hand nor queue, for {still:.0f} s"
        if state.hand_mark is not None and item.checkpoints - state.hand_mark >= 2:
            return (
                f"held: the committed record stayed in an agent's hand through {item.checkpoints - state.hand_mark} "
                f"of its checkpoints, for {still:.0f} s"
            )
        idle = now - state.worked_at
        if item.handed_over:
            if idle < self.after and still < starved_after:
                return None  # its agents work through what they were handed: it waits in their queue or checkpoint
            if idle >= self.after:
                return f"handed over to agents that have taken and finished no batch for {idle:.0f} s"
            return f"starved: handed over, its agents working on others, for {still:.0f} s"
        elsewhere = [t for t in (self._last_commit, self._last_work) if t is not None and now - t < self.after]
        if elsewhere and still < starved_after:
            return None  # waiting its turn behind a backlog
        if elsewhere:
            return f"starved: waited its turn for {still:.0f} s while the worker worked elsewhere"
        return f"nothing committed and no agent took or finished a batch anywhere for {self.after:.0f} s"

    @property
    def healthy(self) -> bool:
        return not self.unhealthy

    def reason(self) -> str:
        return "; ".join(self.unhealthy.values())


async def committed_positions(app: faust.App, topics: Collection[str]) -> list[PartitionOffsets]:
    """Per assigned partition of ``topics``: its end and the offset this consumer has committed.

    Unlike the lag metric (:func:`.metrics.partition_offsets`), never the fetch position: a stalled
    consumer has fetched to the end and taken nothing, so its position says nothing is left. A partition
    this group has never committed counts from its earliest offset. ``handed_over``: the last record given to the
    agents since the latest seek (:attr:`.transport.Consumer.handed`) is at or past the committed offset. ``held``:
    decided positively, whatever later records did: handed over, yet the record at the committed offset is not
    acknowledged (nor a gap), in no agent's hand and in no agent's channel queue, so nothing will ever move it
    (lost between fetch and agent: issue 11). ``in_hand``: an agent has it, taken and not acknowledged.
    """
    consumer: Any = app.consumer
    monitor: Any = app.monitor
    assigned = sorted(tp for tp in consumer.assignment() if tp.topic in topics)
    if not assigned:
        return []
    ends = dict(await consumer.highwaters(*assigned))
    committed: dict[Any, int | None] = {tp: consumer._committed_offset.get(tp) for tp in assigned}
    never = [tp for tp, offset in committed.items() if offset is None]
    earliest = dict(await consumer.earliest_offsets(*never)) if never else {}
    # Per partition, the lowest record an agent has taken and not acknowledged yet (this generation's)
    in_flight = unacked_heads(consumer._unacked_messages, consumer._committed_offset, app.consumer_generation_id)
    found = []
    queued: dict[str, set[tuple[Any, int]]] = {}
    for tp in assigned:
        end = max(e for e in (ends.get(tp), monitor.tp_end_offsets.get(tp), 0) if e is not None)
        offset = committed[tp]
        if offset is None:
            offset = earliest.get(tp) or 0
        handed = consumer.handed.get(tp)  # the last offset handed to the agents since a seek
        handed_over = handed is not None and handed >= offset
        in_hand = in_flight.get(tp) == offset
        held = handed_over and not in_hand and not _done(consumer, tp, offset)
        if held:  # the agents' queues, read once per topic per look (thousands of records under a backlog)
            if tp.topic not in queued:
                queued[tp.topic] = _queued(app, tp.topic)
            held = (tp, offset) not in queued[tp.topic]
        worked = int(getattr(consumer, "worked", {}).get(tp.topic, 0))
        # Counted per topic: only a topic that one agent reads says whose checkpoints they were (not the alerts topic,
        # whose delivery agent holds a record until its deliveries are final, across the storing agent's checkpoints)
        readers = len(getattr(getattr(app, "topics", None), "_topic_name_index", {}).get(tp.topic, ()))
        checkpoints = int(getattr(consumer, "checkpoints", {}).get(tp.topic, 0)) if readers <= 1 else 0
        found.append(
            PartitionOffsets(
                tp.topic, tp.partition, int(end), int(offset), held, handed_over, worked, in_hand, checkpoints
            )
        )
    return found


def _done(consumer: Any, tp: Any, offset: int) -> bool:
    """Whether ``offset`` of ``tp`` is acknowledged, or a gap Faust commits past (its next commit moves on)."""
    if offset in (consumer._acked.get(tp) or ()):
        return True
    gap: Any = getattr(consumer, "_gap", {}).get(tp)  # an IntervalTree
    return bool(gap) and bool(gap.overlaps_point(offset))


def _queued(app: Any, topic: str) -> set[tuple[Any, int]]:
    """The records of ``topic`` waiting in the channel queues of the agents reading it: (partition, offset)."""
    found: set[tuple[Any, int]] = set()
    for channel in list(getattr(getattr(app, "topics", None), "_topic_name_index", {}).get(topic, ())):
        queue = getattr(channel, "_queue", None)  # not the ``queue`` property: it would create one
        for event in list(getattr(queue, "_queue", ())):  # asyncio.Queue's deque
            message = getattr(event, "message", None)
            if message is not None:
                found.add((message.tp, message.offset))
    return found


def watch_consumer(
    app: faust.App,
    watch: StallWatch,
    topics: Collection[str],
    *,
    interval: float,
    sink_failing: Callable[[], bool],
    on_stall: Callable[[PartitionOffsets], None],
    ready: Callable[[], bool],
    on_health: Callable[[bool], None],
) -> None:
    """Run ``watch`` every ``interval`` seconds in ``app`` (once the worker is ready): seek stalled
    partitions back to their committed offsets; ``on_health`` hears when the verdict changes."""
    healthy = [True]

    @app.timer(interval, name="synthwatch.watchdog")
    async def look() -> None:
        if not ready() or app.rebalancing:
            return
        try:
            offsets = await committed_positions(app, topics)
        except Exception as error:  # a rebalance or a broker hiccup: look again next time
            log.debug("watchdog: no offsets this time (%r)", error)
            return
        stalled = watch.check(offsets, time.monotonic(), sink_failing())
        for item in stalled:
            on_stall(item)
            log.warning(
                "consumer stalled: %s[%d] has %d unread records and its committed offset %d has not moved for %.0f s "
                "(%s); seeking back to the committed offsets",
                item.topic,
                item.partition,
                item.lag,
                item.committed,
                watch.stalled_for.get((item.topic, item.partition), watch.after),
                watch.reasons.get((item.topic, item.partition), "?"),
            )
        if stalled:
            await seek_to_committed(app)
        if watch.healthy != healthy[0]:
            healthy[0] = watch.healthy
            on_health(watch.healthy)
            if watch.healthy:
                log.warning("consumer making progress again; reporting ready")
            else:
                log.error("consumer still stalled after a seek back; reporting not ready: %s", watch.reason())


def watch_worker(app: faust.App, ctx: WorkerContext) -> StallWatch:
    """Watch the worker's topics (:func:`watch_consumer`), counting stalls and keeping the ready gauge."""
    settings, metrics = ctx.settings, ctx.metrics
    interval = max(0.5, settings.stall_seconds / 6)
    watch = StallWatch(after=settings.stall_seconds, step=2 * interval)

    def on_stall(item: PartitionOffsets) -> None:
        metrics.consumer_stalled(item.topic)

    def on_health(healthy: bool) -> None:
        metrics.set_ready(healthy and ctx.state_ready and metrics.stats.failed is None)

    # The alerts topic's offsets wait for deliveries when officers subscribe (an alert is acknowledged when
    # its deliveries are final, retries included): slow receivers are not a stalled consumer.
    watched = set(settings.all_topics) - ({settings.topic_alerts} if settings.subscriptions_file else set())
    watch_consumer(
        app,
        watch,
        watched,
        interval=interval,
        sink_failing=lambda: bool(metrics.failing),
        on_stall=on_stall,
        ready=lambda: ctx.state_ready,
        on_health=on_health,
    )
    return watch
