"""``synthwatch worker`` processes as the benchmarks run them: the setting variants, start-up, counters, waits.

Every variant is the shipped code with other settings in its environment, so what a benchmark measures is what
a user can configure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse, urlunparse

from synthwatch.bench.memory import proc_status, process_cpu_seconds
from synthwatch.settings import Settings
from synthwatch.stack.process import StackProcess, StackProcessError, log_tail, stop_child
from synthwatch.stackfile import read_web_token
from synthwatch.stream_apps.storage.query import QueryResult, execute_remote

#: Settings (environment of the worker process) that stand for another value of a setting in settings.py;
#: every variant is the shipped code, so what ``--experiments`` measures is what a user can configure.
#: where a worker of the ``tracemalloc`` variant writes its snapshot, in its data directory
TRACEMALLOC_DUMP = "tracemalloc.dump"

WORKER_ENV: dict[str, dict[str, str]] = {
    "batch-2000": {"SYNTHWATCH_SINK_BATCH_SIZE": "2000"},  # the sink's default before 10,000
    "window-0.1": {"SYNTHWATCH_SINK_BATCH_SECONDS": "0.1"},
    "window-0.5": {"SYNTHWATCH_SINK_BATCH_SECONDS": "0.5"},
    "fetch-wait-1500": {"SYNTHWATCH_CONSUMER_FETCH_MAX_WAIT_MS": "1500"},  # Faust's fixed value
    "fetch-wait-20": {"SYNTHWATCH_CONSUMER_FETCH_MAX_WAIT_MS": "20"},
    "fetch-wait-50": {"SYNTHWATCH_CONSUMER_FETCH_MAX_WAIT_MS": "50"},
    "fetch-wait-100": {"SYNTHWATCH_CONSUMER_FETCH_MAX_WAIT_MS": "100"},
    "no-gc-freeze": {"SYNTHWATCH_GC_FREEZE": "false"},
    "uvloop": {"SYNTHWATCH_EVENT_LOOP": "uvloop"},
    "asyncio": {"SYNTHWATCH_EVENT_LOOP": "asyncio"},
    "producer-16k": {"SYNTHWATCH_PRODUCER_BATCH_BYTES": "16384"},  # Faust's default
    "fetch-32k": {"SYNTHWATCH_CONSUMER_PARTITION_FETCH_BYTES": str(32 << 10)},
    "buffers": {"SYNTHWATCH_STREAM_BUFFER_MAXSIZE": "32768", "SYNTHWATCH_CONSUMER_MAX_POLL_RECORDS": "5000"},
    # At most one stream buffer of decoded records per poll (shipped: unbounded; docs/performance.md, issue 16)
    "poll-4096": {"SYNTHWATCH_CONSUMER_MAX_POLL_RECORDS": "4096"},
    "take-batches": {"SYNTHWATCH_AGENT_BATCHES": "take"},  # Faust's noack_take, the previous batching
    "no-linger": {"SYNTHWATCH_BATCH_LINGER_SECONDS": "0"},
    "checkpoint-0.25": {"SYNTHWATCH_CHECKPOINT_SECONDS": "0.25"},
    # The collector's thresholds once ready (each collection holds the loop while it walks; docs/performance.md)
    "gc-50k": {"SYNTHWATCH_GC_THRESHOLDS": "[50000, 20, 100]"},
    "gc-5k": {"SYNTHWATCH_GC_THRESHOLDS": "[5000, 5, 4000]"},
    "gc-2k": {"SYNTHWATCH_GC_THRESHOLDS": "[2000, 10, 1000]"},
    # The consumer watchdog's stall time scaled down (shipped: 30 s): its seek-backs under a backlog show at a
    # lower load and in a shorter run (docs/performance.md, "seek-backs").
    "stall-5": {"SYNTHWATCH_STALL_SECONDS": "5"},
    # The C allocator (read when the process starts, so environment, not settings; docs/performance.md, issue 16):
    # Python's objects from glibc instead of pymalloc, in at most two glibc heaps; a fixed mmap threshold (glibc
    # raises it up to 32 MiB as large buffers are freed); glibc's default arena count (8 per core).
    "glibc-malloc": {"PYTHONMALLOC": "malloc", "MALLOC_ARENA_MAX": "2"},
    "arenas-2": {"MALLOC_ARENA_MAX": "2"},
    "mmap-128k": {"MALLOC_MMAP_THRESHOLD_": "131072"},
    # Diagnostics, not a setting to ship: every Python allocation traced (5 frames, slow); the pipeline benchmark
    # asks the worker for a snapshot after the RSS phase (stream_apps/runtime/memtrace.py; the file is relative
    # to the worker's data directory, its working directory).
    "tracemalloc": {"PYTHONTRACEMALLOC": "5", "SYNTHWATCH_TRACEMALLOC_DUMP": TRACEMALLOC_DUMP},
}


def worker_command(python: str | None = None) -> list[str]:
    """argv of ``synthwatch worker`` (variants differ only in their environment); ``python``: another
    interpreter (another checkout's virtualenv, to compare its start-up in the same run)."""
    return [python or sys.executable, "-m", "synthwatch.cli.main", "worker"]


@dataclass
class BenchWorker:
    """A ``synthwatch worker`` child process and how to read its counters and its ClickHouse."""

    process: subprocess.Popen[bytes]
    data_dir: Path
    log_path: Path
    web_url: str = ""
    ready_wall: float = 0.0  # process start -> ready, as seen from outside (Python start-up included)
    ready_reported: float = 0.0  # the worker's own figure (from run_worker's start)
    ready_cpu: float = 0.0  # CPU seconds (user + system, all threads) the worker had used when it was seen ready
    # seconds a /ready read may take: a worker tracing its allocations (``tracemalloc``) holds its loop for longer
    stats_timeout: float = 10.0
    #: ``/ready`` reads that got no answer within ``stats_timeout``, and the longest time without an answer (s):
    #: the worker's event loop was held that long (a product defect to report, not to retry away: the liveness
    #: probe of deploy/k8s gives up after 6 such 10 s timeouts)
    ready_timeouts: int = 0
    longest_unanswered: float = 0.0
    unanswered_since: float | None = None

    def stats(self) -> dict[str, Any]:
        """The worker's counters from ``/ready``, also while it answers 503.

        Why: ``/ready`` says 503 while the watchdog finds a partition stalled (it seeks back by itself) with
        the same counters in its body; under load that happened mid-phase and ended whole benchmark runs.
        A read that times out is counted (:attr:`ready_timeouts`) and raised.
        """
        asked = time.monotonic()
        try:
            with urllib.request.urlopen(f"{self.web_url}/ready", timeout=self.stats_timeout) as response:
                stats: dict[str, Any] = json.loads(response.read())
        except urllib.error.HTTPError as error:
            if error.code != 503:
                raise
            stats = json.loads(error.read())
        except TimeoutError:
            self.ready_timeouts += 1
            if self.unanswered_since is None:
                self.unanswered_since = asked
            self.longest_unanswered = max(self.longest_unanswered, time.monotonic() - self.unanswered_since)
            raise
        self.unanswered_since = None
        return stats

    def checkpointed(self) -> int:
        """Input events checkpointed, each once: the events read again after a watchdog's seek-back (``replayed``:
        judged and stored before, skipped) are counted again in ``checkpointed``, so under load a phase
        looked done while up to a sixth of its events were still unread."""
        stats = self.stats()
        return int(stats["checkpointed"]) - int(stats.get("replayed", 0))

    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> QueryResult:
        """A read statement through the worker's /sql endpoint, with the token the worker wrote."""
        token = read_web_token(Settings(data_dir=self.data_dir))
        return execute_remote(self.web_url, sql, parameters, token=token)

    def count(self, sql: str) -> int:
        return int(self.query(sql).rows[0][0])

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the worker process so far (all its threads: the engine's too).

        Why: on a shared machine events/s move with the other agents' load; the CPU a worker spends on the
        same events moves much less, so variants compare by it across runs.
        """
        return process_cpu_seconds(self.process.pid)

    def memory_kib(self) -> dict[str, int]:
        """VmRSS and VmHWM (peak RSS) of the worker process, in KiB."""
        return proc_status(self.process.pid, ("VmRSS", "VmHWM"))

    def stop(self) -> None:
        stop_child(self.process)


def clickhouse_url(base: Settings, database: str) -> str | None:
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
    python: str | None = None,
) -> BenchWorker:
    """Start one worker (own data dir, own embedded engine or database) and wait until it is ready."""
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
    url = clickhouse_url(settings, f"bench_{data_dir.name.replace('-', '_')}")
    if url is not None:
        env["SYNTHWATCH_CLICKHOUSE_URL"] = url
    for name in changes:
        env.update(WORKER_ENV.get(name, {}))
    env.update(extra_env or {})
    log_path = data_dir / "worker.log"
    # In its data directory: `-m` puts the working directory first on sys.path, so a worker of another
    # interpreter (``python``) started from a checkout would import that checkout's package, not its own.
    child = StackProcess(
        worker_command(python), log_path, env=env, settings=Settings(data_dir=data_dir), what="worker", cwd=data_dir
    )
    child.start()
    try:
        info = child.wait_ready(timeout, interval=0.05)
    except StackProcessError:
        child.stop()
        raise
    ready_wall = time.monotonic() - child.started_at
    ready_cpu = process_cpu_seconds(child.process.pid)
    worker = BenchWorker(
        child.process, data_dir, log_path, info.web_url, ready_wall, info.ready_seconds or 0.0, ready_cpu
    )
    if "tracemalloc" in changes:
        worker.stats_timeout = 300.0
    return worker


def wait_consumed(workers: Sequence[BenchWorker], total: int, timeout: float, interval: float = 0.1) -> float:
    """Poll until the workers together have consumed and stored ``total`` input events; returns when.

    Stored: the events' checkpoint is done (rows in ClickHouse, detector state written, offsets
    acknowledged), not merely taken from Kafka.
    """
    deadline = time.monotonic() + timeout
    consumed = 0
    while time.monotonic() < deadline:
        try:
            consumed = sum(w.checkpointed() for w in workers)
            if consumed >= total:
                return time.perf_counter()
        except TimeoutError:  # its web server shares the event loop, which a batch held > 10 s under load: counted
            pass  # (BenchWorker.ready_timeouts, in the phase's results), then asked again
        for w in workers:
            if w.process.poll() is not None:
                raise RuntimeError(
                    f"worker exited with code {w.process.returncode} (log: {w.log_path}): {log_tail(w.log_path)}"
                )
        time.sleep(interval)
    raise RuntimeError(f"only {consumed} of {total} events consumed after {timeout:.0f} s")


def wait_idle(workers: Sequence[BenchWorker], timeout: float, interval: float = 0.2) -> None:
    """Poll until the novelty stage has processed every sighting the intake stage sent.

    After a backlog the intake agent is done first: Faust delivers one consumer's records in fetch
    order, so the sightings wait behind the input backlog. A latency phase that starts before they
    are processed would measure that backlog, not the steady rate. Sightings read again after a watchdog's
    seek-back (``replayed_sightings``: held by detector state, skipped) count in ``sightings_processed`` again,
    so they are taken off: a worker with sightings partitions sought back looked idle with hundreds unread.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = [w.stats() for w in workers]
        processed = sum(int(s["sightings_processed"]) - int(s.get("replayed_sightings", 0)) for s in stats)
        if processed >= sum(s["sightings"] for s in stats):
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
