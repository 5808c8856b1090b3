"""The Faust application: thin adapters that move batches between Kafka and the pure core.

Agents take batches straight from their channel (:mod:`.faust_batches`), send what a batch produces
(alerts, sightings, rejects) at once, and store rows, write detector state and acknowledge offsets at
their checkpoints (:mod:`.checkpoints`), so a crash or a stop re-delivers rather than loses:

- ``intake`` on both input topics (keyed by region, co-partitioned, so one region's events are
  processed in order by one worker): validate and enrich; run the region stage (lateness: a late
  report is stored and flagged, not refused; duplicates, spikes); send rejects and sightings (keyed by
  substance); at checkpoints store new events in ClickHouse, write changed detector state to the
  region table's changelog, then send the spike alerts that state decided (an outbox in the series
  records: a crash cannot re-decide a sent alert differently; a spike alert waits up to one checkpoint
  interval, ``SYNTHWATCH_CHECKPOINT_SECONDS``, longer than before).
- ``novelty`` on the sightings topic (keyed by substance): new substances, first appearances in a
  region, spread.
- ``rejects`` and ``alerts`` store those topics in ClickHouse (the delivery agent reads alerts too).

Detector state lives in two changelog-backed Faust tables. Faust would pick a table's changelog
partition from "the current event", which a batch does not have, so the adapters send each record to
the table's changelog topic on the partition the records arrived on: a region's state stays with the
region's partition and is restored to whichever worker owns it.

A watchdog (:mod:`.watchdog`) seeks stalled partitions back to their committed offsets and turns
``/ready`` to 503 if that does not help.

Web (worker HTTP port): ``/ready``, ``/metrics`` (Prometheus, :mod:`.metrics`) and ``/sql`` (analysts'
SELECTs for commands that cannot open the embedded engine while this process holds it: token, loopback
Host, no Origin, JSON only; read-only session of its own, see :mod:`synthwatch.stream_apps.storage.query`). Faust's own
views (``/table/``, ``/router/``, ``/graph/``, stats) are off.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from itertools import chain
from typing import Any, TypeVar, cast

import faust
from clickhouse_connect.driver.client import Client
from faust.web import Request, Response, View
from pydantic_core import from_json, to_json

import synthwatch.stream_apps.runtime.transport as faust_transport
from synthwatch.kafka_clients import faust_credentials
from synthwatch.schemas import Alert, Reject
from synthwatch.schemas.topics import Sighting, default_partition
from synthwatch.settings import Settings
from synthwatch.stream_apps.detect.intake import EnrichedEvent, Intake, RawMessage
from synthwatch.stream_apps.detect.novelty import NoveltyDetector
from synthwatch.stream_apps.detect.region import Observation, RegionDetector, RegionResult
from synthwatch.stream_apps.detect.replay import Position, position_of
from synthwatch.stream_apps.detect.spikes import SeriesState
from synthwatch.stream_apps.runtime.batches import channel_batches, take_batches
from synthwatch.stream_apps.runtime.checkpoints import Checkpoint
from synthwatch.stream_apps.runtime.metrics import PartitionOffsets, WorkerMetrics, attach_metrics, ingest_times
from synthwatch.stream_apps.runtime.watchdog import StallWatch, watch_consumer
from synthwatch.stream_apps.runtime.web_auth import refuse_request
from synthwatch.stream_apps.runtime.worker_signature import WorkerSigner, settings_worker_keys, verified_changelog
from synthwatch.stream_apps.storage.query import AnalystSessions, QueryError
from synthwatch.stream_apps.storage.sink import ClickHouseSink
from synthwatch.stream_apps.storage.state_rebuild import learn_names, rebuild

log = logging.getLogger("synthwatch.stack.worker")
T = TypeVar("T")
LateEvent = tuple[EnrichedEvent, RegionResult]  # a late report and what the region stage made of it
Outbox = list[tuple[str, SeriesState, list[str]]]  # what RegionDetector.take_outbox hands a checkpoint


@dataclass
class WorkerStats:
    """Counters since start; exposed on /ready and printed by the CLI."""

    consumed: int = 0
    stored: int = 0
    duplicates: int = 0
    rejected: int = 0
    late: int = 0  # late reports kept (stored, flagged late, left out of spike series)
    rejects_stored: int = 0
    alerts_raised: int = 0
    alerts_stored: int = 0
    sightings: int = 0
    sightings_processed: int = 0
    replayed: int = 0  # input events read again after a restart that detector state held already
    replayed_sightings: int = 0  # the same for sightings
    intake_batches: int = 0
    checkpointed: int = 0  # input events whose rows and detector state are written (offsets acknowledged)
    sink_retries: int = 0
    consumer_stalls: int = 0  # partitions the watchdog found stalled and sought back
    forged: int = 0  # alerts, sightings, rejects and state records refused: no valid worker signature
    ready_seconds: float | None = None
    rebuild: dict[str, Any] = field(default_factory=dict)


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
    stats: WorkerStats = field(default_factory=WorkerStats)
    metrics: WorkerMetrics = field(default_factory=WorkerMetrics)
    on_ready: Callable[[float], None] | None = None
    state_ready: bool = False  # set once tables are recovered (and rebuilt from ClickHouse if empty)
    web_token: str | None = None  # for /sql (DATA_DIR/web-token); None: /sql refuses every request


async def until_state_ready(ctx: WorkerContext) -> None:
    """Hold a batch until detector state is recovered; a plain flag, as agents start before the loop runs."""
    while not ctx.state_ready:
        await asyncio.sleep(0.05)


async def with_retries(
    app: faust.App, what: str, call: Callable[[], T], stats: WorkerStats, metrics: WorkerMetrics | None = None
) -> T:
    """Run a blocking ClickHouse call in a thread; on failure back off and retry until it works.

    While this waits, the agent does not take new events, Faust's stream buffer fills and fetching
    pauses: the consumer waits for ClickHouse instead of dropping data.
    """
    delay = 0.2
    loop = asyncio.get_running_loop()
    while True:
        try:
            result = await loop.run_in_executor(None, call)
        except Exception as error:
            if app.should_stop:
                raise
            stats.sink_retries += 1
            if metrics is not None:
                metrics.sink_retry(what)
            log.warning("%s failed (%s); retrying in %.1f s", what, error, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)
        else:
            if metrics is not None:
                metrics.sink_recovered(what)
            return result


#: The key of the record that ends a changelog write on each partition (see ``seal`` in :func:`create_app`).
SEAL_KEY = "~sealed"
SEAL_VALUE = b"{}"

#: A stream with nothing new for this long is quiet: its agent checkpoints what it holds at once.
QUIET_SECONDS = 0.2


def agent_batches(settings: Settings) -> Callable[[faust.StreamT[bytes]], AsyncIterator[list[Any]]]:
    """The batching the settings ask for: straight from the channel, or Faust's ``noack_take``."""
    size, within = settings.sink_batch_size, settings.sink_batch_seconds
    idle = min(settings.checkpoint_seconds, QUIET_SECONDS)
    if settings.agent_batches == "channel":
        linger, least = settings.batch_linger_seconds, settings.batch_least
        return lambda stream: channel_batches(stream, size, idle=idle, linger=linger, least=least)
    return lambda stream: take_batches(stream, size, within)


