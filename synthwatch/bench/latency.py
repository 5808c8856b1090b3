"""Alert latency at a steady rate: report handed to the producer -> alert read from the alerts topic."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from synthwatch.bench.workload import bench_regions, bench_substances, lab_line, percentile, seizure_line
from synthwatch.settings import Settings
from synthwatch.stack.broker import high_watermarks

if TYPE_CHECKING:
    from aiokafka import AIOKafkaConsumer, TopicPartition


@dataclass(frozen=True)
class LatencyStream:
    """Where the latency reports continue a ``keyed_lines`` stream: its start, step and next index."""

    prefix: str
    start: datetime
    step: timedelta
    first: int


@dataclass
class LatencyResult:
    sent: int = 0
    seconds: float = 0.0
    alerts: int = 0
    matched: list[float] = field(default_factory=list)
    by_type: dict[str, int] = field(default_factory=dict)
    #: The matched latencies per alert type: spike alerts wait for the checkpoint that writes the state which
    #: decided them (docs/performance.md), the others go out with their batch; the tail is one or the other.
    matched_by_type: dict[str, list[float]] = field(default_factory=dict)
    #: Where each matched alert's time went, per alert type and hop (seconds), from the Kafka CreateTime
    #: stamps the worker's producer puts on the records it sends (same machine, same wall clock):
    #: "intake" = report handed to the producer -> its sighting sent by the intake agent (input fetch, batch,
    #: region stage); "novelty" = sighting sent -> alert sent (sightings fetch, novelty stage);
    #: "to alert" = report handed over -> alert sent (spikes: intake, then the checkpoint and its outbox);
    #: "reader" = alert sent -> read here (producer flush, alerts fetch: the observer's own share).
    hops: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def percentile(self, q: float, alert_type: str | None = None) -> float:
        """The ``q``-quantile (``q`` in [0, 1]) of the matched latencies (of one alert type), by nearest rank;
        NaN when none."""
        values = self.matched if alert_type is None else self.matched_by_type.get(alert_type, [])
        return percentile(values, q * 100, nearest_rank=True)

    def per_type(self) -> dict[str, dict[str, float]]:
        """p50, p99 and max (seconds) and the count of matched alerts, per alert type."""
        return {
            kind: {
                "alerts": float(len(values)),
                "p50": self.percentile(0.5, kind),
                "p99": self.percentile(0.99, kind),
                "max": max(values),
            }
            for kind, values in sorted(self.matched_by_type.items())
        }

    def hop_table(self) -> dict[str, dict[str, dict[str, float]]]:
        """p50, p99 and max (seconds) of each hop, per alert type (see ``hops``)."""
        return {
            kind: {
                hop: {
                    "p50": percentile(values, 50, nearest_rank=True),
                    "p99": percentile(values, 99, nearest_rank=True),
                    "max": max(values),
                }
                for hop, values in hops.items()
                if values
            }
            for kind, hops in sorted(self.hops.items())
        }

    def hop(self, kind: str, name: str, seconds: float) -> None:
        self.hops.setdefault(kind, {}).setdefault(name, []).append(seconds)


async def start_at_end(consumer: AIOKafkaConsumer, servers: str, partitions: list[TopicPartition]) -> None:
    """Position the assigned ``consumer`` after the last record of each partition: it reads only what is sent later.

    Why not ``seek_to_end``: Tansu 0.6 answers ListOffsets "latest" inside the last record batch (see
    :func:`.high_watermarks`), so the latency phase read the rest of the alerts topic's last batches, spike
    alerts the end-to-end phase's last checkpoint had sent seconds before, as alerts of its own.
    """
    marks = await asyncio.to_thread(high_watermarks, servers, sorted({tp.topic for tp in partitions}))
    missing = [f"{tp.topic}:{tp.partition}" for tp in partitions if tp not in marks]
    if missing:
        raise RuntimeError(f"no high watermark for {', '.join(missing)}: is the broker at {servers} answering fetches?")
    for tp in partitions:
        consumer.seek(tp, marks[tp])


async def _latency_run(
    settings: Settings, servers: str, rate: int, seconds: int, novel_every: int, stream: LatencyStream
) -> LatencyResult:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    regions, substances = bench_regions(100), bench_substances(50)
    result = LatencyResult()
    published: dict[str, float] = {}
    handed: dict[str, float] = {}  # event id -> wall clock when handed to the producer (to compare with CreateTime)
    sighted: dict[str, float] = {}  # event id -> CreateTime of the sightings record that carried it (seconds)
    # A short fetch wait: Tansu answers a waiting fetch when the wait ends, not when data arrives, and the
    # observer must not add its own delay to what it measures (its share is the "reader" hop: 10 ms, not
    # 20, halves it; shorter would poll the broker on the machine it measures more than 100 times a second).
    consumer = AIOKafkaConsumer(bootstrap_servers=servers, enable_auto_commit=False, fetch_max_wait_ms=10)
    await consumer.start()
    await consumer._client.force_metadata_update()
    partitions = [
        TopicPartition(topic, p)
        for topic in (settings.topic_alerts, settings.topic_sightings)
        for p in sorted(consumer.partitions_for_topic(topic) or {0})
    ]
    consumer.assign(partitions)
    await start_at_end(consumer, servers, partitions)
    producer = AIOKafkaProducer(bootstrap_servers=servers, acks="all", linger_ms=5)
    await producer.start()

    async def collect(stop: asyncio.Event) -> None:
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=100)
            now, wall = time.monotonic(), time.time()
            for tp, records in batches.items():
                if tp.topic == settings.topic_sightings:
                    for record in records:
                        for sighting in json.loads(record.value or b"[]"):
                            sighted.setdefault(str(sighting.get("event_id")), record.timestamp / 1000)
                    continue
                for record in records:
                    alert = json.loads(record.value or b"{}")
                    result.alerts += 1
                    kind = str(alert.get("alert_type"))
                    result.by_type[kind] = result.by_type.get(kind, 0) + 1
                    evidence = [e for e in alert.get("evidence_event_ids", []) if e in published]
                    sent_at = [published[e] for e in evidence]
                    if sent_at:  # the newest evidence is the report that made the alert true
                        result.matched.append(now - max(sent_at))
                        result.matched_by_type.setdefault(kind, []).append(now - max(sent_at))
                        newest = max(evidence, key=published.__getitem__)
                        alert_sent = record.timestamp / 1000
                        result.hop(kind, "to alert", alert_sent - handed[newest])
                        if newest in sighted:
                            result.hop(kind, "intake", sighted[newest] - handed[newest])
                            result.hop(kind, "novelty", alert_sent - sighted[newest])
                        result.hop(kind, "reader", wall - alert_sent)

    stop = asyncio.Event()
    collector = asyncio.create_task(collect(stop))
    pending: list[asyncio.Future[Any]] = []
    tick = 0.01
    per_tick = rate * tick
    started = time.monotonic()
    i = 0
    while time.monotonic() - started < seconds:
        due = int((time.monotonic() - started) / tick * per_tick) + 1
        while i < due:
            n = stream.first + i  # the keys and the event time continue the stream the worker has seen
            country, region = regions[n % len(regions)]
            novel = novel_every > 0 and i % novel_every == 0
            name = f"Benchnovel {stream.prefix} {i}" if novel else substances[(n // len(regions)) % len(substances)]
            event_id = f"{stream.prefix}-{i}"
            at = (stream.start + stream.step * n).isoformat()
            line = (lab_line if (n // len(regions)) % 2 else seizure_line)(event_id, country, region, name, at, n)
            topic = settings.topic_lab_detections if (n // len(regions)) % 2 else settings.topic_border_seizures
            published[event_id], handed[event_id] = time.monotonic(), time.time()
            pending.append(await producer.send(topic, key=region.encode(), value=line.encode()))
            i += 1
        await asyncio.sleep(tick)
    result.sent, result.seconds = i, time.monotonic() - started
    await asyncio.gather(*pending)
    await producer.stop()
    await asyncio.sleep(5.0)  # the last alerts of the run
    stop.set()
    await collector
    await consumer.stop()
    return result


def hop_lines(result: LatencyResult) -> list[str]:
    """One line per alert type: p50/p99/max of each hop in ms (where an alert's time goes)."""

    def ms(value: float) -> str:
        return f"{value * 1000:,.0f}"

    return [
        f"{kind}: "
        + "; ".join(f"{hop} {ms(v['p50'])}/{ms(v['p99'])}/{ms(v['max'])}" for hop, v in hops.items())
        + " ms (p50/p99/max)"
        for kind, hops in result.hop_table().items()
    ]


def alert_latency(
    settings: Settings, servers: str, rate: int, seconds: int, stream: LatencyStream, novel_every: int = 50
) -> LatencyResult:
    """Send ``rate`` events/s for ``seconds``; every ``novel_every``-th names a never-seen substance.

    The reports continue ``keyed_lines`` (same keys, same event-time density), so the detectors see
    a steady stream, not a jump. Latency of an alert = when it is read from the alerts topic - when
    its newest evidence report was handed to the producer (one monotonic clock, this process).
    New-substance alerts go the longest way: intake -> sightings topic -> novelty -> alerts topic.
    """
    return asyncio.run(_latency_run(settings, servers, rate, seconds, novel_every, stream))
