"""``synthwatch bench pipeline``: the whole pipeline's numbers beside its two references, in one run.

Why one run on one broker: the machine is shared and noisy, so only ratios measured minutes apart on
the same messages mean something. The references bound what the pipeline can reach: raw aiokafka
consumption with JSON decoding (the transport's limit) and a bare Faust agent that decodes and counts
(the framework's floor, :mod:`synthwatch.bench.bare_faust`). The pipeline is measured as users see it:
``synthwatch worker`` processes, ``Publisher.publish_records`` for the simulated stream, the worker's
own ``/ready`` counters and ``/sql`` for what ClickHouse holds.

Phases: worker start-up; end-to-end throughput of a simulated stream (first publish -> last event
stored); the references on the same topics; alert latency at a steady rate (report published -> alert
on the alerts topic); RSS after ``rss_events`` events over 5,000 region x substance keys; the bulk path
(``ingest_history``) on the same file; scale-out (one worker, then two sharing a consumer group).
``python -m synthwatch.bench.pipeline --help`` runs it without the CLI; ``--experiments`` measures
the changes proposed in docs/performance.md on the real worker.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse, urlunparse

from pydantic import SecretStr
from rich.console import Console
from rich.table import Table

from synthwatch.bench.bare_faust import FLOOR, FLOOR_EXPERIMENTS, FloorResult, FloorVariant, run_bare_agent
from synthwatch.consoles import command_console
from synthwatch.settings import Settings
from synthwatch.stack.broker import EmbeddedBroker, ensure_topics
from synthwatch.stackfile import read_web_token
from synthwatch.stream_apps.storage.query import QueryResult, execute_remote

# --- worker variants: the shipped settings, and the other values of the settings that cost or save time ---

#: Settings (environment of the worker process) that stand for another value of a setting in settings.py;
#: every variant is the shipped code, so what ``--experiments`` measures is what a user can configure.
T = TypeVar("T")

WORKER_ENV: dict[str, dict[str, str]] = {
    "batch-2000": {"SYNTHWATCH_SINK_BATCH_SIZE": "2000"},  # the sink's default before 10,000
    "window-0.1": {"SYNTHWATCH_SINK_BATCH_SECONDS": "0.1"},
    "window-0.5": {"SYNTHWATCH_SINK_BATCH_SECONDS": "0.5"},
    "fetch-wait-1500": {"SYNTHWATCH_CONSUMER_FETCH_MAX_WAIT_MS": "1500"},  # Faust's fixed value
    "fetch-wait-20": {"SYNTHWATCH_CONSUMER_FETCH_MAX_WAIT_MS": "20"},
    "fetch-wait-50": {"SYNTHWATCH_CONSUMER_FETCH_MAX_WAIT_MS": "50"},
    "no-gc-freeze": {"SYNTHWATCH_GC_FREEZE": "false"},
    "uvloop": {"SYNTHWATCH_EVENT_LOOP": "uvloop"},
    "asyncio": {"SYNTHWATCH_EVENT_LOOP": "asyncio"},
    "producer-16k": {"SYNTHWATCH_PRODUCER_BATCH_BYTES": "16384"},  # Faust's default
    "buffers": {"SYNTHWATCH_STREAM_BUFFER_MAXSIZE": "32768", "SYNTHWATCH_CONSUMER_MAX_POLL_RECORDS": "5000"},
    "take-batches": {"SYNTHWATCH_AGENT_BATCHES": "take"},  # Faust's noack_take, the previous batching
    "no-linger": {"SYNTHWATCH_BATCH_LINGER_SECONDS": "0"},
    "checkpoint-0.25": {"SYNTHWATCH_CHECKPOINT_SECONDS": "0.25"},
}

#: What ``--experiments`` compares (backlog drain): each a combination of the above.
EXPERIMENTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("shipped settings", ()),
    ("batches by Faust's noack_take (0.25 s window)", ("take-batches",)),
    ("channel batches without linger", ("no-linger",)),
    ("checkpoint every 0.25 s", ("checkpoint-0.25",)),
    ("fetch wait 20 ms", ("fetch-wait-20",)),
    ("producer batches of 16 KiB (Faust's default)", ("producer-16k",)),
    ("sink batch 2,000 (the previous default)", ("batch-2000",)),
    ("without gc.freeze", ("no-gc-freeze",)),
    ("uvloop instead of asyncio's loop", ("uvloop",)),
    ("stream buffer 32768, 5000 records per poll", ("buffers",)),
)


def worker_command() -> list[str]:
    """argv of ``synthwatch worker`` (variants differ only in their environment)."""
    return [sys.executable, "-m", "synthwatch.cli.main", "worker"]


# --- the stack this benchmark runs ------------------------------------------------------------------------


@dataclass
class Topics:
    """One set of topic names (fresh per phase that needs its own)."""

    suffix: str
    labs: str = ""
    seizures: str = ""
    rejects: str = ""
    alerts: str = ""
    sightings: str = ""
    # The worker key the phase's workers and publisher share (the worker refuses rejects it cannot verify,
    # and each bench worker has a data directory of its own, so none would find the publisher's key).
    worker_key: str = field(default_factory=lambda: secrets.token_hex(32), repr=False)

    def __post_init__(self) -> None:
        s = self.suffix
        self.labs, self.seizures = self.labs or f"bench-labs-{s}", self.seizures or f"bench-seizures-{s}"
        self.rejects, self.alerts = f"bench-rejects-{s}", f"bench-alerts-{s}"
        self.sightings = f"bench-sightings-{s}"

    @property
    def inputs(self) -> tuple[str, str]:
        return (self.labs, self.seizures)

    def settings(self, base: Settings, **changes: Any) -> Settings:
        return base.model_copy(
            update={
                "topic_lab_detections": self.labs,
                "topic_border_seizures": self.seizures,
                "topic_rejects": self.rejects,
                "topic_alerts": self.alerts,
                "topic_sightings": self.sightings,
                "worker_key": base.worker_key or SecretStr(self.worker_key),
                **changes,
            }
        )


@dataclass
class BenchWorker:
    """A ``synthwatch worker`` child process and how to read its counters and its ClickHouse."""

    process: subprocess.Popen[bytes]
    data_dir: Path
    log_path: Path
    web_url: str = ""
    ready_wall: float = 0.0  # process start -> ready, as seen from outside (Python start-up included)
    ready_reported: float = 0.0  # the worker's own figure (from run_worker's start)

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.web_url}/ready", timeout=10) as response:
            stats: dict[str, Any] = json.loads(response.read())
            return stats

    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> QueryResult:
        """A read statement through the worker's /sql endpoint, with the token the worker wrote."""
        token = read_web_token(Settings(data_dir=self.data_dir))
        return execute_remote(self.web_url, sql, parameters, token=token)

    def count(self, sql: str) -> int:
        return int(self.query(sql).rows[0][0])

    def memory_kib(self) -> dict[str, int]:
        """VmRSS and VmHWM (peak RSS) of the worker process, in KiB."""
        from synthwatch.bench.memory import proc_status  # bench_memory imports this module's workload helpers

        return proc_status(self.process.pid, ("VmRSS", "VmHWM"))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def _clickhouse_url(base: Settings, database: str) -> str | None:
    """A server URL with its own database for one worker; None for the embedded engine (own directory)."""
    if base.clickhouse_url is None or base.clickhouse_is_embedded:
        return None
    parts = urlparse(base.clickhouse_url)
    return urlunparse(parts._replace(path=f"/{database}"))