def _load_record(data: Any, key: str) -> dict[str, Any] | None:
    """A detector state record from a table (JSON bytes), or None if the table has none."""
    raw = data.get(key)
    return cast(dict[str, Any], from_json(raw)) if raw is not None else None


def outbox_series(data: Any) -> list[str]:
    """Series whose stored record (full or delta) holds outbox entries (``"x"``, only there when non-empty)."""
    names = set()
    for key, raw in list(data.items()):
        if isinstance(key, str) and key.startswith(("S:", "S+:")) and b'"x":' in raw:
            names.add(key.split(":", 1)[1])
    return sorted(names)


#: The key an undecodable changelog key is read as: refused by the signature check, never applied.
UNDECODABLE_KEY = "~undecodable"


class StateSchema(faust.Schema):
    """The detector tables' schema: a changelog key that is not JSON decodes to :data:`UNDECODABLE_KEY`.

    Why: Faust decodes a changelog record's key before the table sees it, and a key it cannot decode
    raised inside recovery, which then never read that partition's offset and waited forever: one record
    with a non-JSON key, written by anyone who can reach the changelog, stalled every restart. Decoded this
    way, the record reaches the signature check (:func:`.worker_signature.verified_changelog`) and is refused.
    """

    def loads_key(self, app: Any, message: Any, *, loads: Any = None, serializer: Any = None) -> Any:
        try:
            return super().loads_key(app, message, loads=loads, serializer=serializer)
        except Exception:  # KeyDecodeError (Faust wraps the codec's error)
            return UNDECODABLE_KEY


def _partition(source: str) -> int:
    """Partition number of a ``topic:partition:offset`` source."""
    return int(source.rsplit(":", 2)[1])


