"""The Faust application: a thin adapter that moves batches between Kafka and the pure core.

Agents:
- ``intake`` consumes both input topics (keyed by region, co-partitioned, so one region's events are
  processed in order by one worker), validates and enriches each batch, stores the new events in
  ClickHouse and sends rejects to the rejects topic. Offsets are acknowledged only after the batch
  is stored (``take_events`` acks when the loop body returns), so a crash loses nothing.
- ``rejects`` stores the rejects topic (from the publisher and from ``intake``) in ClickHouse.

Web (worker HTTP port): ``/ready`` and ``/sql`` (read-only queries for commands that cannot open the
embedded engine while this process holds it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar, cast

import faust
from clickhouse_connect.driver.client import Client
from faust.web import Request, Response, View

from synthwatch.query import QueryError, execute_local
from synthwatch.schemas import Reject
from synthwatch.settings import Settings

from .clickhouse_sink import ClickHouseSink
from .intake import Intake, RawMessage

log = logging.getLogger("synthwatch.worker")
T = TypeVar("T")


@dataclass
class WorkerStats:
    """Counters since start; exposed on /ready and printed by the CLI."""

    consumed: int = 0
    stored: int = 0
    duplicates: int = 0
    rejected: int = 0
    rejects_stored: int = 0
    sink_retries: int = 0
    ready_seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class WorkerContext:
    """What the agents share: configuration, the open ClickHouse client and the pure core."""

    settings: Settings
    client: Client
    sink: ClickHouseSink
    intake: Intake
    started_at: float
    stats: WorkerStats = field(default_factory=WorkerStats)
    on_ready: Callable[[float], None] | None = None


async def with_retries(app: faust.App, what: str, call: Callable[[], T], stats: WorkerStats) -> T:
    """Run a blocking ClickHouse call in a thread; on failure back off and retry until it works.

    While this waits, the agent does not take new events, Faust's stream buffer fills and fetching
    pauses: the consumer waits for ClickHouse instead of dropping data.
    """
    delay = 0.2
    loop = asyncio.get_running_loop()
    while True:
        try:
            return await loop.run_in_executor(None, call)
        except Exception as error:
            if app.should_stop:
                raise
            stats.sink_retries += 1
            log.warning("%s failed (%s); retrying in %.1f s", what, error, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)


def create_app(ctx: WorkerContext, bootstrap_servers: str, web_port: int) -> faust.App:
    """Build the Faust app for one worker process (no module-level app: tests build several)."""
    settings = ctx.settings
    app = faust.App(
        settings.app_id,
        broker=[f"kafka://{server.strip()}" for server in bootstrap_servers.split(",")],
        store="memory://",
        datadir=str(settings.data_dir / "faust"),
        web_host=settings.web_host,
        web_bind=settings.web_host,
        web_port=web_port,
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        consumer_auto_offset_reset="earliest",
        # Start-up: Tansu completes a group join after about half the session timeout; the default
        # 60 s session made the worker take ~30 s to become ready.
        broker_session_timeout=settings.broker_session_timeout,
        broker_heartbeat_interval=min(1.0, settings.broker_session_timeout / 4),
        broker_commit_interval=1.0,
        stream_wait_empty=False,
        producer_acks=-1,
    )
    inputs = app.topic(*settings.input_topics, key_serializer="raw", value_serializer="raw")
    rejects_topic = app.topic(settings.topic_rejects, key_serializer="raw", value_serializer="raw")
    stats = ctx.stats

    async def send_rejects(rejects: list[Reject]) -> None:
        pending: list[Awaitable[Any]] = []
        for reject in rejects:
            key = (reject.event_id or reject.source).encode()
            pending.append(await rejects_topic.send(key=key, value=reject.model_dump_json().encode()))
        if pending:
            await asyncio.gather(*pending)  # delivered before this batch's offsets are committed

    @app.agent(inputs, name="intake")
    async def intake_agent(stream: faust.StreamT[bytes]) -> None:
        async for events in cast(faust.Stream[bytes], stream).take_events(
            settings.sink_batch_size, within=settings.sink_batch_seconds
        ):
            messages = [
                RawMessage(f"{e.message.topic}:{e.message.partition}:{e.message.offset}", e.value) for e in events
            ]
            result = ctx.intake.process(messages)
            stored = await with_retries(app, "storing events", partial(ctx.sink.store_events, result.events), stats)
            await send_rejects(result.rejects)
            stats.consumed += len(messages)
            stats.stored += stored.stored
            stats.duplicates += result.duplicates + stored.already_stored
            stats.rejected += len(result.rejects)

    @app.agent(rejects_topic, name="rejects")
    async def rejects_agent(stream: faust.StreamT[bytes]) -> None:
        async for events in cast(faust.Stream[bytes], stream).take_events(
            settings.sink_batch_size, within=settings.sink_batch_seconds
        ):
            rejects = []
            for e in events:
                try:
                    rejects.append(Reject.model_validate_json(e.value))
                except ValueError as error:
                    source = f"{e.message.topic}:{e.message.partition}:{e.message.offset}"
                    rejects.append(
                        Reject.of(
                            e.value or b"",
                            source=source,
                            reason=f"not a reject record: {error}",
                            stage="worker",
                        )
                    )
            stats.rejects_stored += await with_retries(
                app, "storing rejects", partial(ctx.sink.store_rejects, rejects), stats
            )

    @app.task
    async def announce_ready() -> None:
        await cast(Any, app.tables).recovery.completed.wait()
        stats.ready_seconds = time.monotonic() - ctx.started_at
        if ctx.on_ready is not None:
            ctx.on_ready(stats.ready_seconds)

    @app.page("/ready")
    class ReadyView(View):
        async def get(self, request: Request) -> Response:
            body = {"ready": stats.ready_seconds is not None, **stats.__dict__}
            return self.json(body, status=200 if stats.ready_seconds is not None else 503)

    @app.page("/sql")
    class SqlView(View):
        async def post(self, request: Request) -> Response:
            payload = await request.json()
            sql, parameters = payload.get("sql", ""), payload.get("parameters") or None

            def run() -> Any:
                with ctx.sink.lock:
                    return execute_local(ctx.client, sql, parameters)

            try:
                result = await asyncio.get_running_loop().run_in_executor(None, run)
            except QueryError as error:
                return self.json({"error": str(error)}, status=400)
            except Exception as error:  # ClickHouse's own message is what the user needs
                return self.json({"error": str(error)}, status=400)
            return self.json({"columns": result.columns, "rows": result.rows})

    return app