def start_worker(
    settings: Settings,
    bootstrap_servers: str,
    data_dir: Path,
    changes: Sequence[str] = (),
    app_id: str | None = None,
    timeout: float = 120.0,
    extra_env: dict[str, str] | None = None,
) -> BenchWorker:
    """Start one worker (own data dir, own embedded engine or database) and wait until it is ready."""
    from synthwatch.stackfile import read_stack

    data_dir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNTHWATCH_")}
    env.update(
        SYNTHWATCH_DATA_DIR=str(data_dir),
        SYNTHWATCH_KAFKA_BOOTSTRAP_SERVERS=bootstrap_servers,
        SYNTHWATCH_APP_ID=app_id or settings.app_id,
        SYNTHWATCH_TOPIC_LAB_DETECTIONS=settings.topic_lab_detections,
        SYNTHWATCH_TOPIC_BORDER_SEIZURES=settings.topic_border_seizures,
        SYNTHWATCH_TOPIC_REJECTS=settings.topic_rejects,
        SYNTHWATCH_TOPIC_ALERTS=settings.topic_alerts,
        SYNTHWATCH_TOPIC_SIGHTINGS=settings.topic_sightings,
        SYNTHWATCH_PARTITIONS=str(settings.partitions),
        SYNTHWATCH_WEB_PORT="0",
    )
    if settings.worker_key is not None:  # the key the phase's publisher signs its rejects with
        env["SYNTHWATCH_WORKER_KEY"] = settings.worker_key.get_secret_value()
    url = _clickhouse_url(settings, f"bench_{data_dir.name.replace('-', '_')}")
    if url is not None:
        env["SYNTHWATCH_CLICKHOUSE_URL"] = url
    for name in changes:
        env.update(WORKER_ENV.get(name, {}))
    env.update(extra_env or {})
    log_path = data_dir / "worker.log"
    started = time.monotonic()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(worker_command(), env=env, stdout=log, stderr=subprocess.STDOUT)
    worker = BenchWorker(process, data_dir, log_path)
    own = Settings(data_dir=data_dir)
    while time.monotonic() - started < timeout:
        if process.poll() is not None:
            raise RuntimeError(f"worker exited with {process.returncode}: {_tail(log_path)}")
        info = read_stack(own)
        if info is not None and info.pid == process.pid and info.ready_seconds is not None:
            worker.ready_wall = time.monotonic() - started
            worker.ready_reported = info.ready_seconds
            worker.web_url = info.web_url
            return worker
        time.sleep(0.05)
    worker.stop()
    raise RuntimeError(f"worker not ready after {timeout:.0f} s: {_tail(log_path)}")


def _tail(path: Path, size: int = 2000) -> str:
    with contextlib.suppress(OSError):
        return path.read_bytes()[-size:].decode(errors="replace")
    return ""


