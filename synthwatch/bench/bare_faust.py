"""The framework's floor for ``synthwatch bench pipeline``: a bare Faust agent that decodes and counts.

Why a module of its own: the floor must be measured in its own process (one event loop, one core, as
the worker), on the same broker and messages as the pipeline, with nothing of synthwatch in the loop.
Run as ``python -m synthwatch.bench.bare_faust --bootstrap HOST:PORT --topics A,B --expect N``; it prints one
JSON line when it has counted ``expect`` messages (wall-clock times of the first and last message) and
then waits to be stopped. Variants (event loop, per-event or batch agent, Faust settings) are options,
so the experiments that try to raise the floor run the very same code. The other reference, raw aiokafka
consumption with JSON decoding (the transport's limit), is :func:`raw_aiokafka_rate` here too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast


@dataclass(frozen=True)
class FloorVariant:
    """One way to run the bare agent: event loop, agent style and extra ``faust.App`` settings."""

    name: str
    loop: str = "aio"  # "aio" or "uvloop"
    batch: int = 0  # 0: ``async for value in stream``; n: ``stream.take_events(n, within)``
    within: float = 0.25
    settings: dict[str, Any] = field(default_factory=dict)
    # "default": Faust's Monitor; "quiet": without its per-event bookkeeping; "prometheus": Faust's
    # PrometheusMonitor, as the worker attaches it (stream_apps/runtime/metrics.py)
    monitor: str = "default"
    # "faust": Faust's aiokafka transport; "synthwatch": the worker's (stream_apps/runtime/transport.py)
    transport: str = "faust"
    # with batch > 0: "take" (``take_events``) or "channel" (stream_apps/runtime/batches.py, as the worker)
    batches: str = "take"

    def arguments(self) -> list[str]:
        args = ["--loop", self.loop, "--batch", str(self.batch), "--within", str(self.within)]
        args += ["--transport", self.transport, "--batches", self.batches]
        return [*args, "--settings", json.dumps(self.settings), "--monitor", self.monitor]


#: The floor as the issue defines it: per-event agent, default stream settings, the worker's broker settings.
FLOOR = FloorVariant("bare Faust agent (per event, defaults)")

#: What was tried to raise the floor (docs/performance.md has the results).
_BUFFERS: dict[str, Any] = {
    "stream_buffer_maxsize": 32768,
    "broker_max_poll_records": 5000,
    "consumer_max_fetch_size": 4 << 20,
}
FLOOR_EXPERIMENTS: tuple[FloorVariant, ...] = (
    FLOOR,
    FloorVariant("+ the worker's transport (no tasks per message)", transport="synthwatch"),
    FloorVariant(
        "the worker's transport + channel batches (as the worker)",
        transport="synthwatch",
        batch=10_000,
        batches="channel",
    ),
    FloorVariant("+ Faust's PrometheusMonitor (as the worker runs)", monitor="prometheus"),
    FloorVariant("+ Monitor without per-event bookkeeping", monitor="quiet"),
    FloorVariant("+ uvloop", loop="uvloop"),
    FloorVariant("batch agent: take_events(2000, 0.25)", batch=2000),
    FloorVariant("batch agent + uvloop", loop="uvloop", batch=2000),
    FloorVariant(
        "per event + buffers (stream_buffer_maxsize 32768, max_poll_records 5000, 4 MiB fetch)", settings=_BUFFERS
    ),
    FloorVariant("batch + buffers", batch=2000, settings=_BUFFERS),
    FloorVariant("batch + buffers + uvloop", loop="uvloop", batch=2000, settings=_BUFFERS),
    FloorVariant(
        "batch + buffers + uvloop + quiet Monitor", loop="uvloop", batch=2000, settings=_BUFFERS, monitor="quiet"
    ),
)


@dataclass(frozen=True)
class FloorResult:
    """Messages counted, and the wall-clock seconds from the first to the last of them."""

    variant: str
    count: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else 0.0


def run_bare_agent(
    bootstrap_servers: str,
    topics: Sequence[str],
    expect: int,
    variant: FloorVariant = FLOOR,
    timeout: float = 600.0,
    session_timeout: float = 4.0,
) -> FloorResult:
    """Start the bare agent in a child process, wait for its count, stop exactly that process."""
    from synthwatch.stack.process import StackProcess, log_tail  # here: the child itself imports nothing of it

    with tempfile.TemporaryDirectory(prefix="synthwatch-bare-faust-") as tmp:
        command = [
            sys.executable,
            "-m",
            "synthwatch.bench.bare_faust",
            "--bootstrap",
            bootstrap_servers,
            "--topics",
            ",".join(topics),
            "--expect",
            str(expect),
            "--app-id",
            f"bare-faust-{os.getpid()}-{time.monotonic_ns()}",
            "--data-dir",
            tmp,
            "--session-timeout",
            str(session_timeout),
            *variant.arguments(),
        ]
        log_path = Path(tmp) / "bare.log"
        agent = StackProcess(command, log_path, pipe_stdout=True, stdin=subprocess.DEVNULL, stop_timeout=15)
        with agent:
            line = _read_result(agent.process, timeout)
        if line is None:
            tail = log_tail(log_path, 3000)
            raise RuntimeError(f"bare Faust agent ({variant.name}) gave no result:\n{tail}")
    data = json.loads(line)
    return FloorResult(variant.name, int(data["count"]), float(data["last"]) - float(data["first"]))


def _read_result(process: subprocess.Popen[bytes], timeout: float) -> str | None:
    """The child's JSON line, or None if it exits or the time runs out first."""
    import selectors

    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if selector.select(timeout=0.5):
                raw = process.stdout.readline()
                if not raw:
                    return None
                text = raw.decode(errors="replace")
                if "{" in text:  # Faust's spinner writes terminal codes before it
                    return text[text.index("{") :].strip()
            elif process.poll() is not None:
                return None
    return None


