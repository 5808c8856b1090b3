"""Benchmarks that print numbers (never timed tests): ratios measured in one run on one broker."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from rich.console import Console
from rich.table import Table

from synthwatch.settings import Settings
from synthwatch.stack.broker import EmbeddedBroker, ensure_topics

_REGIONS = [
    ("ML", "ML-BKO"),
    ("MA", "MA-CAS"),
    ("SN", "SN-DK"),
    ("FR", "FR-75C"),
    ("NL", "NL-NH"),
    ("US", "US-CA"),
]


def sample_lines(count: int, prefix: str) -> list[str]:
    """Valid border-seizure lines spread over regions (cheap to build, realistic in size)."""
    base = datetime(2026, 1, 1, tzinfo=UTC)
    lines = []
    for i in range(count):
        country, region = _REGIONS[i % len(_REGIONS)]
        lines.append(
            json.dumps(
                {
                    "event_id": f"{prefix}-{i}",
                    "kind": "border_seizure",
                    "occurred_at": (base + timedelta(seconds=i)).isoformat(),
                    "country": country,
                    "region": region,
                    "substance": {"name": "3-MMC"},
                    "agency": "Customs",
                    "seizure_id": f"S{i}",
                    "border_point": "Airport",
                    "conveyance": "air",
                    "quantity": {"value": 12.5, "unit": "g"},
                }
            )
        )
    return lines


async def _aiokafka_produce(servers: str, topic: str, payloads: list[tuple[bytes, bytes]]) -> float:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=servers, acks="all", linger_ms=20, max_batch_size=512 * 1024)
    await producer.start()
    try:
        started = time.perf_counter()
        futures = [await producer.send(topic, value=value, key=key) for key, value in payloads]
        await asyncio.gather(*futures)
        return time.perf_counter() - started
    finally:
        await producer.stop()


def bench_publish(events: int, console: Console) -> dict[str, float]:
    """kafka-python (synthwatch's Publisher, validation included) against aiokafka on the same broker."""
    from kafka import KafkaProducer

    from synthwatch.producers.publisher import Publisher
    from synthwatch.producers.readers import InputRecord

    settings = Settings(topic_border_seizures=f"bench-{uuid.uuid4().hex[:8]}")
    rates: dict[str, float] = {}
    with EmbeddedBroker(settings) as broker:
        servers = broker.bootstrap_servers
        ensure_topics(settings, servers)
        lines = sample_lines(events, "bench")
        payloads = [(json.loads(line)["region"].encode(), line.encode()) for line in lines]

        rates["aiokafka producer (bytes only)"] = events / asyncio.run(
            _aiokafka_produce(servers, settings.topic_border_seizures, payloads)
        )

        plain = KafkaProducer(bootstrap_servers=servers)
        started = time.perf_counter()
        for key, value in payloads:
            plain.send(settings.topic_border_seizures, key=key, value=value)
        plain.flush()
        rates["kafka-python, default settings (bytes only)"] = events / (time.perf_counter() - started)
        plain.close()

        with Publisher(settings, servers) as publisher:
            started = time.perf_counter()
            for key, value in payloads:
                publisher.send_raw(settings.topic_border_seizures, key, value, "event", "bench")
            publisher.flush()
            elapsed = time.perf_counter() - started
            rates["kafka-python as synthwatch configures it (bytes only)"] = events / elapsed

        with Publisher(settings, servers) as publisher:
            records = [InputRecord(source=f"bench:{i}", raw=line) for i, line in enumerate(lines)]
            started = time.perf_counter()
            summary = publisher.publish_records(records)
            elapsed = time.perf_counter() - started
        if summary.sent != events:
            raise RuntimeError(f"publisher acknowledged {summary.sent} of {events} events")
        rates["synthwatch publish (kafka-python, validates each record)"] = events / elapsed

    reference = rates["aiokafka producer (bytes only)"]
    table = Table(title=f"publishing {events:,} events to Tansu on one machine")
    table.add_column("producer")
    table.add_column("events/s", justify="right")
    table.add_column("vs aiokafka", justify="right")
    for name, rate in rates.items():
        table.add_row(name, f"{rate:,.0f}", f"{rate / reference:.2f}")
    console.print(table)
    return rates


def _cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and its reaped children (the backtest's helper too)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _command_seconds(input_path: Path, output_path: Path, python: str = sys.executable) -> tuple[float, float]:
    """(wall, CPU) seconds of ``synthwatch backtest`` as a user runs it: a new process, start-up included.

    ``python``: the interpreter of the checkout to run (another worktree's, to compare two versions). It runs in
    the input's folder: ``python -m`` puts the working directory first on the import path, and run from a
    checkout another checkout's interpreter imported this checkout's ``synthwatch/`` with its own ``schemas/``
    and ``stream_apps/`` (mixed code, found in review)."""
    command = [python, "-m", "synthwatch.cli.main", "backtest", "--input", str(input_path)]
    cpu, started = _cpu_seconds(), time.perf_counter()
    subprocess.run([*command, "--output", str(output_path)], check=True, capture_output=True, cwd=input_path.parent)
    return time.perf_counter() - started, _cpu_seconds() - cpu


def write_received(path: Path, lines: Sequence[str], received: datetime) -> None:
    """Write ``lines`` and date the file ``received``: `synthwatch backtest` takes a file's modification time as
    when its reports were received and refuses those dated more than SYNTHWATCH_MAX_FUTURE_HOURS after it. Written
    now, a simulated year ending after today lost its last weeks to that rule (8,331 lines refused on 2026-12-07),
    so the command's figures changed with the day of the run and did not detect what the in-process loop did."""
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    stamp = received.timestamp()
    os.utime(path, (stamp, stamp))


def bench_backtest(
    console: Console, days: int, seed: int, small_lines: int = 30_000, others: Sequence[str] = (), rounds: int = 1
) -> dict[str, float]:
    """Lines/s of the whole ``synthwatch backtest`` command (start-up included) on a simulated stream and on its
    first ``small_lines`` lines, beside the in-process detection loop over the same stream in the same run.

    Why both: issue 16's targets are for the command a user runs; the loop alone says how much of the time
    is start-up (imports, catalogue, helper process) and file writing. The loop is ``run_lines`` in this
    process, which, like the command, detects in a second process while it reads (see detect/backtest.py).
    Lines/s move with the machine's load, so only the ratios of one run compare; the load is printed with
    them, and the CPU seconds (this process and its children, helper processes included), which move less
    with other work on the machine.

    ``others``: interpreters of other checkouts (e.g. main's worktree): then each file is run by this checkout and
    by each of them in turn, ``rounds`` times, the order reversed every other round, and a table gives each one's
    medians and its ratio to this checkout (before/after on a shared machine, where only alternating runs compare).
    """
    from datetime import date

    from synthwatch.producers.simulate import SimulationConfig, simulate
    from synthwatch.stream_apps.detect.backtest import run_lines

    start = date(2026, 1, 1)
    sim = simulate(SimulationConfig(days=days, seed=seed, start=start))
    received = datetime(start.year, start.month, start.day, tzinfo=UTC) + timedelta(days=days + 1)  # after its end
    rates: dict[str, float] = {}
    rows: list[tuple[str, int, tuple[float, float]]] = []
    with tempfile.TemporaryDirectory(prefix="synthwatch-bench-") as tmp:
        year, small, one = Path(tmp) / "stream.ndjson", Path(tmp) / "small.ndjson", Path(tmp) / "one.ndjson"
        small_count = min(small_lines, len(sim.lines))
        write_received(year, sim.lines, received)
        write_received(small, sim.lines[:small_count], received)
        write_received(one, sim.lines[:1], received)
        files = [
            ("one line (start-up)", one, 1),
            (f"{days}-day stream", year, len(sim.lines)),
            (f"first {small_count:,} lines", small, small_count),
        ]
        if others:
            return _compare_checkouts(console, files, [sys.executable, *others], rounds, Path(tmp))
        for name, path, lines in files:
            rows.append((f"command, {name}", lines, _command_seconds(path, Path(tmp) / "alerts")))
    cpu = _cpu_seconds()
    run = run_lines((f"sim:{i}", line) for i, line in enumerate(sim.lines))  # RDKit caches start cold here too
    s = run.summary
    rows.append((f"in-process loop, {days}-day stream (reference)", s.lines, (s.seconds, _cpu_seconds() - cpu)))
    reference = s.lines / s.seconds
    load = os.getloadavg()
    table = Table(
        title=f"backtest of a simulated {days}-day stream (seed {seed}: {s.lines:,} lines, {s.alerts:,} alerts); "
        f"load {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on {os.cpu_count()} cores"
    )
    for column in ("measurement", "lines", "seconds", "lines/s", "vs in-process loop", "CPU seconds"):
        table.add_column(column, justify="left" if column == "measurement" else "right")
    for name, lines, (seconds, cpu_seconds) in rows:
        rates[name] = rate = lines / seconds
        table.add_row(
            name, f"{lines:,}", f"{seconds:.2f}", f"{rate:,.0f}", f"{rate / reference:.2f}", f"{cpu_seconds:.2f}"
        )
    console.print(table)
    console.print(_BACKTEST_TARGETS)
    return rates


_BACKTEST_TARGETS = "targets (issue 16): the command >= 50,000 lines/s on the simulated year, >= 30,000 on 30,000 lines"


def _compare_checkouts(
    console: Console, files: list[tuple[str, Path, int]], pythons: list[str], rounds: int, tmp: Path
) -> dict[str, float]:
    """Each file run by each interpreter in turn (order reversed every other round); medians and ratios printed,
    this checkout's median lines/s returned.

    Why alternating: on a shared machine load moves between runs more than a change does; rounds that interleave
    the versions see the same load on average. The first interpreter is this checkout: ratios are to it.
    """
    import statistics

    runs: dict[tuple[int, str], list[tuple[float, float]]] = {}
    loads: list[float] = []
    for number in range(rounds):
        loads.append(os.getloadavg()[0])
        order = list(enumerate(pythons)) if number % 2 == 0 else list(enumerate(pythons))[::-1]
        for name, path, _lines in files:
            for index, python in order:
                runs.setdefault((index, name), []).append(_command_seconds(path, tmp / "alerts", python))
    table = Table(
        title=f"synthwatch backtest, {rounds} alternating rounds; 1-minute load at the rounds' starts: "
        + ", ".join(f"{load:.1f}" for load in loads)
        + f" on {os.cpu_count()} cores"
    )
    for column in (
        "file",
        "checkout",
        "wall s (median)",
        "wall s each round",
        "lines/s (median)",
        "CPU s (median)",
        "CPU s each round",
    ):
        table.add_column(column, justify="left" if column in ("file", "checkout") else "right")
    table.add_column("CPU / this", justify="right")
    table.add_column("lines/s / this", justify="right")
    for name, _path, lines in files:
        base_wall = statistics.median(wall for wall, _cpu in runs[(0, name)])
        base_cpu = statistics.median(cpu for _wall, cpu in runs[(0, name)])
        for index, python in enumerate(pythons):
            walls, cpus = [w for w, _c in runs[(index, name)]], [c for _w, c in runs[(index, name)]]
            wall, cpu = statistics.median(walls), statistics.median(cpus)
            table.add_row(
                name,
                "this checkout" if index == 0 else python,
                f"{wall:.2f}",
                " / ".join(f"{w:.2f}" for w in walls),
                f"{lines / wall:,.0f}",
                f"{cpu:.2f}",
                " / ".join(f"{c:.2f}" for c in cpus),
                f"{cpu / base_cpu:.2f}",
                f"{base_wall / wall:.2f}",
            )
    console.print(table)
    console.print(_BACKTEST_TARGETS)
    return {name: lines / statistics.median(wall for wall, _cpu in runs[(0, name)]) for name, _path, lines in files}