def wait_consumed(workers: Sequence[BenchWorker], total: int, timeout: float, interval: float = 0.1) -> float:
    """Poll until the workers together have consumed and stored ``total`` input events; returns when.

    Stored: the events' checkpoint is done (rows in ClickHouse, detector state written, offsets
    acknowledged), not merely taken from Kafka.
    """
    deadline = time.monotonic() + timeout
    consumed = 0
    while time.monotonic() < deadline:
        consumed = sum(w.stats()["checkpointed"] for w in workers)
        if consumed >= total:
            return time.perf_counter()
        for w in workers:
            if w.process.poll() is not None:
                raise RuntimeError(f"worker exited with {w.process.returncode}: {_tail(w.log_path)}")
        time.sleep(interval)
    raise RuntimeError(f"only {consumed} of {total} events consumed after {timeout:.0f} s")


def wait_idle(workers: Sequence[BenchWorker], timeout: float, interval: float = 0.2) -> None:
    """Poll until the novelty stage has processed every sighting the intake stage sent.

    After a backlog the intake agent is done first: Faust delivers one consumer's records in fetch
    order, so the sightings wait behind the input backlog. A latency phase that starts before they
    are processed would measure that backlog, not the steady rate.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = [w.stats() for w in workers]
        if sum(s["sightings_processed"] for s in stats) >= sum(s["sightings"] for s in stats):
            return
        time.sleep(interval)
    raise RuntimeError(f"sightings still unprocessed after {timeout:.0f} s")


def wait_first_consumed(workers: Sequence[BenchWorker], timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(w.stats()["consumed"] > 0 for w in workers):
            return time.perf_counter()
        time.sleep(0.05)
    raise RuntimeError("no worker consumed anything")


# --- input streams ----------------------------------------------------------------------------------------


def simulated_lines(events: int, seed: int = 5, start: date = date(2025, 1, 1)) -> list[str]:
    """About ``events`` simulated lines over 30 days (bad lines, re-sends and late reports included)."""
    from synthwatch.producers.simulate import SimulationConfig, simulate

    per_day = min(100_000.0, max(10.0, events / 30))
    return simulate(SimulationConfig(days=30, seed=seed, start=start, events_per_day=per_day)).lines


def bench_regions(count: int = 100) -> list[tuple[str, str]]:
    """``count`` (country, region) pairs the wire contract accepts, spread over ten countries."""
    import pycountry

    from synthwatch.schemas import WireError, parse_event

    countries = ("FR", "DE", "ES", "IT", "PL", "NL", "BE", "PT", "GB", "US")
    per_country: list[list[tuple[str, str]]] = []
    for country in countries:
        valid = []
        for sub in sorted(pycountry.subdivisions.get(country_code=country) or [], key=lambda s: s.code):
            line = _seizure_line("probe", country, sub.code, "Cocaine", "2025-01-01T00:00:00+00:00", 0)
            try:
                parse_event(line)
            except WireError:
                continue
            valid.append((country, sub.code))
        per_country.append(valid)
    found: list[tuple[str, str]] = []
    for i in range(max(len(v) for v in per_country)):
        found += [valid[i] for valid in per_country if i < len(valid)]
    return found[:count]


def bench_substances(count: int = 50) -> list[str]:
    from synthwatch.catalogue import shipped_catalogue

    return [entry.name for entry in shipped_catalogue()[:count]]


def _seizure_line(event_id: str, country: str, region: str, name: str, at: str, i: int) -> str:
    return (
        f'{{"event_id":"{event_id}","kind":"border_seizure","occurred_at":"{at}","country":"{country}",'
        f'"region":"{region}","substance":{{"name":"{name}"}},"agency":"Bench customs","seizure_id":"S{i}",'
        f'"border_point":"Bench port","conveyance":"land","quantity":{{"value":{1 + i % 97}.5,"unit":"g"}}}}'
    )


def _lab_line(event_id: str, country: str, region: str, name: str, at: str, i: int) -> str:
    return (
        f'{{"event_id":"{event_id}","kind":"lab_detection","occurred_at":"{at}","country":"{country}",'
        f'"region":"{region}","substance":{{"name":"{name}"}},"lab_id":"LAB-B","sample_id":"B{i}",'
        f'"sample_type":"seized_material","method":"GC-MS","purity_pct":{i % 100}.0}}'
    )


def keyed_lines(
    count: int,
    prefix: str,
    start: datetime,
    span: timedelta,
    regions: Sequence[tuple[str, str]],
    substances: Sequence[str],
) -> Iterator[str]:
    """``count`` valid events cycling over regions x substances, in time order (a million in seconds).

    Region = i mod R, substance = (i div R) mod S, so every key recurs every R x S events; the kind
    alternates per block of R, so both input topics carry traffic.
    """
    step = span / max(count, 1)
    n_regions, n_substances = len(regions), len(substances)
    for i in range(count):
        country, region = regions[i % n_regions]
        name = substances[(i // n_regions) % n_substances]
        line = _lab_line if (i // n_regions) % 2 else _seizure_line
        yield line(f"{prefix}-{i}", country, region, name, (start + step * i).isoformat(), i)


def publish_lines(settings: Settings, servers: str, lines: Iterator[str], source: str = "bench") -> Any:
    """``Publisher.publish_records`` (validation, keys by region, acks counted) over ``lines``."""
    from synthwatch.producers.publisher import Publisher
    from synthwatch.producers.readers import InputRecord

    with Publisher(settings, servers) as publisher:
        return publisher.publish_records(
            InputRecord(source=f"{source}:{i}", raw=line) for i, line in enumerate(lines, start=1)
        )


# --- references ---------------------------------------------------------------------------------------


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
    count, seconds = asyncio.run(_raw_consume(servers, topics, expect, timeout))
    return FloorResult("raw aiokafka + json.loads", count, seconds)


# --- alert latency ----------------------------------------------------------------------------------------


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

    def percentile(self, q: float) -> float:
        if not self.matched:
            return math.nan
        ordered = sorted(self.matched)
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


async def _latency_run(
    settings: Settings, servers: str, rate: int, seconds: int, novel_every: int, stream: LatencyStream
) -> LatencyResult:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    regions, substances = bench_regions(100), bench_substances(50)
    result = LatencyResult()
    published: dict[str, float] = {}
    # A short fetch wait: Tansu answers a waiting fetch when the wait ends, not when data arrives, and the
    # observer must not add its own delay to what it measures.
    consumer = AIOKafkaConsumer(bootstrap_servers=servers, enable_auto_commit=False, fetch_max_wait_ms=20)
    await consumer.start()
    await consumer._client.force_metadata_update()
    known = consumer.partitions_for_topic(settings.topic_alerts) or {0}
    partitions = [TopicPartition(settings.topic_alerts, p) for p in sorted(known)]
    consumer.assign(partitions)
    await consumer.seek_to_end(*partitions)
    for tp in partitions:  # resolve the end offsets now, so nothing sent later is skipped
        await consumer.position(tp)
    producer = AIOKafkaProducer(bootstrap_servers=servers, acks="all", linger_ms=5)
    await producer.start()

    async def collect(stop: asyncio.Event) -> None:
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=100)
            now = time.monotonic()
            for records in batches.values():
                for record in records:
                    alert = json.loads(record.value or b"{}")
                    result.alerts += 1
                    kind = str(alert.get("alert_type"))
                    result.by_type[kind] = result.by_type.get(kind, 0) + 1
                    sent_at = [published[e] for e in alert.get("evidence_event_ids", []) if e in published]
                    if sent_at:  # the newest evidence is the report that made the alert true
                        result.matched.append(now - max(sent_at))

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
            line = (_lab_line if (n // len(regions)) % 2 else _seizure_line)(event_id, country, region, name, at, n)
            topic = settings.topic_lab_detections if (n // len(regions)) % 2 else settings.topic_border_seizures
            published[event_id] = time.monotonic()
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


# --- ingest-history -----------------------------------------------------------------------------------

_INGEST = """
import json, sys
from pathlib import Path
from synthwatch.stream_apps.storage.backfill.ingest import ingest_history
from synthwatch.settings import Settings
if __name__ == "__main__":
    s = ingest_history(Settings(), Path(sys.argv[1]), progress=False)
    print(json.dumps({"lines": s.lines, "stored": s.stored, "seconds": s.seconds, "balanced": s.balanced}))
