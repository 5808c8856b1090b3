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
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from synthwatch.stream_apps.storage.sink import ClickHouseSink

#: variant -> environment of its process. ``chdb-default`` is chDB's own jemalloc setting (what the
#: worker ran with before :data:`synthwatch.stream_apps.storage.clickhouse.EMBEDDED_MALLOC_CONF`); an operator's
#: ``JE_MALLOC_CONF`` wins over the shipped one, so the variant only needs to set it.
VARIANTS: dict[str, dict[str, str]] = {
    "python": {},
    "detectors": {},  # python, plus the worker's two detector stages and its changelog tables (no Kafka, no engine)
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


def process_cpu_seconds(pid: int | str = "self") -> float:
    """User plus system CPU seconds a process has used so far, all its threads (``/proc/PID/stat``).

    Why beside the wall clock: on a shared machine a start-up's wall time follows the load; its CPU time
    much less, so a before/after of CPU time still says what a change saved.
    """
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


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


def smaps_split(pid: int | str = "self") -> dict[str, int]:
    """Resident KiB of a process by what backs it: the embedded engine's library file, other files, anonymous.

    Why: chDB's library is ~530 MB of code mapped from its file; the part of it that is resident counts in
    RSS but is shared by every process that maps it and reclaimable by the kernel. It is not the heap.
    """
    split = {"engine_code": 0, "other_files": 0, "anon": 0}
    path = ""
    with open(f"/proc/{pid}/smaps", encoding="utf-8", errors="replace") as smaps:
        for line in smaps:
            head = line.split(None, 6)
            if head and "-" in head[0] and not head[0].endswith(":"):  # a mapping's first line
                path = head[5].strip() if len(head) > 5 else ""
            elif head and head[0] == "Rss:":
                kib = int(head[1])
                if path.startswith("/"):
                    split["engine_code" if "chdb" in path.rsplit("/", 1)[-1] else "other_files"] += kib
                else:
                    split["anon"] += kib
    return split


@dataclass
class RssPoint:
    """One reading of the worker's memory during the RSS phase (KiB; engine figures in MiB), and of the engine
    process's when the engine runs in one (the pipeline benchmark's ``--engine-process``)."""

    events: int  # events of the phase checkpointed (stored, state written) when read
    seconds: float  # since the phase started
    rss_kib: int  # the worker's, as the four below
    peak_kib: int
    anon_kib: int
    file_kib: int
    engine_code_kib: int  # resident pages of chDB's library file in the worker
    engine_heap_mib: int | None = None  # the engine's jemalloc resident, wherever it runs (None: /sql could not say)
    #: The engine process's VmRSS and resident pages of chDB's library file in it; None: the engine is in the worker.
    engine_process_rss_kib: int | None = None
    engine_process_code_kib: int | None = None


@dataclass(frozen=True)
class RssColumns:
    """One :class:`RssPoint` as the series' columns, in MiB, each read from the process it belongs to (None: not
    read).

    Why: with the engine in a process of its own its heap is not in the worker's RSS; subtracting it there (as the
    series did) made "rest" up. ``rest`` is the worker's RSS less only what of the engine is in the worker.
    """

    rss: float
    peak: float
    anon: float
    worker_engine_code: float  # chDB's library pages resident in the worker (0 when it does not map chDB)
    engine_code: float | None  # in whichever process holds the engine
    engine_heap: int | None  # likewise (the engine's own jemalloc reading)
    engine_process_rss: float | None  # None: the engine is in the worker
    rest: float | None  # the worker's Python, libraries and the like; None: its engine heap was not read

    @classmethod
    def of(cls, p: RssPoint) -> RssColumns:
        """The columns of one reading."""
        code = p.engine_code_kib / 1024
        engine_code: float | None = code
        heap_in_worker = p.engine_heap_mib  # the engine in the worker: its code and heap are in the worker's RSS
        if p.engine_process_rss_kib is not None:  # in its own process: neither is
            engine_code = None if p.engine_process_code_kib is None else p.engine_process_code_kib / 1024
            heap_in_worker = 0
        return cls(
            rss=p.rss_kib / 1024,
            peak=p.peak_kib / 1024,
            anon=p.anon_kib / 1024,
            worker_engine_code=code,
            engine_code=engine_code,
            engine_heap=p.engine_heap_mib,
            engine_process_rss=None if p.engine_process_rss_kib is None else p.engine_process_rss_kib / 1024,
            rest=None if heap_in_worker is None else p.rss_kib / 1024 - code - heap_in_worker,
        )


def rss_columns(points: Sequence[RssPoint], offset: int = 0) -> tuple[list[str], list[list[str]]]:
    """The series' column names and rows (MiB, blank where not read), for :func:`rss_table` and :func:`rss_chart`.

    The engine in the worker: its code and heap, then the rest of the worker's RSS. The engine in a process of its
    own (any point read it): the worker's own columns (its chDB code, 0 unless something maps it), then the engine
    process's RSS, code and heap beside them, never subtracted from the worker's.
    """
    apart = any(p.engine_process_rss_kib is not None for p in points)
    names = ["events (worker)", "events (phase)", "s", "RSS", "peak", "anon"]
    names += (
        ["engine code in worker", "rest", "engine process RSS", "its engine code", "its engine heap"]
        if apart
        else ["engine code", "engine heap", "rest"]
    )
    rows = []
    for p in points:
        c = RssColumns.of(p)
        row = [f"{p.events + offset:,}", f"{p.events:,}", f"{p.seconds:,.0f}", _num(c.rss), _num(c.peak), _num(c.anon)]
        if apart:
            row += [_num(c.worker_engine_code), _num(c.rest), _num(c.engine_process_rss)]
            row += [_num(c.engine_code), _num(c.engine_heap)]
        else:
            row += [_num(c.engine_code), _num(c.engine_heap), _num(c.rest)]
        rows.append(row)
    return names, rows


def _num(mib: float | None) -> str:
    return "" if mib is None else f"{mib:,.0f}"


@dataclass
class RssSeries:
    """RSS against events, read from a running worker every ``every`` checkpointed events (a thread).

    Why a series: the end point alone cannot tell state that grows with events from a fixed cost.
    ``counted`` returns the worker's checkpointed events; ``engine`` its engine's jemalloc resident MiB;
    ``engine_pid`` the engine's process when it runs in one of its own (its RSS and code are read there).
    """

    pid: int
    counted: Callable[[], int]
    every: int = 100_000
    engine: Callable[[], int | None] | None = None
    engine_pid: int | None = None
    interval: float = 0.25
    points: list[RssPoint] = field(default_factory=list)
    polls: int = 0
    errors: list[str] = field(default_factory=list)  # what failed while following (printed by the caller)
    _base: int = 0
    _started: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> RssSeries:
        """Read the starting point (events 0 of the phase), then follow the worker in a thread."""
        self._base = self.counted()
        self._started = time.monotonic()
        self.read(0)
        self._thread = threading.Thread(target=self._follow, name="rss-series", daemon=True)
        self._thread.start()
        return self

    def read(self, events: int) -> RssPoint:
        """One point now, at ``events`` of the phase."""
        status = proc_status(self.pid, ("VmRSS", "VmHWM", "RssAnon", "RssFile"))
        split = smaps_split(self.pid)
        point = RssPoint(
            events,
            time.monotonic() - self._started,
            status.get("VmRSS", 0),
            status.get("VmHWM", 0),
            status.get("RssAnon", 0),
            status.get("RssFile", 0),
            split["engine_code"],
            self.engine() if self.engine is not None else None,
        )
        if self.engine_pid is not None:  # the engine's own process: its memory is not the worker's
            point.engine_process_rss_kib = proc_status(self.engine_pid, ("VmRSS",)).get("VmRSS", 0)
            point.engine_process_code_kib = smaps_split(self.engine_pid)["engine_code"]
        self.points.append(point)
        return point

    def _follow(self) -> None:
        mark = self.every
        while not self._stop.wait(self.interval):
            self.polls += 1
            try:
                done = self.counted() - self._base
                if done >= mark:
                    self.read(done)
                    mark = (done // self.every + 1) * self.every
            except Exception as error:  # a busy worker's 503 or a slow answer: read at the next turn
                self.errors.append(f"{type(error).__name__}: {error}")  # (a worker gone: the caller's wait says)

    def finish(self, events: int) -> list[RssPoint]:
        """Stop following and read the end point (once the phase's work is done)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if not self.points or self.points[-1].events != events:
            self.read(events)
        return self.points

    def rows(self) -> list[dict[str, Any]]:
        return [asdict(p) for p in self.points]


def engine_heap_mib(query: Callable[[str], Any]) -> int | None:
    """The engine's jemalloc resident MiB through a ``query(sql) -> QueryResult`` (the worker's /sql)."""
    try:
        text = " ".join(str(v) for row in query("SELECT * FROM system.jemalloc_stats").rows for v in row)
    except Exception:  # an endpoint that refuses system tables: the series goes on without it
        return None
    match = _JEMALLOC_TOTALS.search(text.replace("\\n", " "))
    return int(match.group(4)) >> 20 if match else None


def rss_table(points: Sequence[RssPoint], offset: int = 0) -> Table:
    """The series as a table (MiB): :func:`rss_columns`."""
    apart = any(p.engine_process_rss_kib is not None for p in points)
    table = Table(title="Worker RSS against events (MiB)" + (", the engine process beside it" if apart else ""))
    names, rows = rss_columns(points, offset)
    for column in names:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*row)
    return table


#: The lines of docs/performance.md between which :func:`write_rss_chart` puts the chart and its table.
CHART_BEGIN = "<!-- rss-series: generated by python -m synthwatch.bench.memory --chart; do not edit -->"
CHART_END = "<!-- rss-series: end -->"


def rss_chart(rss: dict[str, Any], title: str = "Worker RSS against events") -> str:
    """Markdown for the pipeline benchmark's RSS phase (``results["rss"]``): a mermaid chart and a table.

    Why generated: the chart must come from a run (``--json`` of the pipeline benchmark), not be drawn by
    hand. x: the worker's input events (the end-to-end phase's included), y: MiB; lines: RSS, its anonymous
    part, the engine's heap (jemalloc resident), the engine's code (chDB's library file), the target.
    """
    points = [RssPoint(**p) for p in rss["series"]]
    offset = int(rss.get("events_before", 0))
    columns = [RssColumns.of(p) for p in points]
    apart = any(c.engine_process_rss is not None for c in columns)
    xs = [f"{(p.events + offset) / 1000:.0f}" for p in points]
    rss_mib = [round(c.rss) for c in columns]
    anon = [round(c.anon) for c in columns]
    code = [round(c.engine_code or 0) for c in columns]
    heap = [c.engine_heap or 0 for c in columns]
    top = max([*rss_mib, 512]) // 100 * 100 + 100
    where = " (in its own process, not in the worker's RSS)" if apart else ""
    heaps = "" if apart else ", the engine's jemalloc"
    chart = [
        "```mermaid",
        "xychart-beta",
        f'    title "{title}"',
        f'    x-axis "events consumed by the worker (thousands)" [{", ".join(xs)}]',
        f'    y-axis "MiB" 0 --> {top}',
        f"    line [{', '.join(map(str, rss_mib))}]",
        f"    line [{', '.join(map(str, anon))}]",
        f"    line [{', '.join(map(str, heap))}]",
        f"    line [{', '.join(map(str, code))}]",
        f"    line [{', '.join('512' for _ in points)}]",
        "```",
        "",
        "The lines, in the order drawn (the chart has no legend): 1 RSS; 2 its anonymous part (heaps: "
        f"Python, glibc{heaps}); 3 the engine's heap (jemalloc resident){where}; "
        f"4 the engine's code (resident pages of chDB's library file){where}; 5 the 512 MiB target (flat).",
        "",
    ]
    names, rows = rss_columns(points, offset)
    names.remove("events (phase)")
    chart.append("| " + " | ".join(names) + " |")
    chart.append("|" + " ---: |" * len(names))
    for row in rows:
        del row[1]
        chart.append("| " + " | ".join(row) + " |")
    return "\n".join(chart) + "\n"


def write_rss_chart(results: Path, doc: Path) -> str:
    """Replace the generated block of ``doc`` with the chart of a pipeline benchmark's ``--json`` output."""
    data = json.loads(results.read_text(encoding="utf-8"))
    if "rss" not in data or not data["rss"].get("series"):
        raise ValueError(f"{results} holds no RSS series: run the pipeline benchmark with --rss-events and --json")
    block = rss_chart(data["rss"])
    text = doc.read_text(encoding="utf-8")
    begin, end = text.find(CHART_BEGIN), text.find(CHART_END)
    if begin < 0 or end < begin:
        raise ValueError(f"{doc} has no generated block: add the lines {CHART_BEGIN!r} and {CHART_END!r}")
    doc.write_text(text[: begin + len(CHART_BEGIN)] + "\n" + block + text[end:], encoding="utf-8")
    return block


def _child(args: argparse.Namespace) -> None:
    """One variant in this process: print a JSON line per checkpoint (``--child`` mode)."""
    from synthwatch.bench.workload import bench_regions, bench_substances, keyed_lines
    from synthwatch.settings import Settings
    from synthwatch.stream_apps.detect.intake import Intake, RawMessage

    variant: str = args.child
    client: Any = None
    sink: ClickHouseSink | None = None  # typed: a renamed sink method must fail the type check, not this bench
    regions, substances = bench_regions(100), bench_substances(50)
    intake = Intake()
    stages = _Stages() if variant == "detectors" else None
    if args.tracemalloc:
        import tracemalloc

        tracemalloc.start(5)  # after the imports: what the events leave behind, not the code loaded

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
    from synthwatch.stream_apps.storage.clickhouse import engine_scratch_directory

    with engine_scratch_directory("synthwatch-bench-memory-") as tmp:
        if variant not in ("python", "detectors"):
            from synthwatch.stream_apps.storage.clickhouse import connect, migrate
            from synthwatch.stream_apps.storage.sink import ClickHouseSink

            client = connect(Settings(data_dir=tmp))
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
            if stages is not None:
                stages.take(result.events)
            if sink is not None:
                sink.stored_event_digests(result.events)  # the worker's late-event check (keep_late)
                sink.store_events(result.events)
            done += len(chunk)
            if done % args.every < args.batch or done >= args.events:
                report("stored", done, started)
        if args.tracemalloc:
            import gc
            import tracemalloc

            del chunk, result  # the last batch: not state
            gc.collect()
            tracemalloc.take_snapshot().dump(str(args.tracemalloc))
        if client is not None:
            client.close()


class _Stages:
    """The worker's region and novelty stages as its agents drive them, without Kafka: the region stage
    with its outbox, each batch's changed records kept as JSON bytes in a dict (the changelog table), the
    sightings through their JSON messages to the novelty stage, its records kept the same way."""

    def __init__(self) -> None:
        from synthwatch.settings import Settings
        from synthwatch.stream_apps.detect.novelty import NoveltyDetector
        from synthwatch.stream_apps.detect.region import DetectionConfig, RegionDetector
        from synthwatch.stream_apps.runtime.state_tables import load_record

        config = DetectionConfig.from_settings(Settings())
        self.region_table: dict[str, bytes] = {}
        self.substance_table: dict[str, bytes] = {}
        self.regions = RegionDetector(config, fetch=partial(load_record, self.region_table))
        self.regions.outbox = True
        self.novelty = NoveltyDetector(config.novelty)
        self.novelty.fetch = partial(load_record, self.substance_table)

    def take(self, events: list[Any]) -> None:
        from pydantic_core import to_json

        from synthwatch.schemas.topics import Sighting
        from synthwatch.stream_apps.detect.region import Observation

        sightings = []
        for item in events:
            found = self.regions.observe(Observation.of(item), at=("bench", int(item.source.rsplit(":", 1)[1])))
            sightings.extend(found.sightings)
        for _, key, value in self.regions.drain_dirty():
            self.region_table[key] = to_json(value)
        self.regions.take_outbox()
        messages = [json.dumps([s.to_dict()]).encode() for s in sorted(sightings, key=lambda s: s.occurred_at)]
        batch = [(Sighting.from_dict(d), None) for m in messages for d in json.loads(m)]
        self.novelty.observe_batch(batch)
        for key, value in self.novelty.drain_dirty():
            self.substance_table[key] = to_json(value)


def run_variant(
    variant: str, events: int, batch: int, every: int, console: Console, trace: Path | None = None
) -> list[dict[str, Any]]:
    """Run one variant in a fresh process; its checkpoints, printed as they come. ``trace``: also trace its
    Python allocations and write the snapshot after the last event there (``--snapshot`` reads it)."""
    command = [sys.executable, "-m", "synthwatch.bench.memory", "--child", variant]
    command += ["--events", str(events), "--batch", str(batch), "--every", str(every)]
    if trace is not None:
        command += ["--tracemalloc", str(trace.with_name(f"{trace.name}.{variant}"))]
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
    return _num(None if kib is None else kib / 1024)


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
    console: Console,
    events: int = 1_100_000,
    batch: int = 10_000,
    every: int = 100_000,
    variants: Sequence[str] = (),
    trace: Path | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Each variant's checkpoints, then one table of the final numbers."""
    variants = variants or tuple(VARIANTS)
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise ValueError(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    results = {v: run_variant(v, events, batch, every, console, trace) for v in variants}
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
        "python: intake only, no engine (the Python share of this path); detectors: python and the region and "
        "novelty stages with their tables as the worker keeps them; chdb-default: the engine with chDB's "
        "own allocator setting (dirty_decay_ms:5000); decay-0: freed pages returned at once; shipped: "
        "synthwatch.stream_apps.storage.clickhouse.connect as the worker opens it (EMBEDDED_MALLOC_CONF)."
    )
    return results


#: the innermost frame of this project's code in an allocation's traceback names who allocated it
_OURS = ("/synthwatch/", "/stream_apps/", "/schemas/", "/producers/")


def _owner(frames: Any) -> str:
    """The innermost frame of this project's code, else the innermost frame (``file:line``)."""
    for frame in reversed(frames):  # tracemalloc keeps the most recent call last
        if any(part in frame.filename for part in _OURS):
            return f"{frame.filename.rsplit('/', 2)[-2]}/{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}"
    last = frames[-1]
    return f"{last.filename.rsplit('/', 1)[-1]}:{last.lineno}"


def snapshot_report(path: Path, console: Console, top: int = 25) -> dict[str, Any]:
    """What a worker's tracemalloc snapshot holds (``python -m synthwatch.bench.pipeline --changes
    tracemalloc`` writes one after the RSS phase): the total, the biggest tracebacks, and the same
    allocations grouped by the innermost frame of this project's code (who asked for them)."""
    import tracemalloc

    snapshot = tracemalloc.Snapshot.load(str(path))
    stats = snapshot.statistics("traceback")
    total = sum(s.size for s in stats)
    blocks = sum(s.count for s in stats)
    console.print(f"{path}: {total / 2**20:,.1f} MiB traced in {blocks:,} blocks ({snapshot.traceback_limit} frames)")
    owners: dict[str, list[int]] = {}
    for stat in stats:
        entry = owners.setdefault(_owner(stat.traceback), [0, 0])
        entry[0] += stat.size
        entry[1] += stat.count
    table = Table(title="by the innermost frame of this project's code (else the innermost frame)")
    for column in ("where", "MiB", "blocks", "B/block"):
        table.add_column(column, justify="left" if column == "where" else "right")
    ranked = sorted(owners.items(), key=lambda kv: -kv[1][0])
    for where, (size, count) in ranked[:top]:
        table.add_row(where, f"{size / 2**20:,.1f}", f"{count:,}", f"{size / max(count, 1):,.0f}")
    console.print(table)
    for stat in stats[: min(top, 12)]:
        console.print(f"[bold]{stat.size / 2**20:,.1f} MiB, {stat.count:,} blocks[/]")
        for frame in stat.traceback.format()[-2 * snapshot.traceback_limit :]:
            console.print(f"  {frame.strip()}", highlight=False, markup=False)
    return {
        "traced_bytes": total,
        "blocks": blocks,
        "owners": [{"where": w, "bytes": s, "blocks": c} for w, (s, c) in ranked[:top]],
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m synthwatch.bench.memory", description=__doc__)
    parser.add_argument("--events", type=int, default=1_100_000)
    parser.add_argument("--batch", type=int, default=10_000, help="events per store_events call")
    parser.add_argument("--every", type=int, default=100_000, help="events between two RSS readings")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--json", type=Path, help="also write every checkpoint to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument(
        "--tracemalloc",
        type=Path,
        metavar="DUMP",
        help="trace each variant's Python allocations (slow) and write a snapshot after the last event to "
        "DUMP.VARIANT (read it with --snapshot)",
    )
    parser.add_argument(
        "--chart",
        type=Path,
        metavar="PIPELINE_JSON",
        help="instead: write the RSS series of `python -m synthwatch.bench.pipeline --json FILE` into --doc",
    )
    parser.add_argument("--doc", type=Path, default=Path("docs/performance.md"))
    parser.add_argument(
        "--snapshot",
        type=Path,
        metavar="DUMP",
        help="instead: what a worker's tracemalloc snapshot holds (`python -m synthwatch.bench.pipeline "
        "--changes tracemalloc` writes one after the RSS phase)",
    )
    args = parser.parse_args(argv)
    if args.child:
        _child(args)
        return
    from synthwatch.consoles import command_console

    if args.chart:
        print(write_rss_chart(args.chart, args.doc))
        return
    if args.snapshot:
        report = snapshot_report(args.snapshot, command_console())
        if args.json:
            args.json.write_text(json.dumps(report, indent=1), encoding="utf-8")
        return

    variants = [v for v in args.variants.split(",") if v]
    results = bench_memory(command_console(), args.events, args.batch, args.every, variants, args.tracemalloc)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
