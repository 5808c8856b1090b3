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

Its parts: the streams and topics in :mod:`.workload`, the worker processes in :mod:`.workers`, alert
latency in :mod:`.latency`, the variants (``--floor``, ``--experiments``, ``--latency-experiments``) in
:mod:`.experiments`; this module runs the phases and prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from synthwatch.bench.audit import audit_phase
from synthwatch.bench.bare_faust import FLOOR, raw_aiokafka_rate, run_bare_agent
from synthwatch.bench.experiments import (
    EXPERIMENTS,
    LATENCY_EXPERIMENTS,
    chosen,
    floor_experiments,
    latency_experiments,
    parse_checkouts,
    worker_experiments,
)
from synthwatch.bench.latency import LatencyStream, alert_latency, hop_lines
from synthwatch.bench.memory import RssSeries, engine_heap_mib, proc_status, process_cpu_seconds, rss_table
from synthwatch.bench.workers import (
    TRACEMALLOC_DUMP,
    WORKER_ENV,
    BenchWorker,
    clickhouse_url,
    start_worker,
    wait_consumed,
    wait_idle,
)
from synthwatch.bench.workload import (
    Topics,
    bench_broker,
    bench_regions,
    bench_substances,
    events_rate,
    keyed_lines,
    machine,
    publish_lines,
    ratio,
    simulated_lines,
)
from synthwatch.consoles import command_console
from synthwatch.settings import Settings
from synthwatch.stack.engine import EngineProcess

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


def ingest_historyevents_rate(base: Settings, path: Path, data_dir: Path) -> dict[str, Any] | None:
    """``ingest_history`` on ``path`` in a child process with its own engine; None if it does not exist."""
    try:
        import synthwatch.stream_apps.storage.backfill.ingest as history

        if not hasattr(history, "ingest_history"):
            return None
    except ImportError:
        return None
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNTHWATCH_")}
    env["SYNTHWATCH_DATA_DIR"] = str(data_dir)
    url = clickhouse_url(base, f"bench_history_{data_dir.name.replace('-', '_')}")
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


def tracemalloc_snapshot(worker: BenchWorker, target: Path, timeout: float = 600.0) -> Path:
    """Ask a worker of the ``tracemalloc`` variant for its snapshot (SIGUSR2) and move it to ``target``."""
    dump = worker.data_dir / TRACEMALLOC_DUMP
    dump.unlink(missing_ok=True)
    worker.process.send_signal(signal.SIGUSR2)
    deadline = time.monotonic() + timeout
    while not dump.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no tracemalloc snapshot in {dump} after {timeout:.0f} s: see {worker.log_path}")
        time.sleep(0.5)
    shutil.move(dump, target)
    return target


