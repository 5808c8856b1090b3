"""``synthwatch bench ready``: how long a ``synthwatch worker`` takes to become ready, alone and quickly.

Why its own benchmark: the pipeline benchmark starts one worker once, so its ready time is one sample taken
minutes before the rest of its numbers. This one starts ``runs`` workers, one after another, on one broker
(fresh topics, consumer group and data directory each, as the pipeline benchmark's first worker), and prints
the median from process start (Python start-up and imports included, as a user waits for it), by the
worker's own count (from ``run_worker``'s start), and the CPU seconds (user + system, all threads) the
worker had used when it was seen ready, which follow the machine's load much less than the wall clock.
``--python`` adds other interpreters, e.g. another checkout's virtualenv: their workers alternate with this
one's, so a before/after comparison shares the machine's load rather than following it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from synthwatch.bench.workers import start_worker
from synthwatch.bench.workload import Topics, bench_broker, machine
from synthwatch.consoles import command_console
from synthwatch.settings import Settings


def bench_ready(console: Console, runs: int = 5, pythons: Sequence[str] = ()) -> dict[str, Any]:
    """Start ``runs`` workers per interpreter (this one first, then ``pythons``), alternating; print the medians.

    Returns, per interpreter, the seconds of every run from process start (``wall``), by the worker's own
    count (``reported``) and in CPU time (``cpu``), and the load average before and after.
    """
    interpreters = [sys.executable, *pythons]
    samples: dict[str, dict[str, list[float]]] = {p: {"wall": [], "reported": [], "cpu": []} for p in interpreters}
    base = Settings()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="synthwatch-bench-ready-") as tmp, bench_broker(base, console) as servers:
        for run in range(runs):
            for i, python in enumerate(interpreters):
                name = f"{uuid.uuid4().hex[:6]}-ready"
                settings = Topics(name).created(base, servers)
                data_dir = Path(tmp) / f"w{run}-{i}"
                worker = start_worker(settings, servers, data_dir, app_id=f"bench-{name}", python=python)
                worker.stop()
                samples[python]["wall"].append(worker.ready_wall)
                samples[python]["reported"].append(worker.ready_reported)
                samples[python]["cpu"].append(worker.ready_cpu)
                console.print(
                    f"run {run + 1}/{runs} {python}: ready in {worker.ready_wall:.2f} s "
                    f"({worker.ready_reported:.2f} s by its own count; {worker.ready_cpu:.2f} CPU s)",
                    highlight=False,
                )
    load_after = os.getloadavg()
    table = Table(title=f"worker ready, median of {runs} ({machine()}; load before {load_before[0]:.2f})")
    columns = ("from process start", "own count", "before its clock", "CPU s", "vs first", "CPU vs first")
    for column in ("interpreter", *columns):
        table.add_column(column, justify="left" if column == "interpreter" else "right")
    first = statistics.median(samples[interpreters[0]]["wall"])
    first_cpu = statistics.median(samples[interpreters[0]]["cpu"])
    for python in interpreters:
        wall, reported = statistics.median(samples[python]["wall"]), statistics.median(samples[python]["reported"])
        cpu = statistics.median(samples[python]["cpu"])
        table.add_row(
            python,
            f"{wall:.2f} s",
            f"{reported:.2f} s",
            f"{wall - reported:.2f} s",
            f"{cpu:.2f}",
            f"{wall / first:.2f} x",
            f"{cpu / first_cpu:.2f} x" if first_cpu else "-",
        )
    console.print(table)
    console.print(f"Load average (1, 5, 15 min): before {load_before}, after {load_after}.", highlight=False)
    return {"runs": runs, "samples": samples, "load_before": load_before, "load_after": load_after}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="synthwatch bench ready: worker start-up to ready, median of runs")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--python",
        action="append",
        default=[],
        help="another interpreter to compare (repeatable): OTHER/.venv/bin/python",
    )
    args = parser.parse_args(argv)
    bench_ready(command_console(), args.runs, args.python)


if __name__ == "__main__":
    main()