# --- the transport's limit, the other reference --------------------------------------------------------


async def _raw_consume(servers: str, topics: Sequence[str], expect: int, timeout: float) -> tuple[int, float]:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=servers, enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    try:
        partitions: list[TopicPartition] = []
        for topic in topics:
            known = consumer.partitions_for_topic(topic)
            if not known:
                await consumer._client.force_metadata_update()
                known = consumer.partitions_for_topic(topic) or set()
            partitions += [TopicPartition(topic, p) for p in sorted(known)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        count, first, decode = 0, 0.0, json.loads
        deadline = time.monotonic() + timeout
        while count < expect and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                if records and not first:
                    first = time.time()
                for record in records:
                    with contextlib.suppress(ValueError):
                        decode(record.value or b"null")
                count += len(records)
        return count, time.time() - first
    finally:
        await consumer.stop()


def raw_aiokafka_rate(servers: str, topics: Sequence[str], expect: int, timeout: float = 300.0) -> FloorResult:
    """aiokafka, no consumer group, JSON-decoding every value: the transport's limit."""
    import asyncio  # here: the bare agent's process does not need it before Faust

    count, seconds = asyncio.run(_raw_consume(servers, topics, expect, timeout))
    return FloorResult("raw aiokafka + json.loads", count, seconds)


# --- the child process ----------------------------------------------------------------------------------


def _quiet_monitor() -> Any:
    """Faust's Monitor without its per-message and per-event bookkeeping (kept: offsets, commits)."""
    from faust.sensors.monitor import Monitor

    class QuietMonitor(Monitor):
        def on_message_in(self, tp: Any, offset: int, message: Any) -> None:
            return None

        def on_stream_event_in(self, tp: Any, offset: int, stream: Any, event: Any) -> dict[str, Any] | None:
            return None

        def on_stream_event_out(self, tp: Any, offset: int, stream: Any, event: Any, state: Any = None) -> None:
            return None

        def on_message_out(self, tp: Any, offset: int, message: Any) -> None:
            return None

    return QuietMonitor()


def _main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topics", required=True)
    parser.add_argument("--expect", type=int, required=True)
    parser.add_argument("--app-id", required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--session-timeout", type=float, default=4.0)
    parser.add_argument("--loop", choices=("aio", "uvloop"), default="aio")
    parser.add_argument("--batch", type=int, default=0)
    parser.add_argument("--within", type=float, default=0.25)
    parser.add_argument("--settings", default="{}")
    parser.add_argument("--monitor", choices=("default", "quiet", "prometheus"), default="default")
    parser.add_argument("--transport", choices=("faust", "synthwatch"), default="faust")
    parser.add_argument("--batches", choices=("take", "channel"), default="take")
    args = parser.parse_args(argv)
    if args.loop == "uvloop":
        import mode.loop

        mode.loop.use("uvloop")  # before Faust creates its loop, as `faust -L uvloop worker` does
    import faust

    app_class: Any = faust.App
    if args.transport == "synthwatch":
        import synthwatch.stream_apps.runtime.transport as faust_transport

        app_class = faust_transport.App  # Faust's own fetch wait (1.5 s): only the hand-over differs
    app = app_class(
        args.app_id,
        broker=[f"kafka://{s.strip()}" for s in args.bootstrap.split(",")],
        store="memory://",
        datadir=args.data_dir,
        web_enabled=False,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=args.session_timeout,
        broker_heartbeat_interval=min(1.0, args.session_timeout / 4),
        broker_commit_interval=1.0,
        stream_wait_empty=False,
        **json.loads(args.settings),
    )
    if args.monitor == "quiet":
        app.monitor = _quiet_monitor()
    elif args.monitor == "prometheus":
        from faust.sensors.prometheus import FaustMetrics, PrometheusMonitor
        from prometheus_client import CollectorRegistry

        app.monitor = PrometheusMonitor(metrics=FaustMetrics.create(CollectorRegistry(), "faust"))
    topic = app.topic(*args.topics.split(","), key_serializer="raw", value_serializer="raw")
    expect, decode = args.expect, json.loads
    state = {"count": 0, "first": 0.0}

    def counted(n: int) -> None:
        if state["count"] == 0:
            state["first"] = time.time()
        state["count"] += n
        if state["count"] >= expect and n:
            report = {"count": state["count"], "first": state["first"], "last": time.time()}
            sys.stdout.write(json.dumps(report) + "\n")
            sys.stdout.flush()

    if args.batch > 0 and args.batches == "channel":
        from synthwatch.stream_apps.runtime.batches import channel_batches

        @app.agent(topic, name="count")
        async def count_channel_batches(stream: faust.StreamT[bytes]) -> None:
            async for events in channel_batches(stream, args.batch, linger=0.05, least=1000):
                if state["count"] == 0:
                    state["first"] = time.time()
                for event in events:
                    decode(event.value)
                    event.ack()
                counted(len(events))

    elif args.batch > 0:

        @app.agent(topic, name="count")
        async def count_batches(stream: faust.StreamT[bytes]) -> None:
            async for events in cast(faust.Stream[bytes], stream).take_events(args.batch, within=args.within):
                if state["count"] == 0:
                    state["first"] = time.time()
                for event in events:
                    decode(event.value)
                counted(len(events))

    else:

        @app.agent(topic, name="count")
        async def count_events(stream: faust.StreamT[bytes]) -> None:
            async for value in stream:
                decode(value)
                counted(1)

    from synthwatch.stack.worker import faust_worker

    worker = faust_worker(app, "warning")  # as the worker's: no spinner keeping the root logger at DEBUG
    worker.execute_from_commandline()


if __name__ == "__main__":
    _main()