def bench_pipeline(
    console: Console,
    events: int = 100_000,
    latency_seconds: int = 20,
    rss_events: int = 1_000_000,
    *,
    rss_every: int = 100_000,
    rate: int = 1000,
    scale_out: bool = True,
    history: bool = True,
    changes: Sequence[str] = (),
    seed: int = 5,
    keep: Path | None = None,
    engine_process: bool = False,
) -> dict[str, Any]:
    """Run every phase and print one table; returns the numbers (also for docs/performance.md).

    ``changes``: other setting values for the measured workers (names of ``WORKER_ENV``); empty
    measures the shipped worker. Sizes of 0 skip a phase. ``keep``: the run's directory (workers' data and
    logs, the stream, ``rss-audit.json``) goes under it and stays; without it the run's directory is deleted.
    ``engine_process``: the workers use the embedded engine in a process of its own over HTTP
    (:mod:`synthwatch.stack.engine`), each with a database of its own; its RSS and CPU are reported beside
    the worker's (what leaves the worker does not leave the machine).
    """
    base = Settings()
    results: dict[str, Any] = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine()}
    results["changes"] = list(changes)
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="synthwatch-bench-pipeline-", dir=keep))
    if keep is not None:
        results["kept"] = str(tmp)
        console.print(f"keeping this run's directories and logs in {tmp}")
    workers: list[BenchWorker] = []
    engine: EngineProcess | None = None
    try:
        if engine_process:
            engine = EngineProcess(tmp / "engine" / "chdb", tmp / "engine.log").start()
            base = base.model_copy(update={"clickhouse_url": engine.url("default")})
            results["engine_process"] = True
            console.print(f"engine process {engine.pid} on 127.0.0.1:{engine.port}")
        with bench_broker(base, console) as servers:
            run = uuid.uuid4().hex[:6]
            settings = Topics(f"{run}-main").created(base, servers)
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

            cpu = worker.cpu_seconds()
            engine_cpu = process_cpu_seconds(engine.pid) if engine is not None else 0.0
            started = time.perf_counter()
            with Publisher(settings, servers) as publisher:
                summary = publisher.publish_records(
                    InputRecord(source=f"stream.ndjson:{i}", raw=line) for i, line in enumerate(lines, start=1)
                )
            published = time.perf_counter()
            done = wait_consumed([worker], summary.sent, timeout=max(600.0, events / 100))
            cpu_stored = worker.cpu_seconds() - cpu
            engine_cpu = process_cpu_seconds(engine.pid) - engine_cpu if engine is not None else 0.0
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
                # the worker's CPU (all threads, the engine's too) from first publish to last stored, per 100k
                # events: moves far less with the machine's load than events/s (docs/performance.md)
                "worker_cpu_per_100k": cpu_stored * 100_000 / max(summary.sent, 1),
                # the engine process's CPU over the same span (0 when the engine is in the worker)
                "engine_cpu_per_100k": engine_cpu * 100_000 / max(summary.sent, 1),
                "load": os.getloadavg(),
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
                before = worker.checkpointed()
                regions, substances = bench_regions(100), bench_substances(50)
                series = RssSeries(
                    worker.process.pid,
                    worker.checkpointed,
                    rss_every,
                    partial(engine_heap_mib, worker.query),  # the engine's, wherever it runs (through /sql)
                    engine_pid=engine.pid if engine is not None else None,
                ).start()
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
                audit = partial(
                    _audit_rss, console, worker, servers, settings, run, rss_events, tmp, summary.sent + sent
                )
                try:
                    done = wait_consumed([worker], before + sent, timeout=max(900.0, rss_events / 200))
                    wait_idle([worker], timeout=900)  # the novelty stage's state is part of what is measured
                except RuntimeError:
                    if keep is not None:  # the run ends here: audit while the (in-memory) broker still has the topics
                        audit()
                    raise
                series.finish(worker.checkpointed() - before)
                # read before the audit: its queries run in the worker's engine (the RSS read after them was
                # 176-280 MiB above the series' last reading in five 1 M-event runs, docs/performance.md)
                memory = worker.memory_kib()
                engine_memory = proc_status(engine.pid, ("VmRSS", "VmHWM")) if engine is not None else {}
                if keep is not None:  # what the worker stored of this phase, and the group's offsets
                    results["rss_audit"] = audit()
                if "tracemalloc" in changes:
                    dumped = tracemalloc_snapshot(worker, Path.cwd() / f"tracemalloc-{run}.dump")
                    results["tracemalloc_dump"] = str(dumped)
                    console.print(f"tracemalloc snapshot: {results['tracemalloc_dump']}")
                results["rss"] = {
                    "events": sent,
                    "failed": failed,
                    "keys": len(regions) * len(substances),
                    "rss_kib": memory.get("VmRSS", 0),
                    "peak_kib": memory.get("VmHWM", 0),
                    "engine_rss_kib": engine_memory.get("VmRSS", 0),  # the engine process (0: in the worker)
                    "engine_peak_kib": engine_memory.get("VmHWM", 0),
                    "seconds": done - started,
                    "rate": sent / (done - started),
                    "worker_total_events": worker.stats()["consumed"],
                    "events_before": before,  # input events the worker had checkpointed when the phase began
                    "heap_trims": worker.stats().get("heap_trims"),  # the worker's malloc_trim calls, and their time
                    "heap_trim_seconds": worker.stats().get("heap_trim_seconds"),
                    # seek-backs of the consumer watchdog during the burst (a busy worker is not a stalled one)
                    "watchdog_seek_backs": worker.stats().get("consumer_stalls"),
                    # /ready reads unanswered within 10 s (the event loop held), and the longest time unanswered
                    "ready_timeouts": worker.ready_timeouts,
                    "longest_unanswered_s": round(worker.longest_unanswered, 1),
                    "series": series.rows(),
                    "series_errors": series.errors[:20],
                }
                console.print(f"RSS phase: { ({k: v for k, v in results['rss'].items() if k != 'series'}) }")
                console.print(rss_table(series.points, before))
                if series.errors:
                    lost = f"{len(series.errors)} of {series.polls} readings failed"
                    console.print(f"RSS series: {lost}: {series.errors[:3]}")

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
                    "per_type": latency.per_type(),
                    "hops": latency.hop_table(),
                }
                console.print(f"latency: {results['latency']}")
                for line in hop_lines(latency):
                    console.print(f"latency hops, {line}")
            worker.stop()

            # 6. the floor again, with nothing else running: how much the machine's noise moves it
            results["bare_faust"].append(run_bare_agent(servers, settings.input_topics, summary.sent, FLOOR).rate)
            results["raw_aiokafka_again"] = raw_aiokafka_rate(servers, settings.input_topics, summary.sent).rate

            # 7. the bulk path on the same file
            if history:
                results["history"] = ingest_historyevents_rate(base, stream_path, tmp / "history")
                console.print(f"ingest-history: {results['history']}")

            # 8. scale-out: one worker, then two in one consumer group, each on fresh topics
            if scale_out and events > 0:
                results["scale_out"] = _scale_out(base, servers, tmp, events, run, changes, console)
    finally:
        for w in workers:
            w.stop()
        if engine is not None:
            engine.stop()
        if keep is None:
            shutil.rmtree(tmp, ignore_errors=True)
    _print_table(console, results)
    return results


