"""Storage benchmarks that print numbers (never timed tests): the sink and the NDJSON backfill.

Each opens its own embedded engine in a temporary directory, so neither can run inside a process that
already holds another engine path (pytest's session engine): run them from the CLI, or in a subprocess.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from collections.abc import Sequence
from datetime import date
from pathlib import Path

from rich.console import Console
from rich.table import Table

from synthwatch.consoles import command_console
from synthwatch.settings import Settings
from synthwatch.stream_apps.storage.clickhouse import connect, engine_scratch_directory, migrate


def _cpu_seconds() -> float:
    """User + system CPU of this process (every thread: chDB's too) and of its reaped children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _simulation_lines(events: int, seed: int = 11) -> list[str]:
    """About ``events`` realistic lines (a month of simulated reports, bad lines and re-sends included)."""
    from synthwatch.producers.simulate import SimulationConfig, simulate

    days = 30
    per_day = min(100_000.0, max(10.0, events / days))
    return simulate(SimulationConfig(days=days, seed=seed, start=date(2025, 1, 1), events_per_day=per_day)).lines


def bench_sink(
    console: Console, events: int = 200_000, batch_sizes: Sequence[int] = (2000, 10_000, 20_000)
) -> dict[str, float]:
    """``ClickHouseSink.store_events`` from an in-memory source of enriched events, per batch size.

    Also times the id pre-check alone and a replayed batch, each batch size on a fresh database.
    """
    from synthwatch.stream_apps.detect.intake import Intake, RawMessage
    from synthwatch.stream_apps.storage.sink import ClickHouseSink

    lines = _simulation_lines(events)
    batch = Intake().process(RawMessage(f"bench:{i}", line) for i, line in enumerate(lines, start=1))
    items = batch.events[:events]

    rates: dict[str, float] = {}
    with engine_scratch_directory("synthwatch-bench-") as tmp:
        for n, size in enumerate(batch_sizes):
            for label, sink_class in (("store_events", ClickHouseSink),):
                settings = Settings(data_dir=Path(tmp), clickhouse_database=f"bench_{n}_{len(rates)}")
                client = connect(settings)
                try:
                    migrate(client)
                    sink = sink_class(client)
                    check = 0.0
                    started = time.perf_counter()
                    for i in range(0, len(items), size):
                        chunk = items[i : i + size]
                        t = time.perf_counter()
                        sink.stored_event_digests(chunk)  # the worker's late-event check (keep_late)
                        check += time.perf_counter() - t
                        sink.store_events(chunk)
                    elapsed = time.perf_counter() - started
                    stored = int(
                        str(
                            client.command(
                                "SELECT (SELECT count() FROM lab_detections) + (SELECT count() FROM border_seizures)"
                            )
                        )
                    )
                    if stored != len(items):
                        raise RuntimeError(f"stored {stored} of {len(items)} events")
                    again = time.perf_counter()
                    replay = sink.store_events(items[:size])
                    replay_seconds = time.perf_counter() - again
                    if replay.stored:
                        raise RuntimeError("a replayed batch was stored again")
                    rates[f"{label}, batch {size:,}"] = len(items) / (elapsed - check)
                    rates[f"{label}, batch {size:,}: pre-check alone"] = len(items) / check
                    rates[f"{label}, batch {size:,}: replayed batch (all duplicates)"] = size / replay_seconds
                finally:
                    client.command(f"DROP DATABASE IF EXISTS {settings.clickhouse_database}")
                    client.close()
    table = Table(title=f"ClickHouseSink.store_events, {len(items):,} enriched events from memory")
    table.add_column("variant")
    table.add_column("events/s", justify="right")
    for name, rate in rates.items():
        table.add_row(name, f"{rate:,.0f}")
    console.print(table)
    console.print("store_events rates include its own pre-check; the pre-check is also timed alone.")
    return rates


def bench_ingest(
    console: Console,
    events: int = 200_000,
    variants: Sequence[tuple[int | None, str]] = ((None, "sql"), (None, "arrow"), (None, "json"), (0, "arrow")),
) -> dict[str, float]:
    """``ingest_history`` on a simulated NDJSON file: first load, then a re-ingest that must add nothing.

    Variants are (parsing processes, encoding): ``sql`` (the default for the embedded engine: it parses the
    file itself), ``arrow`` (worker processes), ``json`` (the reference path).
    """
    from synthwatch.stream_apps.storage.backfill.ingest import ingest_history

    rates: dict[str, float] = {}
    rows = []
    cpu: dict[str, float] = {}
    loads: dict[str, float] = {}
    partial: dict[str, bool] = {}
    with engine_scratch_directory("synthwatch-bench-") as tmp:
        path = Path(tmp) / "history.ndjson"
        lines = _simulation_lines(events)
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        megabytes = path.stat().st_size / 1e6
        for n, (count, encoding) in enumerate(variants):
            settings = Settings(data_dir=Path(tmp) / "data", clickhouse_database=f"ingest_{n}")
            for run in ("first load", "re-ingest"):
                forked = "chdb" not in sys.modules  # else the pool's processes are a forkserver's children
                cpu_before = _cpu_seconds()
                summary = ingest_history(settings, path, progress=False, workers=count, encoding=encoding)
                cpu[f"{run}, {n}"] = _cpu_seconds() - cpu_before  # forked processes are reaped, so counted
                partial[f"{run}, {n}"] = bool(summary.workers) and not forked
                loads[f"{run}, {n}"] = os.getloadavg()[0]
                if not summary.balanced or (run == "re-ingest" and summary.stored):
                    raise RuntimeError(f"counts wrong on {run}: {summary}")
                how = f"{summary.workers} parsing processes" if summary.workers else "parsed in-process"
                how = "parsed by the engine" if encoding == "sql" else how
                label = f"{run}, {how}, {encoding}"
                rates[label] = summary.rate
                key = f"{run}, {n}"
                rows.append((label, summary, f"{cpu[key]:.1f}{'*' if partial[key] else ''}", loads[key]))
    table = Table(
        title=f"synthwatch ingest-history, {len(lines):,} NDJSON lines ({megabytes:.0f} MB): a simulated month "
        "(30 days, bad lines and re-sends included), fresh embedded engine"
    )
    # The reference, measured in this run: the first load on the JSON path (Python validates, ClickHouse
    # reads JSONEachRow), the earliest path; without it, the first variant's first load.
    reference = next((s for label, s, _, _ in rows if label.startswith("first load") and "json" in label), rows[0][1])
    columns = ("run", "lines", "stored", "duplicates", "rejected", "seconds", "of which setup", "lines/s")
    extra = ("lines/s once parsing", "× reference", "CPU s", "load")
    for column in (*columns, *extra):
        table.add_column(column, justify="left" if column == "run" else "right")
    for label, s, cpu_seconds, load in rows:
        table.add_row(
            label,
            f"{s.lines:,}",
            f"{s.stored:,}",
            f"{s.duplicates:,}",
            f"{s.rejected:,}",
            f"{s.seconds:.2f}",
            f"{s.setup_seconds:.2f}",
            f"{s.rate:,.0f}",
            f"{s.rate_steady:,.0f}",
            f"{s.rate / reference.rate:.2f}" if reference.rate else "-",
            cpu_seconds,
            f"{load:.1f}",
        )
    console.print(table)
    console.print(
        "lines/s is the whole command (the issue's measure). Setup is the fixed cost before the first chunk is "
        "handed out (worker start, engine open, migrations, the RDKit pre-pass, learnt names: ~1-2 s whatever the "
        "file's size); 'once parsing' leaves it out (filling and draining the pipeline stay in), i.e. the rate a "
        "large file approaches. A lab network's year is 1.5-2 M lines: `--events 1000000` measures a closer size. "
        "× reference: the whole command's rate over the JSON reference path's first load, same file, same run. "
        "CPU s: this process and its parsing processes (user + system), steadier than wall time on a shared "
        "machine (*: this process only; parsing processes started from a forkserver, as once the engine is open here, "
        "are not counted); load: the 1-minute load average when the run ended (2 cores: above 2, others took CPU)."
    )
    return rates


if __name__ == "__main__":  # `python -m synthwatch.bench.storage [events]`: both benchmarks
    size = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    bench_sink(command_console(), events=size)
    bench_ingest(command_console(), events=size)
