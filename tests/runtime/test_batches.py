"""Channel batches: the intake lingers for a fetch still being handed over, the novelty agent does not."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace
from typing import Any

from synthwatch.settings import Settings
from synthwatch.stream_apps.runtime.batches import agent_batches, novelty_batches


class _Queue(asyncio.Queue[Any]):
    """The channel queue as the batching reads it (Faust's ThrowableQueue keeps errors in ``_errors``)."""

    def __init__(self) -> None:
        super().__init__()
        self._errors: deque[BaseException] = deque()


def _stream(queue: _Queue) -> Any:
    """The parts of a Faust stream, its app and consumer that ``channel_batches`` touches."""
    app = SimpleNamespace(
        consumer=SimpleNamespace(unacked=_Unacked()),
        topics=SimpleNamespace(acking_topics={"sightings"}),
        flow_control=SimpleNamespace(is_active=lambda: True),
        consumer_generation_id=1,
    )

    async def maybe_start() -> bool:
        return False

    return SimpleNamespace(app=app, channel=SimpleNamespace(queue=queue), should_stop=False, maybe_start=maybe_start)


class _Unacked(list[Any]):
    """The consumer's set of unacknowledged messages (a list here: the fake messages are not hashable)."""

    def add(self, message: Any) -> None:
        self.append(message)


def _event(n: int) -> Any:
    return SimpleNamespace(message=SimpleNamespace(generation_id=1, tracked=False, topic="sightings", offset=n))


async def _first_batch(batches: Callable[[Any], AsyncIterator[list[Any]]]) -> list[Any]:
    """The first batch while events keep arriving one per turn of the loop (a fetch being handed over)."""
    queue = _Queue()
    queue.put_nowait(_event(0))
    stop = asyncio.Event()

    async def feed() -> None:
        n = 1
        while not stop.is_set():
            queue.put_nowait(_event(n))
            n += 1
            await asyncio.sleep(0)

    feeder = asyncio.ensure_future(feed())
    try:
        async for batch in batches(_stream(queue)):
            return batch
    finally:
        stop.set()
        await feeder
    raise AssertionError("no batch")


def test_the_intake_lingers_while_a_fetch_is_handed_over_the_novelty_agent_does_not() -> None:
    # a long linger and a small least: the intake's batch ends when 10 events are there, never by the clock
    settings = Settings(batch_linger_seconds=60.0, batch_least=10)
    lingering = asyncio.run(_first_batch(agent_batches(settings)))
    assert len(lingering) >= 10
    assert [e.message.offset for e in lingering] == list(range(len(lingering)))
    assert all(e.message.tracked for e in lingering)  # tracked as unacknowledged: never committed past
    direct = asyncio.run(_first_batch(novelty_batches(settings)))
    assert [e.message.offset for e in direct] == [0]  # what was there, at once
    assert direct[0].message.tracked


def _delivering_stream(queue: _Queue, consumer: Any) -> Any:
    stream = _stream(queue)
    stream.app.consumer = consumer
    return stream


def test_with_the_workers_consumer_the_intake_lingers_for_the_rest_of_the_fetch_and_no_longer() -> None:
    # The worker's consumer says when it hands a fetch over: the batch waits for that whole fetch (10 events
    # here, however slowly they come), then goes, though the linger (60 s) and least (2,000) would allow more.
    settings = Settings(batch_linger_seconds=60.0, batch_least=2000)

    async def run() -> tuple[list[Any], list[Any]]:
        queue = _Queue()
        consumer = SimpleNamespace(unacked=_Unacked(), delivering=True)
        queue.put_nowait(_event(0))

        async def hand_over() -> None:  # the rest of the fetch, slowly (a busy loop), then the fetch is done
            for n in range(1, 10):
                await asyncio.sleep(0.012)  # longer than the polling's two 5 ms looks at the queue
                queue.put_nowait(_event(n))
            consumer.delivering = False

        feeder = asyncio.ensure_future(hand_over())
        batches = agent_batches(settings)(_delivering_stream(queue, consumer))
        first = await asyncio.wait_for(batches.__anext__(), 5)
        await feeder
        queue.put_nowait(_event(10))  # a later fetch, already handed over: taken at once, alone
        second = await asyncio.wait_for(batches.__anext__(), 5)
        await batches.aclose()
        return first, second

    first, second = asyncio.run(run())
    assert [e.message.offset for e in first] == list(range(10))
    assert [e.message.offset for e in second] == [10]
    assert all(e.message.tracked for e in first + second)


def test_a_stream_stopping_ends_the_batches_and_other_errors_still_raise() -> None:
    """Faust throws StopAsyncIteration into the channel when the stream stops: the batches end (raised
    from the generator it became RuntimeError, an agent 'failure' that made a stopping `up` exit 1)."""
    from synthwatch.stream_apps.runtime.batches import channel_batches

    async def batches_after(error: BaseException) -> list[list[Any]]:
        queue = _Queue()
        queue._errors.append(error)
        return [batch async for batch in channel_batches(_stream(queue), 10)]

    assert asyncio.run(batches_after(StopAsyncIteration())) == []
    try:
        asyncio.run(batches_after(ValueError("broken")))
    except ValueError as raised:
        assert str(raised) == "broken"
    else:
        raise AssertionError("the error was swallowed")


def test_an_event_taken_before_a_seek_back_that_came_and_went_while_the_batch_lingered_is_not_handed_on(
    tmp_path: Any,
) -> None:
    """The intake takes the first event of a batch (offset 50, from a fetch the consumer is still handing over),
    then lingers up to ``batch_linger_seconds`` for the rest of that fetch. A watchdog seek-back fits in that
    wait (0.1 s shipped): flow stopped, seek to the committed offset 40, the channel queues cleared, flow
    resumed, and 40..49 fetched again into the queue. The batch was then [50, 40, ..., 49], every check passed
    (flow active, same generation): 50 came from before the seek. The region stage applied 50 first, and took
    the unprocessed 40..49 of 50's region for replays of what its record already held (marks up to 50):
    skipped, never stored, acknowledged and committed. A mechanism for the pipeline benchmark's 163 unstored
    events under a 4,096-record poll cap with seek-backs (docs/performance.md), not shown to be its cause.
    Real worker app, consumer, flow control and channel queue; the broker's committed offset stubbed."""
    from faust.events import Event
    from faust.types import TP
    from faust.types.tuples import ConsumerMessage

    from synthwatch.stream_apps.runtime.batches import channel_batches
    from synthwatch.stream_apps.runtime.transport import seek_to_committed, worker_app

    app: Any = worker_app(Settings(data_dir=tmp_path), "127.0.0.1:9", 6066)  # built only: nothing connects
    consumer = app.consumer
    tp = TP("lab-detections", 0)
    app.consumer_generation_id = 1
    app.topics._acking_topics.add(tp.topic)
    consumer.assignment = lambda: {tp}

    async def committed_offsets() -> dict[Any, int]:  # the broker: committed 40
        return {tp: 40}

    consumer.seek_to_committed = committed_offsets

    def event(offset: int) -> Any:
        message = ConsumerMessage(tp.topic, 0, offset, 0.0, 0, None, b"k", b"v", None, generation_id=1)
        return Event(app, b"k", b"v", None, message)

    async def run() -> list[int]:
        queue = app.FlowControlQueue(maxsize=1000, clear_on_resume=True)  # a topic channel's queue, as Faust makes it
        stream = SimpleNamespace(app=app, channel=SimpleNamespace(queue=queue), should_stop=False)

        async def maybe_start() -> bool:
            return False

        stream.maybe_start = maybe_start
        queue.put_nowait(event(50))
        consumer.delivering = True  # the drain loop is handing the rest of 50's fetch over
        batches = channel_batches(stream, 100, linger=60.0, least=10)
        first = asyncio.ensure_future(batches.__anext__())
        while not queue.empty():  # the agent takes 50 and lingers
            await asyncio.sleep(0)
        await asyncio.sleep(0.01)
        assert not first.done()
        await seek_to_committed(app)  # the watchdog's seek-back
        for offset in range(40, 50):  # fetched again from the committed offset
            queue.put_nowait(event(offset))
        consumer.delivering = False
        batch = await first
        await batches.aclose()
        return [e.message.offset for e in batch]

    assert asyncio.run(run()) == list(range(40, 50))  # 50 comes again, after them


def test_the_batches_an_agent_takes_and_finishes_are_counted_per_topic_of_its_channel_idle_ones_not() -> None:
    """The watchdog's sign that an agent works through what was handed over to it (``Consumer.worked``): one count
    per batch taken and one when the agent asks for the next, for every topic of its channel (the intake reads two);
    an idle batch (nothing arrived) counts nothing: an agent with nothing to take holds no records."""

    async def run() -> list[dict[str, int]]:
        queue = _Queue()
        stream = _stream(queue)
        stream.app.consumer.worked = {}
        stream.channel.topics = ("labs", "seizures")
        batches = agent_batches(Settings(batch_linger_seconds=0.0, checkpoint_seconds=0.01))(stream)
        seen = []
        queue.put_nowait(_event(0))
        assert len(await asyncio.wait_for(batches.__anext__(), 5)) == 1
        seen.append(dict(stream.app.consumer.worked))  # taken
        assert await asyncio.wait_for(batches.__anext__(), 5) == []  # idle: nothing arrived
        seen.append(dict(stream.app.consumer.worked))  # finished, then idle
        assert await asyncio.wait_for(batches.__anext__(), 5) == []
        seen.append(dict(stream.app.consumer.worked))
        await batches.aclose()
        return seen

    assert asyncio.run(run()) == [{"labs": 1, "seizures": 1}, {"labs": 2, "seizures": 2}, {"labs": 2, "seizures": 2}]
