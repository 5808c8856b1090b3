"""How the worker's memory splits between the embedded ClickHouse engine and Python (prints numbers).

The worker process holds both the Python side (intake, detector state) and the embedded engine, and
``VmRSS`` alone cannot say which one grows. This benchmark drives the same storage path as the
worker without Kafka or Faust: keyed events (the pipeline benchmark's RSS stream, 100 regions x 50
substances) are parsed by :class:`Intake` and stored through :meth:`ClickHouseSink.store_events` in
batches, and after every ``every`` events it prints the process's RSS (anonymous and file-backed),
the engine's allocator (jemalloc, linked into chDB) and what ClickHouse itself tracks. A variant
without the engine gives the Python share. Each variant runs in its own process: RSS is per process
and chDB opens one engine per process.

``python -m synthwatch.bench.memory [--events N] [--batch N] [--variants python,chdb-default,shipped]``
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

#: variant -> environment of its process. ``chdb-default`` is chDB's own jemalloc setting (what the
#: worker ran with before :data:`synthwatch.stream_apps.storage.clickhouse.EMBEDDED_MALLOC_CONF`); an operator's
#: ``JE_MALLOC_CONF`` wins over the shipped one, so the variant only needs to set it.
VARIANTS: dict[str, dict[str, str]] = {
    "python": {},
    "chdb-default": {"JE_MALLOC_CONF": "dirty_decay_ms:5000"},
    "decay-0": {"JE_MALLOC_CONF": "dirty_decay_ms:0"},
    "shipped": {},
}

_JEMALLOC_TOTALS = re.compile(
    r"Allocated: (\d+), active: (\d+), metadata: (\d+).*?resident: (\d+), mapped: (\d+), retained: (\d+)"
)


def proc_status(pid: int | str = "self", wanted: Sequence[str] = ("VmRSS", "VmHWM")) -> dict[str, int]:
    """Numeric fields of a process's ``/proc/PID/status`` (memory in KiB)."""
    found: dict[str, int] = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in wanted:
                found[name] = int(value.split()[0])
    return found


def process_memory() -> dict[str, int]:
    """This process's VmRSS, VmHWM (peak), RssAnon, RssFile in KiB and its thread count."""
    return proc_status("self", ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads"))


def engine_memory(client: Any) -> dict[str, int]:
    """The embedded engine's own view, in bytes: jemalloc's totals and ClickHouse's MemoryTracking.

    chDB links jemalloc statically and allocates through it, so ``resident`` is the engine's heap as
    the kernel sees it; Python allocates through glibc and is not in these numbers.
    """
    found: dict[str, int] = {}
    text = str(client.command("SELECT * FROM system.jemalloc_stats"))
    match = _JEMALLOC_TOTALS.search(text)
    if match:
        names = ("allocated", "active", "metadata", "resident", "mapped", "retained")
        found.update({f"jemalloc_{n}": int(v) for n, v in zip(names, match.groups(), strict=True)})
    tracked = client.command("SELECT value FROM system.metrics WHERE metric = 'MemoryTracking'")
    found["tracked"] = int(str(tracked))
    found["parts"] = int(str(client.command("SELECT count() FROM system.parts WHERE active")))
    return found


def _child(args: argparse.Namespace) -> None:
    """One variant in this process: print a JSON line per checkpoint (``--child`` mode)."""
    from synthwatch.bench.workload import bench_regions, bench_substances, keyed_lines
    from synthwatch.settings import Settings
    from synthwatch.stream_apps.detect.intake import Intake, RawMessage

    variant: str = args.child
    client: Any = None
    sink: Any = None
    regions, substances = bench_regions(100), bench_substances(50)
    intake = Intake()

    def report(label: str, done: int, started: float) -> None:
        times = os.times()
        row: dict[str, Any] = {"variant": variant, "at": label, "events": done, "seconds": time.monotonic() - started}
        row["cpu_seconds"] = times.user + times.system
        row.update(process_memory())
        if client is not None:
            row.update(engine_memory(client))
        print(json.dumps(row), flush=True)

    started = time.monotonic()
    report("start", 0, started)
    with tempfile.TemporaryDirectory(prefix="synthwatch-bench-memory-") as tmp:
        if variant != "python":
            from synthwatch.stream_apps.storage.clickhouse import connect, migrate
            from synthwatch.stream_apps.storage.sink import ClickHouseSink

            client = connect(Settings(data_dir=Path(tmp)))
            migrate(client)
            sink = ClickHouseSink(client)
            report("engine open", 0, started)
        lines = keyed_lines(
            args.events, "mem", datetime(2025, 3, 1, tzinfo=UTC), timedelta(days=60), regions, substances
        )
        done = 0
        while done < args.events:
            chunk = [RawMessage(f"mem:{done + i}", line) for i, line in zip(range(args.batch), lines, strict=False)]
            result = intake.process(chunk)
            if sink is not None:
                sink.stored_event_ids(result.events)  # the worker's late-event check
                sink.store_events(result.events)
            done += len(chunk)
            if done % args.every < args.batch or done >= args.events:
                report("stored", done, started)
        if client is not None:
            client.close()


def run_variant(variant: str, events: int, batch: int, every: int, console: Console) -> list[dict[str, Any]]:
    """Run one variant in a fresh process; its checkpoints, printed as they come."""
    command = [sys.executable, "-m", "synthwatch.bench.memory", "--child", variant]
    command += ["--events", str(events), "--batch", str(batch), "--every", str(every)]
    env = {k: v for k, v in os.environ.items() if k != "JE_MALLOC_CONF"}
    env.update(VARIANTS[variant])
    rows: list[dict[str, Any]] = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env) as child:
        assert child.stdout is not None
        for line in child.stdout:
            if not line.startswith("{"):
                continue
            row = json.loads(line)
            rows.append(row)
            console.print(_line(row))
    if child.returncode:
        raise RuntimeError(f"variant {variant} exited with {child.returncode}")
    return rows


