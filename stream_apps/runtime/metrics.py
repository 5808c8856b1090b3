"""Prometheus metrics of the worker, in its own CollectorRegistry (``synthwatch publish``'s: producers/metrics.py).

Why a registry per object: tests build several workers in one process, and prometheus-client's global
registry would refuse the second set of metrics (or mix their counts). The worker serves its registry
on the Faust web port at ``/metrics`` (:func:`attach_metrics`).

Metric names are part of the contract with ``deploy/prometheus/rules/`` and the pipeline-health
dashboard (``dashboards/pipeline.py``); tests check that every name they use exists here.

Label values are bounded: topics, tables, alert types and severities come from configuration and
schemas; reject reasons are reduced to a short class by
:func:`synthwatch.schemas.reject_reasons.reject_reason` (the full sentence stays in ClickHouse's ``rejects`` table).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)

from synthwatch.schemas.reject_reasons import reject_reason

if TYPE_CHECKING:
    import faust

    from synthwatch.schemas import Alert, Reject

T = TypeVar("T")

#: Event ingested (Kafka timestamp of the message that carried it) -> alert published, in seconds.
ALERT_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
SINK_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SINK_ROWS_BUCKETS = (1, 5, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10000)
GC_PAUSE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_GENERATIONS = ("0", "1", "2")


class KafkaEvent(Protocol):
    """What the helpers read from a Faust ``EventT`` (duck-typed so tests need no broker)."""

    @property
    def message(self) -> Any: ...


def message_source(event: KafkaEvent) -> str:
    """``topic:partition:offset``, the source string the intake agent gives every record."""
    message = event.message
    return f"{message.topic}:{message.partition}:{message.offset}"


def ingest_times(events: Iterable[KafkaEvent], items: Iterable[Any]) -> dict[str, float]:
    """event_id -> Kafka timestamp of the message that carried it, for :meth:`WorkerMetrics.alerts_published`.

    ``items`` are the intake's enriched events (anything with ``event_id`` and ``source``).
    """
    by_source = {message_source(e): float(e.message.timestamp or time.time()) for e in events}
    return {item.event_id: by_source[item.source] for item in items if item.source in by_source}


@dataclass(frozen=True, slots=True)
class PartitionOffsets:
    """One assigned partition: the end of the log and how far this consumer group has committed."""

    topic: str
    partition: int
    end: int
    committed: int
    #: The record at ``committed`` was handed to the agents, and is neither acknowledged, nor in an agent's hand,
    #: nor in an agent's queue: lost between fetch and agent, whatever later records did; the committed offset
    #: cannot move past it (the watchdog's "held" partition; only :mod:`.watchdog` fills it in).
    held: bool = False
    #: Records at or after ``committed`` were handed to the agents since the latest seek: the partition is
    #: not merely waiting for its turn in the fetch (only :mod:`.watchdog` fills it in).
    handed_over: bool = False
    #: Batches the agents reading this topic have taken or finished so far (:attr:`.transport.Consumer.worked`):
    #: while it moves they are working through what was handed over to them (only :mod:`.watchdog` fills it in).
    worked: int = 0
    #: An agent has the record at ``committed`` in hand (taken, not acknowledged yet; only :mod:`.watchdog`
    #: fills it in).
    in_hand: bool = False
    #: Checkpoints completed so far by the agent reading this topic (:attr:`.transport.Consumer.checkpoints`; 0 when
    #: more than one agent reads it: whose checkpoint it was is then unknown; only :mod:`.watchdog` fills it in).
    checkpoints: int = 0

    @property
    def lag(self) -> int:
        return max(self.end - self.committed, 0)


@dataclass
class WorkerStats:
    """Counters since start; exposed on /ready and printed by the CLI (kept by :class:`WorkerMetrics`)."""

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
    failed: str | None = None  # an agent raised: the worker is stopping (:mod:`.supervision`), and why
    ready_seconds: float | None = None
    rebuild: dict[str, Any] = field(default_factory=dict)
    heap_trims: int = 0  # freed heap pages given back to the kernel (stream_apps/runtime/heap.py)
    heap_trim_seconds: float = 0.0  # time those calls took, in all (in their own thread)
    # automatic garbage collections since ready, per generation, and the time they held the interpreter
    gc_collections: list[int] = field(default_factory=lambda: [0, 0, 0])
    gc_seconds: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    gc_longest_seconds: float = 0.0


#: The metrics the process's collection hook reports to (:meth:`WorkerMetrics.watch_collections`).
_watching: WorkerMetrics | None = None


def _on_collection(phase: str, info: dict[str, int]) -> None:
    if _watching is not None:
        _watching.collection(phase, info)


#: Which /ready counter a stage's replayed records add to (:meth:`WorkerMetrics.replayed_records`).
_REPLAYED_STATS = {"intake": "replayed", "novelty": "replayed_sightings"}
#: Which /ready counter a storing agent's new rows add to (:meth:`WorkerMetrics.records_stored`).
_STORED_STATS = {"rejects": "rejects_stored", "alerts": "alerts_stored"}


class WorkerMetrics:
    """The worker's metrics and the helpers its agents call; one instance per worker process.

    Why one object for Prometheus and ``/ready``: the agents record each fact once, through these
    helpers, which keep the Prometheus series and the plain counters ``/ready`` shows (:attr:`stats`,
    a :class:`WorkerStats`) in step. The two are not the same numbers (``/ready`` counts input events,
    raised alerts, sightings; Prometheus counts per topic, published alerts, messages), so neither is
    derived from the other.
    """

    def __init__(self, registry: CollectorRegistry | None = None, *, app_id: str = "synthwatch") -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.info = Info("synthwatch_worker", "The worker's identity.", registry=r)
        self.info.info({"app_id": app_id})
        self.ready = Gauge(
            "synthwatch_worker_ready", "1 once detector state is recovered and batches flow.", registry=r
        )
        self.events_consumed = Counter(
            "synthwatch_events_consumed", "Kafka records consumed, per topic.", ["topic"], registry=r
        )
        self.events_produced = Counter(
            "synthwatch_events_produced", "Kafka records produced and acknowledged, per topic.", ["topic"], registry=r
        )
        self.events_stored = Counter(
            "synthwatch_events_stored", "Rows inserted into ClickHouse, per table.", ["table"], registry=r
        )
        self.duplicates = Counter(
            "synthwatch_duplicates", "Events skipped as already seen or already stored.", registry=r
        )
        self.rejects = Counter(
            "synthwatch_rejects", "Records refused, per stage and reason class.", ["stage", "reason"], registry=r
        )
        self.late_events = Counter(
            "synthwatch_late_events",
            "Late reports kept (stored, flagged late, left out of spike series), per kind.",
            ["kind"],
            registry=r,
        )
        self.replayed = Counter(
            "synthwatch_replayed",
            "Records read again after a restart that detector state held already (skipped), per stage.",
            ["stage"],
            registry=r,
        )
        self.alerts = Counter(
            "synthwatch_alerts", "Alerts published, per type and severity.", ["alert_type", "severity"], registry=r
        )
        self.alert_latency = Histogram(
            "synthwatch_alert_latency_seconds",
            "Triggering event ingested (its Kafka timestamp) -> alert published.",
            ["alert_type"],
            buckets=ALERT_LATENCY_BUCKETS,
            registry=r,
        )
        self.sink_batch_rows = Histogram(
            "synthwatch_sink_batch_rows",
            "Rows per ClickHouse sink call, per table.",
            ["table"],
            buckets=SINK_ROWS_BUCKETS,
            registry=r,
        )
        self.sink_batch_seconds = Histogram(
            "synthwatch_sink_batch_seconds",
            "Duration of a successful ClickHouse sink call, per table.",
            ["table"],
            buckets=SINK_SECONDS_BUCKETS,
            registry=r,
        )
        self.sink_retries = Counter(
            "synthwatch_sink_retries",
            "Failed ClickHouse calls that were retried, per operation.",
            ["operation"],
            registry=r,
        )
        self.sink_failing = Gauge(
            "synthwatch_sink_failing",
            "1 while an operation keeps failing (the agent waits and retries), 0 once it succeeds.",
            ["operation"],
            registry=r,
        )
        self.consumer_lag = Gauge(
            "synthwatch_consumer_lag",
            "Records between the log end and this worker's committed offset, per assigned partition.",
            ["topic", "partition"],
            registry=r,
        )
        self.last_consumed = Gauge(
            "synthwatch_last_consumed_timestamp_seconds",
            "Unix time the worker last consumed an input record, per topic.",
            ["topic"],
            registry=r,
        )
        self.forged = Counter(
            "synthwatch_forged_records",
            "Records on the alerts or sightings topic without a valid worker signature: refused, per topic.",
            ["topic"],
            registry=r,
        )
        self.consumer_stalls = Counter(
            "synthwatch_consumer_stalls",
            "Partitions found with unread records and no committed progress for stall_seconds, then sought back "
            "to their committed offset (the consumer watchdog).",
            ["topic"],
            registry=r,
        )
        self.agent_failures = Counter(
            "synthwatch_agent_failures",
            "Exceptions raised out of an agent, per agent: each stops the worker, which restarts from its "
            "committed offsets (stream_apps/runtime/supervision.py).",
            ["agent"],
            registry=r,
        )
        self.gc_pause = Histogram(
            "synthwatch_gc_pause_seconds",
            "Garbage collections once ready, per generation, and how long each held the worker (every agent waits "
            "meanwhile: alert latency's tail; SYNTHWATCH_GC_THRESHOLDS).",
            ["generation"],
            buckets=GC_PAUSE_BUCKETS,
            registry=r,
        )
        # children made here: the hook takes no metric lock that code it interrupts could hold while allocating
        self._gc_pauses = [self.gc_pause.labels(generation=g) for g in _GENERATIONS]
        self._gc_started = 0.0
        self._lag_labels: set[tuple[str, str]] = set()
        self.failing: set[str] = set()  # operations failing now (sink_failing == 1)
        self.faust_metrics: Any = None  # Faust's own sensor metrics, once attach_metrics made them
        self.stats = WorkerStats()  # what /ready shows

    # --- helpers the agents call ------------------------------------------------------------------

    def consumed(self, events: Iterable[KafkaEvent]) -> None:
        """A batch taken from Kafka (``take_events``): counts per topic and the time input last arrived."""
        counts: dict[str, int] = {}
        for event in events:
            topic = event.message.topic
            counts[topic] = counts.get(topic, 0) + 1
        now = time.time()
        for topic, n in counts.items():
            self.events_consumed.labels(topic=topic).inc(n)
            self.last_consumed.labels(topic=topic).set(now)

    def produced(self, topic: str, n: int = 1) -> None:
        if n:
            self.events_produced.labels(topic=topic).inc(n)

    def stored(self, table: str, n: int) -> None:
        if n:
            self.events_stored.labels(table=table).inc(n)

    def skipped_duplicates(self, n: int) -> None:
        """Events skipped as already seen (region stage) or already stored (sink)."""
        self.stats.duplicates += n
        if n:
            self.duplicates.inc(n)

    def late(self, kind: str, n: int = 1) -> None:
        """Late reports kept; ``kind`` is one of the two event kinds (a bounded label)."""
        self.stats.late += n
        if n:
            self.late_events.labels(kind=kind).inc(n)

    def replayed_records(self, stage: str, n: int) -> None:
        """Records of ``stage`` (``intake`` or ``novelty``) skipped as held by detector state already."""
        name = _REPLAYED_STATS.get(stage)
        if name is not None:
            setattr(self.stats, name, getattr(self.stats, name) + n)
        if n:
            self.replayed.labels(stage=stage).inc(n)

    def rejected(self, rejects: Iterable[Reject]) -> None:
        """Records refused (sent to the rejects topic), per stage and reason class.

        Counted per reason, then classified and added once per label set: a label lookup and a classification
        per reject made a batch of 10,000 invalid reports hold the event loop ~40 ms in one piece here, the
        batch's longest hold once it gave turns between slices (:mod:`.agents.intake`)."""
        by_reason: dict[tuple[str, str], int] = {}
        for reject in rejects:
            key = (reject.stage, reject.reason)
            by_reason[key] = by_reason.get(key, 0) + 1
        by_label: dict[tuple[str, str], int] = {}
        for (stage, reason), n in by_reason.items():
            label = (stage, reject_reason(reason))
            by_label[label] = by_label.get(label, 0) + n
        for (stage, reason_class), n in by_label.items():
            self.stats.rejected += n
            self.rejects.labels(stage=stage, reason=reason_class).inc(n)

    def records_stored(self, what: str, n: int) -> None:
        """New rows a storing agent (``rejects``, ``alerts``) inserted."""
        self.stored(what, n)
        name = _STORED_STATS.get(what)
        if name is not None:
            setattr(self.stats, name, getattr(self.stats, name) + n)

    def events_checkpointed(self, events: int, lab_detections: int, border_seizures: int, already_stored: int) -> None:
        """One intake checkpoint done: ``events`` input events acknowledged, their new rows per table and the
        ones skipped as stored already."""
        self.stats.checkpointed += events
        self.stored("lab_detections", lab_detections)
        self.stored("border_seizures", border_seizures)
        self.skipped_duplicates(already_stored)
        self.stats.stored += lab_detections + border_seizures

    def intake_batch(self, events: int, sightings: int) -> None:
        """One intake batch processed: ``events`` input events, ``sightings`` sightings sent on."""
        self.stats.consumed += events
        self.stats.intake_batches += 1
        self.stats.sightings += sightings

    def sightings_processed(self, n: int) -> None:
        """Sightings the novelty stage read (those it skipped as replayed included)."""
        self.stats.sightings_processed += n

    def alerts_raised(self, n: int) -> None:
        """Alerts a stage decided (spike alerts are published later, from the outbox)."""
        self.stats.alerts_raised += n

    def refused_forged(self, topic: str, n: int = 1) -> None:
        """Records on ``topic`` without a valid worker signature, refused."""
        self.stats.forged += n
        self.forged.labels(topic=topic).inc(n)

    def agent_failed(self, agent: str, reason: str) -> None:
        """``agent`` raised: counted, and the worker is not ready from now on (it is stopping)."""
        self.agent_failures.labels(agent=agent).inc()
        if self.stats.failed is None:
            self.stats.failed = reason
        self.set_ready(False)

    def consumer_stalled(self, topic: str) -> None:
        """The watchdog found a partition of ``topic`` stalled and sought it back."""
        self.stats.consumer_stalls += 1
        self.consumer_stalls.labels(topic=topic).inc()

    def alerts_published(
        self,
        alerts: Iterable[Alert],
        ingested_at: float | Mapping[str, float],
        published_at: float | None = None,
    ) -> None:
        """Count alerts and observe their latency once their records are acknowledged by Kafka.

        ``ingested_at``: one Kafka timestamp for the batch, or event_id -> timestamp
        (:func:`ingest_times`); an alert's triggering event is its newest evidence present there.
        """
        published_at = time.time() if published_at is None else published_at
        fallback = min(ingested_at.values(), default=published_at) if isinstance(ingested_at, Mapping) else ingested_at
        for alert in alerts:
            self.alerts.labels(alert_type=alert.alert_type, severity=alert.severity).inc()
            if isinstance(ingested_at, Mapping):
                known = [ingested_at[e] for e in alert.evidence_event_ids if e in ingested_at]
                started = max(known) if known else fallback
            else:
                started = ingested_at
            self.alert_latency.labels(alert_type=alert.alert_type).observe(max(published_at - started, 0.0))

    @contextmanager
    def sink_batch(self, table: str, rows: int) -> Iterator[None]:
        """Time one successful sink call (``with metrics.sink_batch("alerts", len(batch)): ...``)."""
        started = time.perf_counter()
        yield
        self.sink_batch_seconds.labels(table=table).observe(time.perf_counter() - started)
        self.sink_batch_rows.labels(table=table).observe(rows)

    def timed_call(self, table: str, rows: int, call: Callable[[], T]) -> Callable[[], T]:
        """``call`` timed as one sink batch when it succeeds; for ``with_retries(..., metrics.timed_call(...))``."""

        def run() -> T:
            with self.sink_batch(table, rows):
                return call()

        return run

    def sink_retry(self, operation: str) -> None:
        """A ClickHouse call failed and will be retried."""
        self.stats.sink_retries += 1
        self.sink_retries.labels(operation=operation).inc()
        self.sink_failing.labels(operation=operation).set(1)
        self.failing.add(operation)

    def sink_recovered(self, operation: str) -> None:
        """The operation succeeded (after retries or not)."""
        self.sink_failing.labels(operation=operation).set(0)
        self.failing.discard(operation)

    def set_ready(self, ready: bool = True) -> None:
        self.ready.set(1 if ready else 0)

    def watch_collections(self) -> None:
        """Time every garbage collection from now on (:meth:`collection`), when the worker is ready; one hook per
        process: a later worker's metrics (tests run several in one process) take it over."""
        global _watching
        _watching = self
        if _on_collection not in gc.callbacks:
            gc.callbacks.append(_on_collection)

    def collection(self, phase: str, info: dict[str, int]) -> None:
        """``gc.callbacks`` hook: a collection starting or done (in whichever thread allocated)."""
        if phase == "start":
            self._gc_started = time.perf_counter()
            return
        seconds = time.perf_counter() - self._gc_started
        generation = info["generation"]
        stats = self.stats
        stats.gc_collections[generation] += 1
        stats.gc_seconds[generation] += seconds
        stats.gc_longest_seconds = max(stats.gc_longest_seconds, seconds)
        self._gc_pauses[generation].observe(seconds)

    def heap_trimmed(self, seconds: float) -> None:
        """One ``malloc_trim`` call done (:mod:`.heap`), taking ``seconds`` (called from its own thread)."""
        self.stats.heap_trims += 1
        self.stats.heap_trim_seconds += seconds

    def set_consumer_lag(self, offsets: Iterable[PartitionOffsets]) -> None:
        """Replace the lag series: partitions no longer assigned (after a rebalance) disappear."""
        current: set[tuple[str, str]] = set()
        for item in offsets:
            labels = (item.topic, str(item.partition))
            current.add(labels)
            self.consumer_lag.labels(*labels).set(item.lag)
        for labels in self._lag_labels - current:
            self.consumer_lag.remove(*labels)
        self._lag_labels = current

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format (what ``/metrics`` serves)."""
        return generate_latest(self.registry)


# --- Faust wiring ------------------------------------------------------------------------------------

_FAUST_INTERNAL = ("-changelog", "__assignor", "-repartition")


async def partition_offsets(app: faust.App, topics: Collection[str] | None = None) -> list[PartitionOffsets]:
    """End and committed offsets of the partitions assigned to this worker's consumer.

    End: the larger of the brokers' answer to ListOffsets (so partitions paused by back-pressure, when
    ClickHouse is down and the stream buffer is full, still show their growing lag) and the highwater
    of the last fetch. Committed:
    what this worker committed, else its fetch position (right after start, the committed offset).
    Changelog and other Faust-internal topics are left out: they are not consumed through commits.
    """
    consumer: Any = app.consumer
    monitor: Any = app.monitor
    assigned = sorted(
        tp
        for tp in consumer.assignment()
        if (tp.topic in topics if topics is not None else not any(m in tp.topic for m in _FAUST_INTERNAL))
    )
    try:
        ends = dict(await consumer.highwaters(*assigned)) if assigned else {}
    except Exception:  # a rebalance or a broker hiccup: fall back to what the fetcher saw
        ends = {}
    found = []
    for tp in assigned:
        known = [offset for offset in (ends.get(tp), monitor.tp_end_offsets.get(tp)) if offset is not None]
        end = max(known) if known else None  # never below what the fetcher saw (Tansu's ListOffsets lags it)
        committed = monitor.tp_committed_offsets.get(tp)
        if committed is None:
            try:
                committed = await consumer.position(tp)
            except Exception:  # revoked meanwhile
                committed = None
        if end is not None and committed is not None:
            found.append(PartitionOffsets(tp.topic, tp.partition, int(end), int(committed)))
    return found


def attach_metrics(
    app: faust.App,
    metrics: WorkerMetrics,
    *,
    topics: Collection[str] | None = None,
    lag_interval: float = 10.0,
    faust_sensor: bool = True,
) -> None:
    """Serve ``metrics`` at ``/metrics`` on the worker's web port and keep consumer lag up to date.

    With ``faust_sensor``, Faust's own Prometheus monitor (messages in per topic, send latency,
    commit latency, rebalances, offsets; prefix ``faust_``) records into the same registry. Call
    before the worker starts: the monitor is picked up when the app's services start.
    """
    from faust import web

    if faust_sensor:
        from faust.sensors.prometheus import FaustMetrics, PrometheusMonitor

        if metrics.faust_metrics is None:
            metrics.faust_metrics = FaustMetrics.create(metrics.registry, "faust")
        app.monitor = PrometheusMonitor(metrics=metrics.faust_metrics)

    @app.page("/metrics")
    async def metrics_page(self: web.View, request: web.Request) -> web.Response:
        return self.bytes(metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    @app.timer(lag_interval, name="synthwatch.metrics.consumer_lag")
    async def update_consumer_lag() -> None:
        metrics.set_consumer_lag(await partition_offsets(app, topics))


def metric_names(registry: CollectorRegistry) -> set[str]:
    """Every series name the registry can expose (``_total``, ``_bucket``... included), children or not."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("_sum", "_count", "_created"),
        "info": ("_info",),
        "gauge": ("",),
    }
    return {family.name + suffix for family in registry.collect() for suffix in suffixes.get(family.type, ("",))}