"""


def ingest_history_rate(base: Settings, path: Path, data_dir: Path) -> dict[str, Any] | None:
    """``ingest_history`` on ``path`` in a child process with its own engine; None if it does not exist."""
    try:
        import synthwatch.stream_apps.storage.backfill.ingest as history

        if not hasattr(history, "ingest_history"):
            return None
    except ImportError:
        return None
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNTHWATCH_")}
    env["SYNTHWATCH_DATA_DIR"] = str(data_dir)
    url = _clickhouse_url(base, f"bench_history_{data_dir.name.replace('-', '_')}")
    if url is not None:
        env["SYNTHWATCH_CLICKHOUSE_URL"] = url
    script = data_dir / "ingest.py"
    data_dir.mkdir(parents=True, exist_ok=True)
    script.write_text(_INGEST, encoding="utf-8")
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(script), str(path)], env=env, capture_output=True, text=True, timeout=1800
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"ingest_history failed: {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_seconds"] = wall
    return result


# --- the benchmark ------------------------------------------------------------------------------------


@dataclass
class Row:
    measurement: str
    value: str
    vs_raw: str = ""
    vs_floor: str = ""
    target: str = ""
    met: str = ""


def _rate(value: float) -> str:
    return f"{value:,.0f} events/s"


def _ratio(value: float, reference: float) -> str:
    return f"{value / reference:.2f}" if reference > 0 else ""


@contextlib.contextmanager
def _broker(base: Settings, console: Console) -> Iterator[str]:
    """The configured Kafka, or an embedded Tansu this function starts and stops."""
    if base.kafka_bootstrap_servers:
        console.print(f"Kafka: the configured cluster {base.kafka_bootstrap_servers}")
        yield base.kafka_bootstrap_servers
        return
    with EmbeddedBroker(base) as broker:
        console.print(f"Kafka: embedded Tansu on {broker.bootstrap_servers}")
        yield broker.bootstrap_servers


def _machine() -> str:
    memory = ""
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo", encoding="ascii") as meminfo:
        memory = f", {int(meminfo.readline().split()[1]) / 1024 / 1024:.1f} GiB RAM"
    load = ""
    with contextlib.suppress(OSError):
        load = f", load {os.getloadavg()[0]:.2f}"
    return f"{os.cpu_count()} cores{memory}{load}"


def bench_pipeline(
    console: Console,
    events: int = 100_000,
    latency_seconds: int = 20,
    rss_events: int = 1_000_000,
    *,
    rate: int = 1000,
    scale_out: bool = True,
    history: bool = True,
    changes: Sequence[str] = (),
    seed: int = 5,
) -> dict[str, Any]:
    """Run every phase and print one table; returns the numbers (also for docs/performance.md).

    ``changes``: other setting values for the measured workers (names of ``WORKER_ENV``); empty
    measures the shipped worker. Sizes of 0 skip a phase.
    """
    base = Settings()
    results: dict[str, Any] = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": _machine()}
    results["changes"] = list(changes)
    tmp = Path(tempfile.mkdtemp(prefix="synthwatch-bench-pipeline-"))
    workers: list[BenchWorker] = []
    try:
        with _broker(base, console) as servers:
            run = uuid.uuid4().hex[:6]
            main_topics = Topics(f"{run}-main")
            settings = main_topics.settings(base)
            ensure_topics(settings, servers)
            console.print(f"Machine: {results['machine']}; simulating {events:,} events ...")
            lines = simulated_lines(events, seed)
            stream_path = tmp / "stream.ndjson"
            stream_path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")

            # 1. start-up
            worker = start_worker(settings, servers, tmp / "worker-main", changes, app_id=f"bench-{run}")
            workers.append(worker)
            results["ready_wall"], results["ready_reported"] = worker.ready_wall, worker.ready_reported
            console.print(f"worker ready in {worker.ready_wall:.2f} s ({worker.ready_reported:.2f} s by its own count)")

            # 2. end to end: first publish -> last event in ClickHouse
            from synthwatch.producers.publisher import Publisher
            from synthwatch.producers.readers import InputRecord

            started = time.perf_counter()
            with Publisher(settings, servers) as publisher:
                summary = publisher.publish_records(
                    InputRecord(source=f"stream.ndjson:{i}", raw=line) for i, line in enumerate(lines, start=1)
                )
            published = time.perf_counter()
            done = wait_consumed([worker], summary.sent, timeout=max(600.0, events / 100))
            stats = worker.stats()
            stored = worker.count("SELECT (SELECT count() FROM lab_detections) + (SELECT count() FROM border_seizures)")
            late = int(stats["late"])  # late reports are stored too (flagged): one of the stored rows
            results["e2e"] = {
                "lines": len(lines),
                "sent": summary.sent,
                "publish_rejected": summary.rejected,
                "publish_duplicates": summary.duplicates,
                "failed": len(summary.failed),
                "stored": stored,
                "late": late,
                "worker_duplicates": stats["duplicates"],
                "publish_seconds": published - started,
                "seconds": done - started,
                "rate": summary.sent / (done - started),
            }
            console.print(f"end to end: {results['e2e']}")
            if stored + stats["duplicates"] != summary.sent:
                dup = stats["duplicates"]
                console.print(f"[red]accounting: {stored} stored + {dup} duplicates != {summary.sent}[/]")

            # 3. the references, on the same topics and messages (the worker idles meanwhile)
            raw = raw_aiokafka_rate(servers, settings.input_topics, summary.sent)
            floor = run_bare_agent(servers, settings.input_topics, summary.sent, FLOOR)
            results["raw_aiokafka"], results["bare_faust"] = raw.rate, [floor.rate]
            console.print(f"raw aiokafka {raw.rate:,.0f}/s, bare Faust {floor.rate:,.0f}/s")

            # 4. RSS after rss_events events over 5,000 region x substance keys (and their sustained rate)
            if rss_events > 0:
                before = worker.stats()["checkpointed"]
                regions, substances = bench_regions(100), bench_substances(50)
                started = time.perf_counter()
                rss_summary = publish_lines(
                    settings,
                    servers,
                    keyed_lines(
                        rss_events,
                        f"rss-{run}",
                        datetime(2025, 3, 1, tzinfo=UTC),
                        timedelta(days=60),
                        regions,
                        substances,
                    ),
                )
                sent, failed = rss_summary.sent, len(rss_summary.failed)
                done = wait_consumed([worker], before + sent, timeout=max(900.0, rss_events / 200))
                wait_idle([worker], timeout=900)  # the novelty stage's state is part of what is measured
                memory = worker.memory_kib()
                results["rss"] = {
                    "events": sent,
                    "failed": failed,
                    "keys": len(regions) * len(substances),
                    "rss_kib": memory.get("VmRSS", 0),
                    "peak_kib": memory.get("VmHWM", 0),
                    "seconds": done - started,
                    "rate": sent / (done - started),
                    "worker_total_events": worker.stats()["consumed"],
                }
                console.print(f"RSS phase: {results['rss']}")

            # 5. alert latency at a steady rate (after the RSS phase: its reports are the newest)
            if latency_seconds > 0:
                wait_idle([worker], timeout=900)
                n = max(rss_events, 0)
                step = timedelta(days=60) / n if n else timedelta(seconds=5)
                stream = LatencyStream(f"lat-{run}", datetime(2025, 3, 1, tzinfo=UTC), step, n)
                latency = alert_latency(settings, servers, rate, latency_seconds, stream)
                results["latency"] = {
                    "rate": rate,
                    "sent": latency.sent,
                    "achieved_rate": latency.sent / latency.seconds,
                    "alerts": latency.alerts,
                    "matched": len(latency.matched),
                    "by_type": latency.by_type,
                    "p50": latency.percentile(0.50),
                    "p99": latency.percentile(0.99),
                    "max": max(latency.matched) if latency.matched else math.nan,
                }
                console.print(f"latency: {results['latency']}")
            worker.stop()

            # 6. the floor again, with nothing else running: how much the machine's noise moves it
            results["bare_faust"].append(run_bare_agent(servers, settings.input_topics, summary.sent, FLOOR).rate)
            results["raw_aiokafka_again"] = raw_aiokafka_rate(servers, settings.input_topics, summary.sent).rate

            # 7. the bulk path on the same file
            if history:
                results["history"] = ingest_history_rate(base, stream_path, tmp / "history")
                console.print(f"ingest-history: {results['history']}")

            # 8. scale-out: one worker, then two in one consumer group, each on fresh topics
            if scale_out and events > 0:
                results["scale_out"] = _scale_out(base, servers, tmp, events, run, changes, console)
    finally:
        for w in workers:
            w.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    _print_table(console, results)
    return results


def _scale_out(
    base: Settings, servers: str, tmp: Path, events: int, run: str, changes: Sequence[str], console: Console
) -> dict[str, Any]:
    """Throughput of one worker and of two sharing a group; per-worker counts show the partition split."""
    out: dict[str, Any] = {}
    regions, substances = bench_regions(100), bench_substances(50)
    for n in (1, 2):
        topics = Topics(f"{run}-scale{n}")
        settings = topics.settings(base)
        ensure_topics(settings, servers)
        app_id = f"bench-{run}-scale{n}"
        workers = [start_worker(settings, servers, tmp / f"scale{n}-w{i}", changes, app_id=app_id) for i in range(n)]
        try:
            time.sleep(2.0 * n)  # let the group settle after the last join
            started = time.perf_counter()
            summary = publish_lines(
                settings,
                servers,
                keyed_lines(
                    events, f"scale{n}-{run}", datetime(2025, 1, 1, tzinfo=UTC), timedelta(days=30), regions, substances
                ),
            )
            sent, failed = summary.sent, len(summary.failed)
            done = wait_consumed(workers, sent, timeout=max(600.0, events / 100))
            per_worker = [w.stats()["consumed"] for w in workers]
            stored = sum(
                w.count("SELECT (SELECT count() FROM lab_detections) + (SELECT count() FROM border_seizures)")
                for w in workers
            )
            out[f"workers_{n}"] = {
                "sent": sent,
                "failed": failed,
                "stored": stored,
                "per_worker": per_worker,
                "seconds": done - started,
                "rate": sent / (done - started),
            }
            console.print(f"scale-out, {n} worker(s): {out[f'workers_{n}']}")
        finally:
            for w in workers:
                w.stop()
    return out


def _print_table(console: Console, r: dict[str, Any]) -> None:
    raw = float(r.get("raw_aiokafka", 0.0))
    floors = [float(x) for x in r.get("bare_faust", [])]
    floor = statistics.mean(floors) if floors else 0.0
    rows = [
        Row("raw aiokafka consumer + json.loads (transport limit)", _rate(raw), "1.00", _ratio(raw, floor)),
        Row(
            "bare Faust agent, decode + count (framework floor; mean of "
            + ", ".join(f"{x:,.0f}" for x in floors)
            + ")",
            _rate(floor),
            _ratio(floor, raw),
            "1.00",
        ),
    ]
    if "e2e" in r:
        e = r["e2e"]["rate"]
        rows.append(
            Row(
                f"end to end, first publish -> last event in ClickHouse ({r['e2e']['sent']:,} events)",
                _rate(e),
                _ratio(e, raw),
                _ratio(e, floor),
                ">= 0.70 x floor",
                "yes" if floor and e / floor >= 0.7 else "NO",
            )
        )
    if "rss" in r:
        s = r["rss"]
        rows.append(
            Row(
                f"sustained, {s['events']:,} events over {s['keys']:,} keys",
                _rate(s["rate"]),
                _ratio(s["rate"], raw),
                _ratio(s["rate"], floor),
            )
        )
    if "latency" in r:
        lat = r["latency"]
        rows.append(
            Row(
                f"alert latency p50 / p99 at {lat['achieved_rate']:,.0f} events/s ({lat['matched']} alerts)",
                f"{lat['p50'] * 1000:,.0f} / {lat['p99'] * 1000:,.0f} ms",
                target="p99 <= 500 ms",
                met="yes" if lat["p99"] <= 0.5 else "NO",
            )
        )
    if "ready_wall" in r:
        rows.append(
            Row(
                "worker start-up to ready (process start; worker's own figure)",
                f"{r['ready_wall']:.2f} s ({r['ready_reported']:.2f} s)",
                target="<= 10 s",
                met="yes" if r["ready_wall"] <= 10 else "NO",
            )
        )
    if "rss" in r:
        s = r["rss"]
        rows.append(
            Row(
                f"worker RSS after {s['worker_total_events']:,} events, {s['keys']:,} keys (peak)",
                f"{s['rss_kib'] / 1024:,.0f} MiB ({s['peak_kib'] / 1024:,.0f} MiB)",
                target="<= 1024 MiB",
                met="yes" if s["peak_kib"] <= 1024 * 1024 else "NO",
            )
        )
    if "history" in r:
        h = r["history"]
        if h is None:
            rows.append(
                Row(
                    "ingest-history (bulk path)",
                    "not measured: synthwatch.stream_apps.storage.backfill.ingest.ingest_history missing",
                )
            )
        else:
            rate = h["lines"] / h["seconds"] if h["seconds"] else 0.0
            rows.append(
                Row(
                    f"ingest-history, same file ({h['lines']:,} lines; {h['wall_seconds']:.1f} s with start-up)",
                    _rate(rate),
                    _ratio(rate, raw),
                    _ratio(rate, floor),
                )
            )
    for n in (1, 2):
        s = r.get("scale_out", {}).get(f"workers_{n}")
        if s:
            split = " + ".join(f"{c:,}" for c in s["per_worker"])
            rows.append(
                Row(
                    f"scale-out: {n} worker(s), one group, 4 partitions (consumed: {split})",
                    _rate(s["rate"]),
                    _ratio(s["rate"], raw),
                    _ratio(s["rate"], floor),
                )
            )
    changes = ", ".join(r.get("changes") or []) or "shipped code"
    table = Table(title=f"synthwatch pipeline, one run, one broker ({r['machine']}; worker: {changes})")
    for column in ("measurement", "value", "vs raw aiokafka", "vs bare Faust", "target", "met"):
        table.add_column(column, justify="left" if column == "measurement" else "right")
    for row in rows:
        table.add_row(row.measurement, row.value, row.vs_raw, row.vs_floor, row.target, row.met)
    console.print(table)
    console.print("Shared 2-core machine: compare the ratios within this run, not absolute numbers across runs.")


# --- experiments: what raises the floor, and what the proposed changes do to the worker --------------------


def floor_experiments(
    console: Console, events: int = 100_000, variants: Sequence[FloorVariant] = FLOOR_EXPERIMENTS
) -> list[FloorResult]:
    """Each bare-agent variant on the same published messages, raw aiokafka first and last."""
    base = Settings()
    results: list[FloorResult] = []
    with _broker(base, console) as servers:
        topics = Topics(f"{uuid.uuid4().hex[:6]}-floor")
        settings = topics.settings(base)
        ensure_topics(settings, servers)
        sent = publish_lines(
            settings,
            servers,
            keyed_lines(
                events,
                "floor",
                datetime(2025, 1, 1, tzinfo=UTC),
                timedelta(days=30),
                bench_regions(100),
                bench_substances(50),
            ),
        ).sent
        results.append(raw_aiokafka_rate(servers, settings.input_topics, sent))
        for variant in variants:
            results.append(run_bare_agent(servers, settings.input_topics, sent, variant))
            console.print(f"{variant.name}: {results[-1].rate:,.0f} events/s")
        results.append(raw_aiokafka_rate(servers, settings.input_topics, sent))
    table = Table(title=f"raising the framework floor: {events:,} events, one broker ({_machine()})")
    for column in ("variant", "events/s", "vs per-event defaults"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    reference = results[1].rate
    for result in results:
        table.add_row(result.variant, f"{result.rate:,.0f}", _ratio(result.rate, reference))
    console.print(table)
    return results


def worker_experiments(
    console: Console,
    events: int = 100_000,
    experiments: Sequence[tuple[str, tuple[str, ...]]] = EXPERIMENTS,
    repeat: int = 1,
) -> dict[str, list[float]]:
    """Backlog drain rate of the real worker per combination of proposed changes, same messages.

    Every variant consumes the same published simulated stream with its own consumer group and engine,
    from its first consumed event to the last one stored; the bare agent runs first and last.
    """
    base = Settings()
    rates: dict[str, list[float]] = {}
    tmp = Path(tempfile.mkdtemp(prefix="synthwatch-bench-experiments-"))
    try:
        with _broker(base, console) as servers:
            run = uuid.uuid4().hex[:6]
            shared = Topics(f"{run}-exp")
            settings = shared.settings(base)
            ensure_topics(settings, servers)
            summary = publish_lines(settings, servers, iter(simulated_lines(events)))
            rates["bare Faust agent (floor)"] = [run_bare_agent(servers, settings.input_topics, summary.sent).rate]
            for _ in range(repeat):
                for n, (label, changes) in enumerate(experiments):
                    own = Topics(f"{run}-exp{n}-{uuid.uuid4().hex[:4]}", labs=shared.labs, seizures=shared.seizures)
                    own_settings = own.settings(base)
                    ensure_topics(own_settings, servers)
                    tag = uuid.uuid4().hex[:4]
                    worker = start_worker(
                        own_settings, servers, tmp / f"exp-{n}-{tag}", changes, app_id=f"bench-{run}-exp{n}-{tag}"
                    )
                    try:
                        first = wait_first_consumed([worker], 120)
                        done = wait_consumed([worker], summary.sent, timeout=900)
                        rates.setdefault(label, []).append(summary.sent / (done - first))
                        batches = worker.stats().get("intake_batches") or 0
                    finally:
                        worker.stop()
                    per_batch = f" ({summary.sent / batches:,.0f} events per intake batch)" if batches else ""
                    console.print(f"{label}: {rates[label][-1]:,.0f} events/s{per_batch}")
            rates["bare Faust agent (floor)"].append(run_bare_agent(servers, settings.input_topics, summary.sent).rate)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    floor = statistics.mean(rates["bare Faust agent (floor)"])
    table = Table(title=f"worker backlog drain, {events:,} simulated events, one broker ({_machine()})")
    for column in ("worker", "events/s (each run)", "mean", "vs shipped", "vs bare Faust"):
        table.add_column(column, justify="left" if column == "worker" else "right")
    shipped = statistics.mean(rates.get("shipped settings", [floor]))
    for label, values in rates.items():
        mean = statistics.mean(values)
        table.add_row(
            label,
            ", ".join(f"{v:,.0f}" for v in values),
            f"{mean:,.0f}",
            _ratio(mean, shipped),
            _ratio(mean, floor),
        )
    console.print(table)
    return rates


#: Latency variants: (label, changes, extra environment for the worker).
LATENCY_EXPERIMENTS: tuple[tuple[str, tuple[str, ...], dict[str, str]], ...] = (
    ("shipped settings", (), {}),
    ("batches by Faust's noack_take (0.25 s window)", ("take-batches",), {}),
    ("uvloop instead of asyncio's loop", ("uvloop",), {}),
    ("fetch wait 20 ms", ("fetch-wait-20",), {}),
    ("fetch wait 50 ms", ("fetch-wait-50",), {}),
    ("Faust's fixed 1.5 s fetch wait", ("fetch-wait-1500",), {}),
)


def latency_experiments(
    console: Console,
    warmup_events: int = 50_000,
    rate: int = 1000,
    seconds: int = 20,
    experiments: Sequence[tuple[str, tuple[str, ...], dict[str, str]]] = LATENCY_EXPERIMENTS,
) -> dict[str, dict[str, float]]:
    """Alert latency per worker variant: fresh worker, ``warmup_events`` over 5,000 keys, then the steady rate."""
    base = Settings()
    out: dict[str, dict[str, float]] = {}
    tmp = Path(tempfile.mkdtemp(prefix="synthwatch-bench-latency-"))
    try:
        with _broker(base, console) as servers:
            regions, substances = bench_regions(100), bench_substances(50)
            for n, (label, changes, env) in enumerate(experiments):
                run = uuid.uuid4().hex[:6]
                settings = Topics(f"{run}-lat{n}").settings(base)
                ensure_topics(settings, servers)
                worker = start_worker(
                    settings, servers, tmp / f"lat-{n}", changes, app_id=f"bench-{run}", extra_env=env
                )
                try:
                    start = datetime(2025, 3, 1, tzinfo=UTC)
                    if warmup_events:
                        summary = publish_lines(
                            settings,
                            servers,
                            keyed_lines(warmup_events, f"w{run}", start, timedelta(days=60), regions, substances),
                        )
                        wait_consumed([worker], summary.sent, timeout=900)
                        wait_idle([worker], timeout=900)
                    step = timedelta(days=60) / warmup_events if warmup_events else timedelta(seconds=5)
                    result = alert_latency(
                        settings, servers, rate, seconds, LatencyStream(f"lat{run}", start, step, warmup_events)
                    )
                finally:
                    worker.stop()
                out[label] = {
                    "p50": result.percentile(0.5),
                    "p99": result.percentile(0.99),
                    "max": max(result.matched) if result.matched else math.nan,
                    "alerts": float(len(result.matched)),
                    "rate": result.sent / result.seconds,
                }
                console.print(f"{label}: {out[label]}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    table = Table(title=f"alert latency at {rate:,} events/s after {warmup_events:,} events ({_machine()})")
    for column in ("worker", "alerts", "p50 ms", "p99 ms", "max ms"):
        table.add_column(column, justify="left" if column == "worker" else "right")
    for label, r in out.items():
        table.add_row(
            label, f"{r['alerts']:.0f}", f"{r['p50'] * 1000:,.0f}", f"{r['p99'] * 1000:,.0f}", f"{r['max'] * 1000:,.0f}"
        )
    console.print(table)
    return out


def _chosen(variants: Sequence[T], indices: str) -> list[T]:
    """The variants named by comma-separated indices (``--variants``), or all of them."""
    return [variants[int(i)] for i in indices.split(",") if i] or list(variants)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="synthwatch bench pipeline (also: --floor, --experiments)")
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--latency-seconds", type=int, default=20)
    parser.add_argument("--rss-events", type=int, default=1_000_000)
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--no-scale-out", action="store_true")
    parser.add_argument("--no-history", action="store_true")
    parser.add_argument("--changes", default="", help=f"comma-separated, of {', '.join(WORKER_ENV)}")
    parser.add_argument("--floor", action="store_true", help="only the experiments on the bare agent")
    parser.add_argument("--experiments", action="store_true", help="only the worker variants (backlog drain)")
    parser.add_argument("--latency-experiments", action="store_true", help="only alert latency per worker variant")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument(
        "--variants",
        default="",
        help="comma-separated indices of the --experiments or --latency-experiments variants to run",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    console = command_console()
    result: Any
    if args.floor:
        result = [r.__dict__ for r in floor_experiments(console, args.events)]
    elif args.latency_experiments:
        variants = _chosen(LATENCY_EXPERIMENTS, args.variants)
        result = latency_experiments(console, args.rss_events, args.rate, args.latency_seconds, variants)
    elif args.experiments:
        result = worker_experiments(console, args.events, _chosen(EXPERIMENTS, args.variants), repeat=args.repeat)
    else:
        result = bench_pipeline(
            console,
            args.events,
            args.latency_seconds,
            args.rss_events,
            rate=args.rate,
            scale_out=not args.no_scale_out,
            history=not args.no_history,
            changes=[c for c in args.changes.split(",") if c],
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")


if __name__ == "__main__":
    main()
