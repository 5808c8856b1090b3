"""What the worker's agents share, as two typed objects instead of one closure's local variables.

:class:`WorkerContext` is what the process hands the app (configuration, the open ClickHouse client,
the pure core, metrics); :class:`AgentContext` adds what building the Faust app made (the app, its
topics, the worker signer, the batching) and the few helpers every agent uses: sending a signed
record, waiting for ClickHouse, refusing a record no worker signed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, cast

import faust

from synthwatch.settings import Settings
from synthwatch.stream_apps.detect.intake import Intake
from synthwatch.stream_apps.detect.novelty import NoveltyDetector
from synthwatch.stream_apps.detect.region import RegionDetector
from synthwatch.stream_apps.runtime.batches import checkpoint_every
from synthwatch.stream_apps.runtime.checkpoints import Checkpoint
from synthwatch.stream_apps.runtime.metrics import WorkerMetrics
from synthwatch.stream_apps.runtime.worker_signature import WorkerSigner
from synthwatch.stream_apps.storage.retries import retry_until_done
from synthwatch.stream_apps.storage.sink import ClickHouseSink

if TYPE_CHECKING:
    # clickhouse-connect is imported where a client is opened: in the worker, by the thread that opens it.
    from clickhouse_connect.driver.client import Client

log = logging.getLogger("synthwatch.stack.worker")
T = TypeVar("T")

#: Records an agent handles between two turns of the event loop (:func:`slices`): a batch holds up to 10,000, and
#: under load one batch held the loop for over 10 s in one piece (the intake's); validating an input event or
#: parsing a signed alert takes tens of µs of CPU, so a slice a few ms, where a turn costs microseconds.
SLICE_RECORDS = 250


def slices(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """``items`` in consecutive slices of at most ``size``, in order (none for no items): an agent gives the
    event loop a :func:`turn` between two, so commits, sends, the watchdog and ``/ready`` are not held up by a
    large batch."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


async def turn(app: Any, topic: Any) -> None:
    """Give the event loop a turn within a batch of ``topic``'s records (between two :func:`slices`), noted as work
    of the agents reading it (:attr:`.transport.Consumer.worked`: the watchdog's sign that they are working through
    what was handed over to them, :mod:`.watchdog`).

    Why noted: the watchdog does not count time the event loop was held by a batch (its look came late), but a
    batch that gives turns does not hold the loop: the watchdog looks on time between its slices, and with the
    counter moved only when the batch was taken and when it was done, a batch that took longer than
    ``stall_seconds`` under load (a 10,000-event batch took over 10 s) made its partitions stalled: sought back and
    read again, the false stalls the slicing was to end. A ``topic`` of several topics (the intake's inputs) counts
    for each. An agent waiting forever gives no turn here: it is still caught.
    """
    worked = getattr(getattr(app, "consumer", None), "worked", None)
    if isinstance(worked, dict):
        for name in getattr(topic, "topics", None) or ():
            worked[name] = worked.get(name, 0) + 1
    await asyncio.sleep(0)


#: Kafka's default partitioner: ``(key, partitions) -> partition`` (handed in by the wiring).
Partitioner = Callable[[bytes, int], int]
#: How an agent takes its stream: lists of unacknowledged events (:mod:`.batches`).
Batches = Callable[[faust.StreamT[bytes]], AsyncIterator[list[Any]]]


@dataclass
class WorkerContext:
    """What the agents share: configuration, the open ClickHouse client and the pure core."""

    settings: Settings
    client: Client
    sink: ClickHouseSink
    intake: Intake
    regions: RegionDetector
    novelty: NoveltyDetector
    started_at: float
    metrics: WorkerMetrics = field(default_factory=WorkerMetrics)
    on_ready: Callable[[float], None] | None = None
    state_ready: bool = False  # set once tables are recovered (and rebuilt from ClickHouse if empty)
    web_token: str | None = None  # for /sql (DATA_DIR/web-token); None: /sql refuses every request
    #: Waits until ``client`` is open and migrated, raising what opening raised: the worker opens ClickHouse in
    #: a thread while it joins its group (:class:`~synthwatch.stream_apps.storage.clickhouse.OpeningClient`).
    #: None: ``client`` was open when the context was made.
    storage_opened: Callable[[], Awaitable[object]] | None = None
    #: Waits until the rest of the start-up the worker left for its join wait is done (the resolver's
    #: catalogue, :class:`~synthwatch.stack.worker.JoinWaitWork`), raising what it raised. None: nothing left.
    prepared: Callable[[], Awaitable[object]] | None = None

    async def until_storage_open(self) -> None:
        """Wait for ClickHouse to be open and migrated; raises what opening raised."""
        if self.storage_opened is not None:
            await self.storage_opened()

    async def until_prepared(self) -> None:
        """Wait for the start-up work left for the join wait (:attr:`prepared`); raises what it raised."""
        if self.prepared is not None:
            await self.prepared()


