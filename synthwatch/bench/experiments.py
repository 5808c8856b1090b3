"""Experiments: what raises the framework floor, and what the setting variants do to the real worker's backlog
drain and alert latency (``python -m synthwatch.bench.pipeline --floor / --experiments / --latency-experiments``).
"""

from __future__ import annotations

import math
import os
import shutil
import statistics
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console
from rich.table import Table

from synthwatch.bench.bare_faust import (
    FLOOR_EXPERIMENTS,
    FloorResult,
    FloorVariant,
    raw_aiokafka_rate,
    run_bare_agent,
)
from synthwatch.bench.latency import LatencyStream, alert_latency, hop_lines
from synthwatch.bench.workers import start_worker, wait_consumed, wait_first_consumed, wait_idle
from synthwatch.bench.workload import (
    Topics,
    bench_broker,
    bench_regions,
    bench_substances,
    keyed_lines,
    machine,
    publish_lines,
    ratio,
    simulated_lines,
)
from synthwatch.settings import Settings

T = TypeVar("T")

#: What ``--experiments`` compares (backlog drain): each a combination of the above.
EXPERIMENTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("shipped settings", ()),
    ("batches by Faust's noack_take (0.25 s window)", ("take-batches",)),
    ("channel batches without linger", ("no-linger",)),
    ("checkpoint every 0.25 s", ("checkpoint-0.25",)),
    ("fetch wait 20 ms", ("fetch-wait-20",)),
    ("fetch wait 100 ms (the default before 50)", ("fetch-wait-100",)),
    ("producer batches of 16 KiB (Faust's default)", ("producer-16k",)),
    ("sink batch 2,000 (the previous default)", ("batch-2000",)),
    ("without gc.freeze", ("no-gc-freeze",)),
    ("uvloop instead of asyncio's loop", ("uvloop",)),
    ("stream buffer 32768, 5000 records per poll", ("buffers",)),
    ("partition fetches of 32 KiB", ("fetch-32k",)),
    ("Python objects from glibc's malloc, 2 arenas (PYTHONMALLOC=malloc)", ("glibc-malloc",)),
    ("at most 2 glibc arenas (MALLOC_ARENA_MAX=2)", ("arenas-2",)),
    ("glibc's mmap threshold fixed at 128 KiB", ("mmap-128k",)),
    ("collector thresholds 50,000 / 20 / 100", ("gc-50k",)),
    ("collector thresholds 5,000 / 5 / 4,000", ("gc-5k",)),
    ("collector thresholds 2,000 / 10 / 1,000", ("gc-2k",)),
)