def create_app(ctx: WorkerContext, bootstrap_servers: str, web_port: int) -> faust.App:
    """Build the Faust app for one worker process (no module-level app: tests build several)."""
    settings = ctx.settings
    app = faust_transport.App(
        settings.app_id,
        fetch_max_wait_ms=settings.consumer_fetch_max_wait_ms,
        stream_buffer_maxsize=settings.stream_buffer_maxsize,
        broker_max_poll_records=settings.consumer_max_poll_records,
        producer_max_batch_size=settings.producer_batch_bytes,
        producer_linger=settings.producer_linger_ms / 1000,
        broker=[f"kafka://{server.strip()}" for server in bootstrap_servers.split(",")],
        broker_credentials=faust_credentials(settings),  # SASL_SSL / mTLS from SYNTHWATCH_KAFKA_*
        store="memory://",
        datadir=str(settings.data_dir / "faust"),
        web_host=settings.web_host,
        web_bind=settings.web_host,
        web_port=web_port,
        # Faust's own views list table contents (/table/...: event ids, unauthenticated) and the
        # partition routing (/router/); the debug ones show the graph and stats. None is served.
        web_router_enabled=False,
        web_tables_enabled=False,
        web_graph_enabled=False,
        web_stats_enabled=False,
        web_metrics_enabled=False,
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
    alerts_topic = app.topic(settings.topic_alerts, key_serializer="raw", value_serializer="raw")
    sightings_topic = app.topic(settings.topic_sightings, key_serializer="raw", value_serializer="raw")
    # Values are JSON text serialised by pydantic-core (in Rust), not by Faust's json codec per record; the
    # table keeps them as bytes (restored from the changelog as the same bytes): compact, and decoded
    # only when a record is loaded into the detectors.
    state_schema: faust.Schema = StateSchema(key_serializer="json", value_serializer="raw")
    tables: dict[str, Any] = {"partitions": settings.partitions, "schema": state_schema, "value_type": bytes}
    region_table = app.Table("detector-regions", **tables)  # value_type=bytes: restored raw, too
    substance_table = app.Table("detector-substances", **tables)
    ctx.regions.fetch = partial(_load_record, region_table.data)
    ctx.regions.outbox = True  # spike alerts are sent after the checkpoint that writes the state deciding them
    ctx.novelty.fetch = partial(_load_record, substance_table.data)
    stats = ctx.stats
    signer = WorkerSigner(settings_worker_keys(settings))

    def refuse_state_records(events: list[Any]) -> None:
        """Changelog records no worker signed are not restored: counted and logged, one line per batch."""
        stats.forged += len(events)
        where: dict[tuple[str, int], list[int]] = defaultdict(list)
        for e in events:
            where[(e.message.topic, e.message.partition)].append(e.message.offset)
        for (topic, partition), offsets in sorted(where.items()):
            metrics.forged.labels(topic=topic).inc(len(offsets))
            log.error(
                "%s[%s]: %d detector state record(s) without a valid worker signature refused at recovery "
                "(offsets %s..%s); not restored, their outbox not sent",
                topic,
                partition,
                len(offsets),
                min(offsets),
                max(offsets),
            )

    for table in (region_table, substance_table):
        # restored state is trusted (a series record's outbox is sent as alerts): only what a worker signed
        table.apply_changelog_batch = verified_changelog(  # type: ignore[method-assign,assignment]
            table.apply_changelog_batch, signer, refuse_state_records
        )

    def produced_by_a_worker(e: Any) -> bool:
        """Alerts, sightings and rejects must carry a worker's signature (:mod:`.worker_signature`); others are
        refused."""
        if signer.valid_event(e):
            return True
        stats.forged += 1
        metrics.forged.labels(topic=e.message.topic).inc()
        log.error(
            "%s[%s] offset %s: no valid worker signature; refused (not stored, not delivered)",
            e.message.topic,
            e.message.partition,
            e.message.offset,
        )
        return False

    metrics = ctx.metrics
    attach_metrics(app, metrics, topics=set(settings.all_topics))
    watch = StallWatch(after=settings.stall_seconds)

    def on_stall(item: PartitionOffsets) -> None:
        stats.consumer_stalls += 1
        metrics.consumer_stalls.labels(topic=item.topic).inc()

    def on_health(healthy: bool) -> None:
        metrics.set_ready(healthy and ctx.state_ready)

    # The alerts topic's offsets wait for deliveries when officers subscribe (an alert is acknowledged when
    # its deliveries are final, retries included): slow receivers are not a stalled consumer.
    watched = set(settings.all_topics) - ({settings.topic_alerts} if settings.subscriptions_file else set())
    watch_consumer(
        app,
        watch,
        watched,
        interval=max(0.5, settings.stall_seconds / 6),
        sink_failing=lambda: bool(metrics.failing),
        on_stall=on_stall,
        ready=lambda: ctx.state_ready,
        on_health=on_health,
    )
    batch = settings.sink_batch_size
    batches = agent_batches(settings)
    # Faust's take batches end only when events come, so they checkpoint after every batch.
    every = settings.checkpoint_seconds if settings.agent_batches == "channel" else 0.0

    def replayed_records(stage: str, n: int) -> None:
        """Count records skipped as held by detector state; say so once per stage (a restart's replay)."""
        if n:
            metrics.replayed_records(stage, n)
            if stage not in replay_logged:
                replay_logged.add(stage)
                log.info("%s: records read again after a restart are skipped where detector state holds them", stage)

    replay_logged: set[str] = set()

    def checkpoint() -> Checkpoint:
        return Checkpoint(app, every, most=batch)

    async def send_all(pending: list[Awaitable[Any]]) -> None:
        if pending:
            await asyncio.gather(*pending)  # delivered before this batch's offsets are committed

    async def send(topic: faust.TopicT, key: bytes, value: bytes) -> Awaitable[Any]:
        headers = signer.headers(topic.get_topic_name(), key, value)
        return cast(Awaitable[Any], await topic.send(key=key, value=value, headers=headers))

    async def save(table: Any, changes: list[tuple[int, str, dict[str, Any]]]) -> list[Awaitable[Any]]:
        """Keep each record in the table and send it to the table's changelog, on the given partition.

        Straight to Faust's producer: ``Table.send_changelog`` builds a FutureMessage and goes through
        Faust's producer buffer for every record, and its callback only matters to RocksDB stores. Keys
        are encoded as Faust's json codec does, so compaction and recovery see the same keys.
        """
        data, topic, send = table.data, table.changelog_topic.get_topic_name(), app.producer.send
        futures = []
        for partition, key, value in changes:
            encoded = data[key] = to_json(value)
            raw_key = json.dumps(key).encode()
            headers = signer.headers(topic, raw_key, encoded, partition)  # checked at recovery
            futures.append(await send(topic, raw_key, encoded, partition, None, headers))
        return futures

    async def seal(table: Any, changes: list[tuple[int, str, dict[str, Any]]]) -> None:
        """After a write is acknowledged, end each partition it wrote with one record in a batch of its own.

        Why: Tansu 0.6 answers ListOffsets "latest" with the first offset of the partition's last record
        batch plus one, and Faust's recovery reads a changelog up to that offset: the other records of a
        checkpoint's last batch were never restored, so a restarted worker lost part of its last
        checkpoint's state while the offsets of the events behind it were committed. A lone last record
        makes the answer the true end. A worker killed before the seal leaves the last batch unsealed:
        recovery then reads a prefix of it (in send order), which the replay marks cover.
        """
        topic, send = table.changelog_topic.get_topic_name(), app.producer.send
        key = json.dumps(SEAL_KEY).encode()
        futures = []
        for partition in sorted({partition for partition, _, _ in changes}):
            table.data[SEAL_KEY] = SEAL_VALUE
            headers = signer.headers(topic, key, SEAL_VALUE, partition)
            futures.append(await send(topic, key, SEAL_VALUE, partition, None, headers))
        await send_all(futures)

    ingested: dict[str, float] = {}  # alert id -> Kafka timestamp of its triggering event (latency metric)

    async def send_outbox(outbox: Outbox) -> None:
        """Send outbox entries (written to the changelog before), await their acks, then drop them."""
        if not outbox:
            return
        pending: list[Awaitable[Any]] = []
        published: list[Alert] = []
        for _, _, entries in outbox:
            for entry in entries:
                alert = Alert.model_validate_json(entry)
                published.append(alert)
                pending.append(await send(alerts_topic, alert.alert_id.encode(), entry.encode()))
        await send_all(pending)
        for name, state, entries in outbox:
            ctx.regions.sent(name, state, len(entries))
        metrics.produced(settings.topic_alerts, len(published))
        now = time.time()
        for alert in published:  # re-sent ones after a restart have no ingest time here: counted, latency 0
            metrics.alerts_published([alert], ingested.pop(alert.alert_id, now), now)

    def detect_regions(
        events: list[EnrichedEvent],
    ) -> tuple[list[EnrichedEvent], list[LateEvent], list[Alert], list[Sighting], dict[str, int]]:
        kept: list[EnrichedEvent] = []
        late: list[LateEvent] = []
        alerts: list[Alert] = []
        sightings: list[Sighting] = []
        partitions: dict[str, int] = {}
        for item in events:
            found = ctx.regions.observe(Observation.of(item), at=position_of(item.source))
            partitions[item.event.region] = _partition(item.source)
            if found.replayed:  # read again after a restart: stored, judged and sent before
                stats.replayed += 1
                continue
            if found.late_by_hours is not None and not found.duplicate:
                late.append((item, found))  # kept or not once storage tells a late report from a re-send
                continue
            kept.append(item)
            alerts.extend(found.alerts)
            sightings.extend(found.sightings)
        return kept, late, alerts, sightings, partitions

    async def keep_late(
        late: list[LateEvent], unstored: Iterable[EnrichedEvent], changed: list[Reject]
    ) -> tuple[list[EnrichedEvent], list[Sighting], int]:
        """Late events are kept (stored flagged ``late``, their sightings sent), unless already stored (or
        about to be, in ``unstored``): a re-sent old event is a duplicate, or, with other content, a changed
        report refused into ``changed``. Returns (kept, sightings, duplicates)."""
        if not late:
            return [], [], 0
        stored = await with_retries(
            app, "checking late events", partial(ctx.sink.stored_event_digests, [i for i, _ in late]), stats, metrics
        )
        late_ids = {item.event_id for item, _ in late}
        stored.update({item.event_id: item.digest for item in unstored if item.event_id in late_ids})
        kept: list[EnrichedEvent] = []
        sightings: list[Sighting] = []
        duplicates = 0
        for item, found in late:
            known = stored.get(item.event_id)
            if known is not None:
                if known and item.digest and known != item.digest:
                    changed.append(item.changed_content_reject())
                else:
                    duplicates += 1
                continue
            stored[item.event_id] = item.digest  # a re-send later in the same batch
            item.late = True
            kept.append(item)
            sightings.extend(found.sightings)
            stats.late += 1
            metrics.late(item.event.kind)
            log.info("late %s %r stored: %.1f h late", item.event.kind, item.event_id, found.late_by_hours)
        return kept, sightings, duplicates

    @app.agent(inputs, name="intake")
    async def intake_agent(stream: faust.StreamT[bytes]) -> None:
        held = checkpoint()
        rows: list[EnrichedEvent] = []  # kept events since the last checkpoint, stored at the next one
        storing: list[EnrichedEvent] = []  # the rows of the checkpoint under way
        partitions: dict[str, int] = {}

        async def write(
            taken: list[EnrichedEvent], changes: list[tuple[int, str, dict[str, Any]]], outbox: Outbox, events: int
        ) -> None:
            # Rows first, then the state that has seen them: a worker killed in between replays events
            # that are stored already (skipped by event_id) into state that has not seen them.
            stored = await with_retries(
                app,
                "storing events",
                metrics.timed_call("events", len(taken), partial(ctx.sink.store_events, taken)),
                stats,
                metrics,
            )
            if stored.changed:  # ids stored with other content: refused with a reason, like any reject
                refused = [item.changed_content_reject() for item in stored.changed]
                await send_all(
                    [
                        await send(rejects_topic, (r.event_id or r.source).encode(), r.model_dump_json().encode())
                        for r in refused
                    ]
                )
                metrics.rejected(refused)
                metrics.produced(settings.topic_rejects, len(refused))
                stats.rejected += len(refused)
            await send_all(await save(region_table, changes))
            await seal(region_table, changes)
            # The spike alerts these records decided, now that the records holding them are acknowledged;
            # acknowledged themselves before this checkpoint's offsets are (Checkpoint._complete).
            await send_outbox(outbox)
            stats.checkpointed += events  # acknowledged right after this returns
            metrics.stored("lab_detections", stored.lab_detections)
            metrics.stored("border_seizures", stored.border_seizures)
            metrics.skipped_duplicates(stored.already_stored)
            stats.stored += stored.stored
            stats.duplicates += stored.already_stored

        async for events in batches(stream):
            if events:
                await until_state_ready(ctx)
                metrics.consumed(events)
                # topic, key and headers: what a signed envelope covers (checked in the intake when configured)
                messages = [
                    RawMessage(
                        f"{e.message.topic}:{e.message.partition}:{e.message.offset}",
                        e.value,
                        e.message.topic,
                        e.message.key,
                        e.message.headers,
                    )
                    for e in events
                ]
                result = ctx.intake.process(messages)
                replayed_before = stats.replayed
                kept, late, alerts, sightings, batch_partitions = detect_regions(result.events)
                replayed_records("intake", stats.replayed - replayed_before)
                partitions.update(batch_partitions)
                late_kept, late_sightings, late_duplicates = await keep_late(
                    late, chain(storing, rows, kept), result.rejects
                )
                result.duplicates += late_duplicates
                sightings += late_sightings
                rows.extend(kept)
                rows.extend(late_kept)
                # Sent now, not at the checkpoint: alerts and the sightings that lead to new-substance
                # alerts are not held back by storage. Acknowledged by the broker before the checkpoint.
                pending = [
                    await send(rejects_topic, (r.event_id or r.source).encode(), r.model_dump_json().encode())
                    for r in result.rejects
                ]
                # Spike alerts wait in the outbox of the series that raised them (RegionDetector.outbox) and
                # go out at the checkpoint that writes that series: up to one checkpoint interval later.
                if alerts:
                    started = ingest_times(events, kept)
                    fallback = min(started.values(), default=time.time())
                    for a in alerts:
                        known = [started[e] for e in a.evidence_event_ids if e in started]
                        ingested[a.alert_id] = max(known) if known else fallback
                # One message per substance, in event-time order: the novelty stage takes sightings in the
                # order they are on the topic (see NoveltyDetector.observe_batch), so "first" is first reported.
                by_substance: dict[str, list[dict[str, Any]]] = defaultdict(list)
                for sighting in sorted(sightings, key=lambda s: (s.occurred_at, s.event_id)):
                    by_substance[sighting.key].append(sighting.to_dict())
                pending += [
                    await send(sightings_topic, key.encode(), json.dumps(values).encode())
                    for key, values in by_substance.items()
                ]
                held.hold(events, pending)
                metrics.skipped_duplicates(result.duplicates)
                metrics.rejected(result.rejects)
                metrics.produced(settings.topic_rejects, len(result.rejects))
                metrics.produced(settings.topic_sightings, len(by_substance))
                stats.consumed += len(messages)
                stats.intake_batches += 1
                stats.duplicates += result.duplicates
                stats.rejected += len(result.rejects)
                stats.alerts_raised += len(alerts)
                stats.sightings += len(sightings)
            if held.due(quiet=not events):
                # A region with no event since the start (a series whose outbox was sent at start) has no
                # partition noted yet: it is the region's own, as the publishers key by region.
                n = settings.partitions
                changes = [
                    (partitions.get(region) or default_partition(region.encode(), n), key, value)
                    for region, key, value in ctx.regions.drain_dirty()
                ]
                outbox = ctx.regions.take_outbox()
                storing, rows = rows, []
                await held.start(write(storing, changes, outbox, len(held.events)))

    @app.agent(sightings_topic, name="novelty")
    async def novelty_agent(stream: faust.StreamT[bytes]) -> None:
        held = checkpoint()
        partitions: dict[str, int] = {}

        async def write(changes: list[tuple[int, str, dict[str, Any]]]) -> None:
            await send_all(await save(substance_table, changes))
            await seal(substance_table, changes)

        async for events in batches(stream):
            if events:
                await until_state_ready(ctx)
                metrics.consumed(events)
                batch_sightings: list[tuple[Sighting, Position]] = []
                for e in events:
                    if not produced_by_a_worker(e):
                        continue
                    at = (f"{e.message.topic}:{e.message.partition}", e.message.offset)
                    for data in json.loads(e.value):
                        sighting = Sighting.from_dict(data)
                        partitions[sighting.key] = e.message.partition
                        batch_sightings.append((sighting, at))
                # In the order read; those a record holds already (read again after a restart) skipped.
                alerts, taken = ctx.novelty.observe_batch(batch_sightings)
                stats.sightings_processed += len(batch_sightings)
                stats.replayed_sightings += len(batch_sightings) - taken
                replayed_records("novelty", len(batch_sightings) - taken)
                sent = [await send(alerts_topic, a.alert_id.encode(), a.model_dump_json().encode()) for a in alerts]
                held.hold(events, sent)
                metrics.produced(settings.topic_alerts, len(alerts))
                if alerts:
                    # from the sighting's Kafka timestamp: the intake stage's time before it is not included
                    metrics.alerts_published(alerts, min(e.message.timestamp or time.time() for e in events))
                stats.alerts_raised += len(alerts)
            if held.due(quiet=not events):
                await held.start(write([(partitions[k], k, v) for k, v in ctx.novelty.drain_dirty()]))

    def storing_agent(
        topic: faust.TopicT,
        what: str,
        parse: Callable[[Any], Any | None],
        store: Callable[[list[Any]], int],
        count: Callable[[int], None],
    ) -> None:
        """An agent that stores the records of ``topic`` in ClickHouse at its checkpoints."""

        async def agent(stream: faust.StreamT[bytes]) -> None:
            held = checkpoint()
            items: list[Any] = []

            async def write(taken: list[Any]) -> None:
                new = await with_retries(
                    app, f"storing {what}", metrics.timed_call(what, len(taken), partial(store, taken)), stats, metrics
                )
                metrics.stored(what, new)
                count(new)

            async for events in batches(stream):
                metrics.consumed(events)
                for e in events:
                    item = parse(e)
                    if item is not None:
                        items.append(item)
                held.hold(events, [])
                if held.due(quiet=not events):
                    taken, items = items, []
                    await held.start(write(taken))

        app.agent(topic, name=what)(agent)

    def parse_reject(e: Any) -> Reject | None:
        if not produced_by_a_worker(e):  # only workers (and publishers holding the worker key) write rejects
            return None
        try:
            return Reject.model_validate_json(e.value)
        except ValueError as error:
            source = f"{e.message.topic}:{e.message.partition}:{e.message.offset}"
            return Reject.of(e.value or b"", source=source, reason=f"not a reject record: {error}", stage="worker")

    def parse_alert(e: Any) -> Alert | None:
        if not produced_by_a_worker(e):
            return None
        try:
            return Alert.model_validate_json(e.value)
        except ValueError as error:
            log.error("alerts topic: not an alert at %s:%s (%s)", e.message.partition, e.message.offset, error)
            return None

    def count_rejects(n: int) -> None:
        stats.rejects_stored += n

    def count_alerts(n: int) -> None:
        stats.alerts_stored += n

    storing_agent(rejects_topic, "rejects", parse_reject, ctx.sink.store_rejects, count_rejects)
    storing_agent(alerts_topic, "alerts", parse_alert, ctx.sink.store_alerts, count_alerts)

    if settings.subscriptions_file is not None:
        from synthwatch.stream_apps.delivery.service import DeliveryService, attach_delivery

        # The sink's lock: the embedded engine's client is shared with the other agents.
        delivery = DeliveryService.from_settings(settings, ctx.client, lock=ctx.sink.lock)
        # channel batches whatever SYNTHWATCH_AGENT_BATCHES says: Faust's noack_take acknowledges the events it
        # skips (stale generation, flow stopped), which could commit an alert never delivered
        attach_delivery(
            app,
            alerts_topic,
            delivery,
            batches=lambda stream: channel_batches(stream, batch),
            accept=signer.valid_event,
        )

        @app.page("/deliveries/resend")
        class ResendView(View):
            """``synthwatch deliveries resend ID`` while this process holds the embedded engine (same token as
            ``/sql``): the delivery is sent by this worker's service, with its endpoints and records."""

            async def post(self, request: Request) -> Response:
                from synthwatch.stream_apps.delivery.service import ResendError

                refused = refuse_request(request.headers, ctx.web_token, settings.web_allowed_hosts)
                if refused is not None:
                    return self.json({"error": refused[1]}, status=refused[0])
                declared = request.headers.get("Content-Length", "0")
                if not declared.isdigit() or int(declared) > 4096:
                    return self.json({"error": "request over 4096 bytes"}, status=413)
                body = await request.read()
                try:
                    wanted = str(json.loads(body)["delivery_id"])
                except (ValueError, KeyError, TypeError) as error:
                    return self.json({"error": f'send {{"delivery_id": "d_..."}} ({error})'}, status=400)
                try:
                    outcome = await delivery.resend(wanted)
                except ResendError as error:
                    return self.json({"error": str(error)}, status=409)
                return self.json({"status": outcome.status, "attempts": outcome.attempts, "reason": outcome.reason})

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]  # mode's stub wants a keyword-only signal
    async def forget_state(sender: Any, *args: Any, **kwargs: Any) -> None:

        # Another worker may own these regions now; reload from the tables when they come back.
        ctx.regions.forget()
        ctx.novelty.forget()

    async def send_kept_outboxes() -> int:
        """Send the spike alerts kept in the state of this worker's regions; returns how many.

        A worker that died between writing the state that decided a spike and sending it left the alert
        in the series' outbox: send it now (same id and content; the alerts sink and delivery skip ids
        they have). Only series of this worker's regions: the table also holds standby copies of others'.
        """
        mine = {tp.partition for tp in app.consumer.assignment() if tp.topic in settings.input_topics}
        loaded = ctx.regions.restore_outboxes(
            [
                name
                for name in outbox_series(region_table.data)
                if default_partition(name.split("|", 1)[0].encode(), settings.partitions) in mine
            ]
        )
        outbox = ctx.regions.take_outbox(only=set(loaded))
        await send_outbox(outbox)
        return sum(len(entries) for _, _, entries in outbox)

    async def after_rebalance() -> None:
        """Partitions taken over from a worker that stopped or died: their kept spike alerts go out now,
        not when their series next gets a report (which may be never). The first recovery is
        :func:`announce_ready`'s (it may rebuild state first)."""
        if not ctx.state_ready:
            return
        resent = await send_kept_outboxes()
        if resent:
            log.info("%d spike alert(s) kept in the state of partitions taken over sent", resent)

    app.after_recovery.append(after_rebalance)

    @app.task
    async def announce_ready() -> None:
        await cast(Any, app.tables).recovery.completed.wait()
        if len(region_table.data) == 0 and len(substance_table.data) == 0:
            report = await asyncio.get_running_loop().run_in_executor(None, partial(rebuild_locked, ctx))
            stats.rebuild = report.__dict__
            n = settings.partitions
            region_changes = [(default_partition(r.encode(), n), k, v) for r, k, v in ctx.regions.drain_dirty()]
            substance_changes = [(default_partition(k.encode(), n), k, v) for k, v in ctx.novelty.drain_dirty()]
            pending = await save(region_table, region_changes)
            pending += await save(substance_table, substance_changes)
            await send_all(pending)
            await seal(region_table, region_changes)
            await seal(substance_table, substance_changes)
            log.info("detector state rebuilt from ClickHouse: %s", report)
        else:
            learnt = await asyncio.get_running_loop().run_in_executor(None, partial(learn_names_locked, ctx))
            stats.rebuild = {"names_learnt": learnt}
            log.info("detector state recovered from the changelogs; %d names learnt from ClickHouse", learnt)
            resent = await send_kept_outboxes()
            if resent:
                log.info("%d spike alert(s) kept in state before a restart sent again", resent)
        if settings.gc_freeze:
            # What exists now lives as long as the worker: keep it out of every later collection, and
            # collect the young generation less often (each collection walks the detector state).
            gc.collect()
            gc.freeze()
            gc.set_threshold(50_000, 20, 100)
        ctx.state_ready = True
        metrics.set_ready()
        stats.ready_seconds = time.monotonic() - ctx.started_at
        if ctx.on_ready is not None:
            ctx.on_ready(stats.ready_seconds)

    @app.page("/ready")
    class ReadyView(View):
        async def get(self, request: Request) -> Response:
            # Not ready until detector state is recovered, nor while the watchdog finds a partition stalled
            # after a seek back: an orchestrator's probe then restarts the worker.
            ready = stats.ready_seconds is not None and watch.healthy
            body = {"ready": ready, "stalled": watch.reason() or None, **stats.__dict__}
            return self.json(body, status=200 if ready else 503)

    # A pool of its own: analysts' queries (each up to sql_max_seconds) must never take the default
    # executor's threads, which the sink's ClickHouse calls run on.
    analysts = ThreadPoolExecutor(max_workers=2, thread_name_prefix="analyst-sql")
    sessions = AnalystSessions(settings)

    @app.page("/sql")
    class SqlView(View):
        """Analysts' SELECTs, for commands that cannot open the embedded engine while this process holds it.

        They run on read-only chDB handles of their own, one per thread of a two-thread pool
        (:class:`synthwatch.stream_apps.storage.query.AnalystSessions`), never on the sink's client and never under the
        sink's lock: a slow query cannot stall ingestion.
        """

        async def post(self, request: Request) -> Response:
            refused = refuse_request(request.headers, ctx.web_token, settings.web_allowed_hosts)
            if refused is not None:
                return self.json({"error": refused[1]}, status=refused[0])
            declared = request.headers.get("Content-Length", "0")
            if not declared.isdigit() or int(declared) > settings.sql_max_body_bytes:
                return self.json({"error": f"request over {settings.sql_max_body_bytes} bytes"}, status=413)
            body = await request.read()
            if len(body) > settings.sql_max_body_bytes:
                return self.json({"error": f"request over {settings.sql_max_body_bytes} bytes"}, status=413)
            try:
                payload = json.loads(body)
                sql, parameters = str(payload["sql"]), payload.get("parameters") or None
                if parameters is not None and not isinstance(parameters, dict):
                    raise TypeError("parameters must be an object")
            except (ValueError, KeyError, TypeError) as error:
                return self.json({"error": f'send {{"sql": "SELECT ...", "parameters": {{}}}} ({error})'}, status=400)
            try:
                result = await asyncio.get_running_loop().run_in_executor(
                    analysts, partial(sessions.run, sql, parameters)
                )
            except QueryError as error:
                return self.json({"error": str(error)}, status=400)
            return self.json({"columns": result.columns, "rows": result.rows})

    return app


def learn_names_locked(ctx: WorkerContext) -> int:
    """Teach the resolver the names stored in ClickHouse while holding the client lock."""
    with ctx.sink.lock:
        return learn_names(ctx.client, ctx.intake.resolver, ctx.intake.stored_reporter)


def rebuild_locked(ctx: WorkerContext) -> Any:
    """Rebuild detector state from ClickHouse while holding the client lock."""
    with ctx.sink.lock:
        return rebuild(ctx.client, ctx.regions, ctx.novelty, ctx.intake.resolver, ctx.intake.stored_reporter)