def _audit_rss(
    console: Console,
    worker: BenchWorker,
    servers: str,
    settings: Settings,
    run: str,
    rss_events: int,
    tmp: Path,
    sent_with_e2e: int,
) -> dict[str, Any]:
    """The RSS phase's audit (:func:`synthwatch.bench.audit.audit_phase`) into ``tmp/rss-audit.json``; returns
    it without the per-event list, with both phases' sent and stored counts (as the benchmark counted the 163)."""
    audit = audit_phase(
        worker.query,
        servers,
        f"bench-{run}",  # the worker's app id: its consumer group
        [*settings.input_topics, settings.topic_sightings],
        f"rss-{run}-",
        rss_events,
        tmp / "rss-audit.json",
    )
    summary = {k: v for k, v in audit.items() if k != "events"}
    summary["sent_with_e2e"] = sent_with_e2e
    summary["stored_with_e2e"] = worker.count(
        "SELECT (SELECT count() FROM lab_detections) + (SELECT count() FROM border_seizures)"
    )
    console.print(f"RSS audit ({tmp / 'rss-audit.json'}): {summary}")
    return summary


def _scale_out(
    base: Settings, servers: str, tmp: Path, events: int, run: str, changes: Sequence[str], console: Console
) -> dict[str, Any]:
    """Throughput of one worker and of two sharing a group; per-worker counts show the partition split."""
    out: dict[str, Any] = {}
    regions, substances = bench_regions(100), bench_substances(50)
    for n in (1, 2):
        settings = Topics(f"{run}-scale{n}").created(base, servers)
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
        Row("raw aiokafka consumer + json.loads (transport limit)", events_rate(raw), "1.00", ratio(raw, floor)),
        Row(
            "bare Faust agent, decode + count (framework floor; mean of "
            + ", ".join(f"{x:,.0f}" for x in floors)
            + ")",
            events_rate(floor),
            ratio(floor, raw),
            "1.00",
        ),
    ]
    if "e2e" in r:
        e = r["e2e"]["rate"]
        rows.append(
            Row(
                f"end to end, first publish -> last event in ClickHouse ({r['e2e']['sent']:,} events; worker CPU "
                f"{r['e2e'].get('worker_cpu_per_100k', math.nan):.1f} s per 100k)",
                events_rate(e),
                ratio(e, raw),
                ratio(e, floor),
                ">= 1.5 x floor",  # issue 16 (was 0.70 x)
                "yes" if floor and e / floor >= 1.5 else "NO",
            )
        )
    if "rss" in r:
        s = r["rss"]
        rows.append(
            Row(
                f"sustained, {s['events']:,} events over {s['keys']:,} keys",
                events_rate(s["rate"]),
                ratio(s["rate"], raw),
                ratio(s["rate"], floor),
            )
        )
    if "latency" in r:
        lat = r["latency"]
        rows.append(
            Row(
                f"alert latency p50 / p99 at {lat['achieved_rate']:,.0f} events/s ({lat['matched']} alerts)",
                f"{lat['p50'] * 1000:,.0f} / {lat['p99'] * 1000:,.0f} ms",
                target="p99 <= 150 ms",  # issue 16 (was 500 ms)
                met="yes" if lat["p99"] <= 0.15 else "NO",
            )
        )
    if "ready_wall" in r:
        rows.append(
            Row(
                "worker start-up to ready (process start; worker's own figure)",
                f"{r['ready_wall']:.2f} s ({r['ready_reported']:.2f} s)",
                target="<= 3 s",  # issue 16 (was 10 s)
                met="yes" if r["ready_wall"] <= 3 else "NO",
            )
        )
    if "rss" in r:
        s = r["rss"]
        rows.append(
            Row(
                f"worker RSS after {s['worker_total_events']:,} events, {s['keys']:,} keys (peak)",
                f"{s['rss_kib'] / 1024:,.0f} MiB ({s['peak_kib'] / 1024:,.0f} MiB)",
                target="<= 512 MiB",
                met="yes" if s["rss_kib"] <= 512 * 1024 else "NO",
            )
        )
        if s.get("engine_rss_kib"):  # --engine-process: what left the worker did not leave the machine
            rows.append(
                Row(
                    "engine process RSS, read with the worker's (peak); worker + engine process",
                    f"{s['engine_rss_kib'] / 1024:,.0f} MiB ({s['engine_peak_kib'] / 1024:,.0f} MiB); "
                    f"{(s['rss_kib'] + s['engine_rss_kib']) / 1024:,.0f} MiB",
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
                    events_rate(rate),
                    ratio(rate, raw),
                    ratio(rate, floor),
                )
            )
    for n in (1, 2):
        s = r.get("scale_out", {}).get(f"workers_{n}")
        if s:
            split = " + ".join(f"{c:,}" for c in s["per_worker"])
            rows.append(
                Row(
                    f"scale-out: {n} worker(s), one group, 4 partitions (consumed: {split})",
                    events_rate(s["rate"]),
                    ratio(s["rate"], raw),
                    ratio(s["rate"], floor),
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


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="synthwatch bench pipeline (also: --floor, --experiments)")
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--latency-seconds", type=int, default=20)
    parser.add_argument("--rss-events", type=int, default=1_000_000)
    parser.add_argument("--rss-every", type=int, default=100_000, help="events between two RSS readings")
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
    parser.add_argument(
        "--checkouts",
        default="",
        help="with --experiments or --latency-experiments: LABEL=DIR,... other checkouts' workers (each DIR after "
        "`make install`), compared with their shipped settings in alternating rounds (--repeat)",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--keep",
        type=Path,
        metavar="DIR",
        help="keep the run's directory (workers' data and logs) under DIR and audit the RSS phase's stored events",
    )
    parser.add_argument(
        "--engine-process",
        action="store_true",
        help="the workers use the embedded engine in a process of their own, over HTTP (synthwatch.stack.engine)",
    )
    args = parser.parse_args(argv)
    console = command_console()
    result: Any
    if args.floor:
        result = [r.__dict__ for r in floor_experiments(console, args.events)]
    elif args.latency_experiments:
        variants = chosen(LATENCY_EXPERIMENTS, args.variants)
        result = latency_experiments(
            console,
            args.rss_events,
            args.rate,
            args.latency_seconds,
            variants,
            checkouts=parse_checkouts(args.checkouts),
            repeat=args.repeat,
        )
    elif args.experiments:
        result = worker_experiments(
            console,
            args.events,
            chosen(EXPERIMENTS, args.variants),
            repeat=args.repeat,
            checkouts=parse_checkouts(args.checkouts),
        )
    else:
        result = bench_pipeline(
            console,
            args.events,
            args.latency_seconds,
            args.rss_events,
            rss_every=args.rss_every,
            rate=args.rate,
            scale_out=not args.no_scale_out,
            history=not args.no_history,
            changes=[c for c in args.changes.split(",") if c],
            keep=args.keep,
            engine_process=args.engine_process,
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")


if __name__ == "__main__":
    main()