def _mib(kib: int | None) -> str:
    return "" if kib is None else f"{kib / 1024:,.0f}"


def _line(row: dict[str, Any]) -> str:
    text = (
        f"{row['variant']:>12} {row['at']:>11} {row['events']:>9,} "
        f"{row['seconds']:5.0f} s ({row['cpu_seconds']:.0f} s CPU) "
        f"RSS {_mib(row['VmRSS'])} MiB (peak {_mib(row['VmHWM'])}; anon {_mib(row['RssAnon'])}, "
        f"file {_mib(row['RssFile'])}), {row['Threads']} threads"
    )
    if "jemalloc_resident" in row:
        text += (
            f"; engine: jemalloc resident {row['jemalloc_resident'] >> 20} MiB "
            f"(allocated {row['jemalloc_allocated'] >> 20}), tracked {row['tracked'] >> 20} MiB, "
            f"{row['parts']} parts"
        )
    return text


def bench_memory(
    console: Console, events: int = 1_100_000, batch: int = 10_000, every: int = 100_000, variants: Sequence[str] = ()
) -> dict[str, list[dict[str, Any]]]:
    """Each variant's checkpoints, then one table of the final numbers."""
    variants = variants or tuple(VARIANTS)
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise ValueError(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    results = {v: run_variant(v, events, batch, every, console) for v in variants}
    table = Table(title=f"RSS after {events:,} keyed events stored in batches of {batch:,} (MiB)")
    columns = ("variant", "RSS", "peak", "anon", "file-backed", "threads", "engine jemalloc resident", "CPU s")
    for column in columns:
        table.add_column(column, justify="left" if column == "variant" else "right")
    for variant, rows in results.items():
        last = rows[-1]
        resident = last.get("jemalloc_resident")
        table.add_row(
            variant,
            _mib(last["VmRSS"]),
            _mib(last["VmHWM"]),
            _mib(last["RssAnon"]),
            _mib(last["RssFile"]),
            str(last["Threads"]),
            "" if resident is None else f"{resident >> 20:,}",
            f"{last['cpu_seconds']:,.0f}",
        )
    console.print(table)
    console.print(
        "python: intake only, no engine (the Python share of this path); chdb-default: the engine with chDB's "
        "own allocator setting (dirty_decay_ms:5000); decay-0: freed pages returned at once; shipped: "
        "synthwatch.stream_apps.storage.clickhouse.connect as the worker opens it (EMBEDDED_MALLOC_CONF)."
    )
    return results


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m synthwatch.bench.memory", description=__doc__)
    parser.add_argument("--events", type=int, default=1_100_000)
    parser.add_argument("--batch", type=int, default=10_000, help="events per store_events call")
    parser.add_argument("--every", type=int, default=100_000, help="events between two RSS readings")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--json", type=Path, help="also write every checkpoint to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args)
        return
    from synthwatch.consoles import command_console

    results = bench_memory(
        command_console(), args.events, args.batch, args.every, [v for v in args.variants.split(",") if v]
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