def floor_experiments(
    console: Console, events: int = 100_000, variants: Sequence[FloorVariant] = FLOOR_EXPERIMENTS
) -> list[FloorResult]:
    """Each bare-agent variant on the same published messages, raw aiokafka first and last."""
    base = Settings()
    results: list[FloorResult] = []
    with bench_broker(base, console) as servers:
        settings = Topics(f"{uuid.uuid4().hex[:6]}-floor").created(base, servers)
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
    table = Table(title=f"raising the framework floor: {events:,} events, one broker ({machine()})")
    for column in ("variant", "events/s", "vs per-event defaults"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    reference = results[1].rate
    for result in results:
        table.add_row(result.variant, f"{result.rate:,.0f}", ratio(result.rate, reference))
    console.print(table)
    return results


@dataclass(frozen=True)
class Checkout:
    """Another checkout's worker, to compare code (not settings) in one run on one broker: ``python`` is that
    checkout's virtualenv interpreter (its ``make install`` makes the package editable there)."""

    label: str
    python: str


def parse_checkouts(text: str) -> list[Checkout]:
    """``LABEL=DIR,LABEL=DIR`` (``--checkouts``): each DIR a checkout with its own ``.venv``."""
    checkouts = []
    for item in filter(None, text.split(",")):
        label, sep, directory = item.partition("=")
        python = Path(directory) / ".venv" / "bin" / "python"
        if not sep or not python.exists():
            raise SystemExit(f"--checkouts: {item!r} is not LABEL=DIR with DIR/.venv/bin/python (make install there)")
        checkouts.append(Checkout(label, str(python)))
    return checkouts


@dataclass
class DrainRuns:
    """Each run of one worker variant: events/s (first consumed -> last stored) and the worker's CPU seconds
    per 100,000 events, to the last event stored and to the novelty stage caught up (its sightings)."""

    rates: list[float] = field(default_factory=list)
    cpu_stored: list[float] = field(default_factory=list)
    cpu_idle: list[float] = field(default_factory=list)
    per_batch: list[float] = field(default_factory=list)


def worker_experiments(
    console: Console,
    events: int = 100_000,
    experiments: Sequence[tuple[str, tuple[str, ...]]] = EXPERIMENTS,
    repeat: int = 1,
    checkouts: Sequence[Checkout] = (),
) -> dict[str, DrainRuns]:
    """Backlog drain rate and CPU of the real worker per combination of proposed changes, same messages.

    Every variant consumes the same published simulated stream with its own consumer group and engine,
    from its first consumed event to the last one stored; the bare agent runs first and last. With
    ``checkouts`` the variants are those checkouts' workers with their shipped settings instead, run in
    turn (``repeat`` rounds alternate them, so the machine's load falls on each alike).
    """
    base = Settings()
    variants: list[tuple[str, tuple[str, ...], str | None]] = (
        [(c.label, (), c.python) for c in checkouts] if checkouts else [(label, ch, None) for label, ch in experiments]
    )
    runs: dict[str, DrainRuns] = {}
    floor: list[float] = []
    tmp = Path(tempfile.mkdtemp(prefix="synthwatch-bench-experiments-"))
    try:
        with bench_broker(base, console) as servers:
            run = uuid.uuid4().hex[:6]
            shared = Topics(f"{run}-exp")
            settings = shared.created(base, servers)
            summary = publish_lines(settings, servers, iter(simulated_lines(events)))
            floor.append(run_bare_agent(servers, settings.input_topics, summary.sent).rate)
            per_100k = 100_000 / summary.sent
            for _ in range(repeat):
                for n, (label, changes, python) in enumerate(variants):
                    own = Topics(f"{run}-exp{n}-{uuid.uuid4().hex[:4]}", labs=shared.labs, seizures=shared.seizures)
                    own_settings = own.created(base, servers)
                    tag = uuid.uuid4().hex[:4]
                    worker = start_worker(
                        own_settings,
                        servers,
                        tmp / f"exp-{n}-{tag}",
                        changes,
                        app_id=f"bench-{run}-exp{n}-{tag}",
                        python=python,
                    )
                    r = runs.setdefault(label, DrainRuns())
                    try:
                        cpu = worker.cpu_seconds()  # ready and idle: start-up is not the drain's
                        first = wait_first_consumed([worker], 120)
                        done = wait_consumed([worker], summary.sent, timeout=900)
                        r.cpu_stored.append((worker.cpu_seconds() - cpu) * per_100k)
                        r.rates.append(summary.sent / (done - first))
                        wait_idle([worker], timeout=900)
                        r.cpu_idle.append((worker.cpu_seconds() - cpu) * per_100k)
                        batches = worker.stats().get("intake_batches") or 0
                    finally:
                        worker.stop()
                    r.per_batch.append(summary.sent / batches if batches else math.nan)
                    console.print(
                        f"{label}: {r.rates[-1]:,.0f} events/s, worker CPU {r.cpu_stored[-1]:.1f} s per 100k events "
                        f"({r.cpu_idle[-1]:.1f} s with the novelty stage caught up), "
                        f"{r.per_batch[-1]:,.0f} events per intake batch; load {_load()}"
                    )
            floor.append(run_bare_agent(servers, settings.input_topics, summary.sent).rate)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _drain_table(console, events, runs, floor)
    return runs


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def _drain_table(console: Console, events: int, runs: dict[str, DrainRuns], floor: list[float]) -> None:
    mean_floor = statistics.mean(floor)
    table = Table(title=f"worker backlog drain, {events:,} simulated events, one broker ({machine()})")
    columns = ("worker", "events/s (each run)", "vs bare Faust (mean)", "CPU s / 100k (each run)", "to idle", "median")
    for column in columns:
        table.add_column(column, justify="left" if column == "worker" else "right")
    table.add_row("bare Faust agent (floor)", ", ".join(f"{v:,.0f}" for v in floor), "1.00", "", "", "")
    for label, r in runs.items():
        table.add_row(
            label,
            ", ".join(f"{v:,.0f}" for v in r.rates),
            ratio(statistics.mean(r.rates), mean_floor),
            ", ".join(f"{v:.1f}" for v in r.cpu_stored),
            ", ".join(f"{v:.1f}" for v in r.cpu_idle),
            f"{statistics.median(r.cpu_stored):.1f}",
        )
    console.print(table)


#: Latency variants: (label, changes, extra environment for the worker).
LATENCY_EXPERIMENTS: tuple[tuple[str, tuple[str, ...], dict[str, str]], ...] = (
    ("shipped settings", (), {}),
    ("the settings before issue 16 (fetch wait 100 ms)", ("fetch-wait-100",), {}),
    ("batches by Faust's noack_take (0.25 s window)", ("take-batches",), {}),
    ("uvloop instead of asyncio's loop", ("uvloop",), {}),
    ("fetch wait 20 ms", ("fetch-wait-20",), {}),
    ("fetch wait 100 ms (the default before 50)", ("fetch-wait-100",), {}),
    ("Faust's fixed 1.5 s fetch wait", ("fetch-wait-1500",), {}),
    ("collector thresholds 50,000 / 20 / 100", ("gc-50k",), {}),
    ("collector thresholds 5,000 / 5 / 4,000", ("gc-5k",), {}),
    ("collector thresholds 2,000 / 10 / 1,000", ("gc-2k",), {}),
    ("bounded polls: 4,096 records a poll", ("poll-4096",), {}),
)


def collections_between(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """The worker's garbage collections between two /ready readings, per generation: how many, and the seconds
    they held it (every agent waits meanwhile); the longest one since ready. Empty from a worker that does not
    count them (another checkout's)."""
    if "gc_collections" not in after:
        return {}
    out: dict[str, float] = {}
    for g in range(3):
        out[f"gc{g} n"] = float(after["gc_collections"][g] - before["gc_collections"][g])
        out[f"gc{g} s"] = after["gc_seconds"][g] - before["gc_seconds"][g]
    out["gc longest s (since ready)"] = after["gc_longest_seconds"]
    return out


def latency_experiments(
    console: Console,
    warmup_events: int = 50_000,
    rate: int = 1000,
    seconds: int = 20,
    experiments: Sequence[tuple[str, tuple[str, ...], dict[str, str]]] = LATENCY_EXPERIMENTS,
    checkouts: Sequence[Checkout] = (),
    repeat: int = 1,
) -> dict[str, dict[str, float]]:
    """Alert latency per worker variant: fresh worker, ``warmup_events`` over 5,000 keys, then the steady rate.

    With ``checkouts``: those checkouts' workers with their shipped settings, ``repeat`` alternating rounds
    (a round's label gets `` #N`` from the second round on).
    """
    base = Settings()
    out: dict[str, dict[str, float]] = {}
    variants: list[tuple[str, tuple[str, ...], dict[str, str], str | None]] = (
        [(c.label, (), {}, c.python) for c in checkouts]
        if checkouts
        else [(label, changes, env, None) for label, changes, env in experiments]
    )
    tmp = Path(tempfile.mkdtemp(prefix="synthwatch-bench-latency-"))
    try:
        with bench_broker(base, console) as servers:
            regions, substances = bench_regions(100), bench_substances(50)
            rounds = [(k, n, v) for k in range(repeat) for n, v in enumerate(variants)]
            for k, n, (label, changes, env, python) in rounds:
                label = f"{label} #{k + 1}" if k else label
                run = uuid.uuid4().hex[:6]
                settings = Topics(f"{run}-lat{n}").created(base, servers)
                worker = start_worker(
                    settings,
                    servers,
                    tmp / f"lat-{k}-{n}",
                    changes,
                    app_id=f"bench-{run}",
                    extra_env=env,
                    python=python,
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
                    before = worker.stats()
                    result = alert_latency(
                        settings, servers, rate, seconds, LatencyStream(f"lat{run}", start, step, warmup_events)
                    )
                    collections = collections_between(before, worker.stats())
                finally:
                    worker.stop()
                out[label] = {
                    "p50": result.percentile(0.5),
                    "p99": result.percentile(0.99),
                    "max": max(result.matched) if result.matched else math.nan,
                    "alerts": float(len(result.matched)),
                    "rate": result.sent / result.seconds,
                    "load_1min": os.getloadavg()[0],
                    **collections,
                    **{f"{kind} {k}": v for kind, r in result.per_type().items() for k, v in r.items()},
                }
                console.print(f"{label}: {out[label]}")
                for line in hop_lines(result):
                    console.print(f"{label}, hops, {line}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    table = Table(title=f"alert latency at {rate:,} events/s after {warmup_events:,} events ({machine()})")
    kinds = ("new_substance", "first_in_region", "spike")
    for column in ("worker", "alerts", "p50 ms", "p99 ms", "max ms", *(f"{kind} p99 ms (n)" for kind in kinds)):
        table.add_column(column, justify="left" if column == "worker" else "right")

    def ms(value: float) -> str:
        return f"{value * 1000:,.0f}"

    for label, r in out.items():
        table.add_row(
            label,
            f"{r['alerts']:.0f}",
            ms(r["p50"]),
            ms(r["p99"]),
            ms(r["max"]),
            *(f"{ms(r[f'{kind} p99'])} ({r[f'{kind} alerts']:.0f})" if f"{kind} p99" in r else "" for kind in kinds),
        )
    console.print(table)
    return out


def chosen(variants: Sequence[T], indices: str) -> list[T]:
    """The variants named by comma-separated indices (``--variants``), or all of them."""
    return [variants[int(i)] for i in indices.split(",") if i] or list(variants)