@dataclass(frozen=True)
class Topics:
    """The worker's topics (raw keys and values: the adapters encode and decode)."""

    inputs: faust.TopicT
    rejects: faust.TopicT
    alerts: faust.TopicT
    sightings: faust.TopicT

    @classmethod
    def of(cls, app: faust.App, settings: Settings) -> Topics:
        def raw(*names: str) -> faust.TopicT:
            return app.topic(*names, key_serializer="raw", value_serializer="raw")

        return cls(
            inputs=raw(*settings.input_topics),
            rejects=raw(settings.topic_rejects),
            alerts=raw(settings.topic_alerts),
            sightings=raw(settings.topic_sightings),
        )


@dataclass
class AgentContext:
    """What an agent builder needs: the worker's context plus the built app, topics, signer and batching."""

    worker: WorkerContext
    app: faust.App
    topics: Topics
    signer: WorkerSigner
    batches: Batches
    partition_of: Partitioner
    replay_logged: set[str] = field(default_factory=set)

    @property
    def settings(self) -> Settings:
        return self.worker.settings

    @property
    def metrics(self) -> WorkerMetrics:
        return self.worker.metrics

    def checkpoint(self) -> Checkpoint:
        """A new checkpoint for an agent, at the interval the batching allows (:func:`.batches.checkpoint_every`)."""
        return Checkpoint(self.app, checkpoint_every(self.settings), most=self.settings.sink_batch_size)

    async def until_state_ready(self) -> None:
        """Hold a batch until detector state is recovered; a plain flag, as agents start before the loop runs."""
        while not self.worker.state_ready:
            await asyncio.sleep(0.05)

    async def send(self, topic: faust.TopicT, key: bytes, value: bytes) -> Awaitable[Any]:
        """Send a record signed as this worker's (:mod:`.worker_signature`); returns the pending acknowledgement.

        Straight to Faust's producer, as the state tables' changelog writes are (:meth:`.StateTables.save`):
        ``Topic.send`` builds a FutureMessage, runs the send sensors and chains a callback per record, none of
        which the worker uses (it counts what it produces in its own metrics), and on the novelty hop that was a
        good part of each alert's time on the event loop. The returned future is aiokafka's: it resolves when the
        broker acknowledges the record (acks=all) and raises if it does not, as before.
        """
        name = topic.get_topic_name()
        headers = self.signer.headers(name, key, value)
        return cast(Awaitable[Any], await self.app.producer.send(name, key, value, None, None, headers))

    async def with_retries(self, what: str, call: Callable[[], T]) -> T:
        """Run a blocking ClickHouse call in a thread; on failure back off and retry until it works.

        While this waits, the agent does not take new events, Faust's stream buffer fills and fetching
        pauses: the consumer waits for ClickHouse instead of dropping data. A stopping worker gives up.
        """
        app, metrics = self.app, self.metrics
        return await retry_until_done(
            what,
            call,
            log=log,
            give_up=lambda attempt: bool(app.should_stop),
            on_retry=metrics.sink_retry,
            on_success=metrics.sink_recovered,
        )

    def replayed_records(self, stage: str, n: int) -> None:
        """Count records skipped as held by detector state; say so once per stage (a restart's replay)."""
        self.metrics.replayed_records(stage, n)
        if n and stage not in self.replay_logged:
            self.replay_logged.add(stage)
            log.info("%s: records read again after a restart are skipped where detector state holds them", stage)

    def produced_by_a_worker(self, e: Any) -> bool:
        """Alerts, sightings and rejects must carry a worker's signature (:mod:`.worker_signature`); others are
        refused."""
        if self.signer.valid_event(e):
            return True
        self.metrics.refused_forged(e.message.topic)
        log.error(
            "%s[%s] offset %s: no valid worker signature; refused (not stored, not delivered)",
            e.message.topic,
            e.message.partition,
            e.message.offset,
        )
        return False


async def send_all(pending: list[Awaitable[Any]]) -> None:
    """Wait for records sent: delivered before the offsets of the batch that produced them are committed."""
    if pending:
        await asyncio.gather(*pending)
