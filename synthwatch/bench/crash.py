"""``python -m synthwatch.bench.crash``: a worker SIGKILLed at N points of one stream raises the backtest's alerts.

Why: an early-warning system is judged by the alert it did not send, and a crash must not change which
alerts are sent or what they say (docs/performance.md, "Crash consistency"). Each run streams the same
simulated stream (a day of reports at a time, as labs and customs deliver them) to a fresh
``synthwatch worker`` on its own topics and group, SIGKILLs it once it has consumed a given count, starts
a new worker on the same data, publishes the rest, and waits until the group has committed the end of
every partition (inputs, sightings, alerts, rejects). It then reads every record of the alerts topic
and compares with the offline backtest of the same lines: the same alert ids, each with the same
content (``detected_at``, the wall clock, left out), and no id published twice with different content.
A reference run without a kill comes first.

A restarted worker that stops taking events (committed < end for ``--stall-seconds``) is reported as
stalled, not restarted: that is the restart stall of issue 11, section 1.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import date, timedelta
from functools import partial
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from synthwatch.bench.workers import BenchWorker, start_worker
from synthwatch.bench.workload import Topics
from synthwatch.producers.publisher import Publisher
from synthwatch.producers.readers import InputRecord
from synthwatch.producers.simulate import SimulationConfig, simulate
from synthwatch.schemas import Alert
from synthwatch.settings import Settings
from synthwatch.stack.broker import EmbeddedBroker, committed_offsets
from synthwatch.stack.kafka_checks import daily_chunks, read_all
from synthwatch.stream_apps.detect.backtest import run_lines


def alert_content(alert: Alert) -> str:
    """An alert as published, without the wall clock: what must not depend on a crash."""
    return alert.model_dump_json(exclude={"detected_at"})


def novelty_summary(alerts: Iterable[tuple[str, str, str | None, str]]) -> dict[str, object]:
    """Per substance: how often it was called new, the regions alerted, whether it spread.

    What must not depend on which partition's sighting arrived first (see test_detection_stream).
    """
    regions: dict[str, set[str]] = {}
    new: dict[str, int] = {}
    spread: set[str] = set()
    for _, kind, region, key in alerts:
        if kind in ("new_substance", "first_in_region"):
            regions.setdefault(key, set()).add(region or "")
        if kind == "new_substance":
            new[key] = new.get(key, 0) + 1
        if kind == "spread":
            spread.add(key)
    return {"regions": regions, "new": new, "spread": spread}


def compared(published: dict[str, set[str]], expected: dict[str, str]) -> dict[str, Any]:
    """How the alerts published on the topic (id -> contents seen) compare with the backtest's (id -> content)."""

    def kind(content: str) -> str:
        return str(json.loads(content)["alert_type"])

    def rows(alerts: dict[str, str]) -> list[tuple[str, str, str | None, str]]:
        out = []
        for i, content in alerts.items():
            a = json.loads(content)
            out.append((i, a["alert_type"], a["region"], a["substance"]["key"]))
        return out

    def without_evidence(content: str) -> dict[str, Any]:
        # The evidence a spike lists is its window's last 20 reports in arrival order: the two input topics
        # interleave in another order than the file's, with or without a crash.
        return {k: v for k, v in json.loads(content).items() if k != "evidence_event_ids"}

    stream = {i: min(contents) for i, contents in published.items()}
    spikes_stream = {i: without_evidence(c) for i, c in stream.items() if kind(c) == "spike"}
    spikes_backtest = {i: without_evidence(c) for i, c in expected.items() if kind(c) == "spike"}
    return {
        "only_stream": len(stream.keys() - expected.keys()),
        "only_backtest": len(expected.keys() - stream.keys()),
        "other_content": sum(1 for i in stream.keys() & expected.keys() if published[i] != {expected[i]}),
        "resent_changed": sum(1 for contents in published.values() if len(contents) > 1),
        "spikes": len(spikes_backtest),
        "spikes_same": spikes_stream == spikes_backtest,
        "novelty_same": novelty_summary(rows(stream)) == novelty_summary(rows(expected)),
    }


@dataclass
class CrashRun:
    """One run: where the worker was killed and how the alerts it published compare with the backtest."""

    point: int
    kill_target: int | None  # consumed count at which the kill was asked for (None: the reference run)
    killed_consumed: int = 0  # what the worker had consumed when killed
    killed_checkpointed: int = 0  # of which acknowledged (rows and state written)
    replayed: int = 0  # events the restarted worker read again and found in detector state
    replayed_sightings: int = 0
    duplicates: int = 0  # events read again and found stored only (rows written, state not)
    alerts: int = 0  # distinct alert ids on the alerts topic
    only_stream: int = 0
    only_backtest: int = 0
    other_content: int = 0  # ids in both whose content differs from the backtest's
    resent_changed: int = 0  # ids published more than once with different content
    spikes: int = 0
    spikes_same: bool = False  # the backtest's spike alerts, id for id, field for field (but evidence order)
    novelty_same: bool = False  # the same substances new, the same regions reached, the same spreads
    committed_end: bool = False
    stalled: str = ""
    seconds: float = 0.0

    @property
    def identical(self) -> bool:
        """Every alert id and its content as the backtest's (not met without a kill either, see docs)."""
        return self.committed_end and not (
            self.only_stream or self.only_backtest or self.other_content or self.resent_changed
        )

    @property
    def consistent(self) -> bool:
        """What a crash must not change: no alert published again with other content, the backtest's
        spikes exactly, the backtest's novelty (which substances are new, where, spreading), and every
        partition committed to its end."""
        return self.committed_end and not self.resent_changed and self.spikes_same and self.novelty_same


def _wait(predicate: Callable[[], bool], timeout: float, interval: float = 0.3) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def _consumed_at_least(worker: BenchWorker, count: int) -> bool:
    return bool(worker.stats()["consumed"] >= count)


def _caught_up(servers: str, group: str, topics: list[str]) -> Callable[[], bool]:
    """Committed offset = end on every partition of ``topics`` (empty partitions count as caught up)."""

    def check() -> bool:
        return all(
            end == 0 or committed == end for committed, end in committed_offsets(servers, group, topics).values()
        )

    return check


def _offsets_text(servers: str, group: str, topics: list[str]) -> str:
    parts = [
        f"{tp.topic}[{tp.partition}] {committed}/{end}"
        for tp, (committed, end) in sorted(committed_offsets(servers, group, topics).items(), key=lambda i: str(i[0]))
        if committed != end
    ]
    return ", ".join(parts)


def run_once(
    broker: EmbeddedBroker,
    base: Settings,
    workdir: Path,
    chunks: list[list[str]],
    expected: dict[str, str],
    point: int,
    kill_at: int | None,
    stall_seconds: float,
) -> CrashRun:
    """Stream ``chunks`` to a worker, SIGKILL it once it has consumed ``kill_at`` events, restart, compare."""
    started = time.monotonic()
    servers = broker.bootstrap_servers
    suffix = uuid.uuid4().hex[:6]
    topics = Topics(suffix)
    settings = topics.created(base, servers, app_id=f"synthwatch-crash-{suffix}")
    done_topics = [*topics.inputs, topics.sightings, topics.alerts, topics.rejects]
    data_dir = workdir / f"run-{point}"
    run = CrashRun(point, kill_at)
    worker: BenchWorker = start_worker(settings, servers, data_dir)
    caught_up = _caught_up(servers, settings.app_id, done_topics)
    try:
        sent = 0
        with Publisher(settings, servers) as publisher:
            for number, chunk in enumerate(chunks):
                summary = publisher.publish_records(
                    InputRecord(source=f"day{number}:{i}", raw=line) for i, line in enumerate(chunk)
                )
                sent += summary.sent
                if kill_at is not None and run.killed_consumed == 0 and sent >= kill_at:
                    _wait(partial(_consumed_at_least, worker, kill_at), 120, interval=0.005)
                    stats = worker.stats()
                    worker.process.send_signal(signal.SIGKILL)
                    worker.process.wait(10)
                    run.killed_consumed, run.killed_checkpointed = stats["consumed"], stats["checkpointed"]
                    (data_dir / "worker.log").rename(data_dir / "worker-killed.log")
                    worker = start_worker(settings, servers, data_dir)
                # A day is done when the group has committed every partition's end: the backtest's file
                # order needs the days in order, and it is what survives a kill.
                if not _wait(caught_up, stall_seconds):
                    run.stalled = f"day {number}: " + _offsets_text(servers, settings.app_id, done_topics)
                    break
        run.committed_end = not run.stalled and caught_up()
        stats = worker.stats()
        run.replayed, run.replayed_sightings = stats.get("replayed", 0), stats.get("replayed_sightings", 0)
        run.duplicates = stats["duplicates"]
        records = read_all(servers, [topics.alerts], idle=1.0)
    finally:
        worker.stop()
    published: dict[str, set[str]] = {}
    for value in records:
        alert = Alert.model_validate_json(value)
        published.setdefault(alert.alert_id, set()).add(alert_content(alert))
    run.alerts = len(published)
    for name, value in compared(published, expected).items():
        setattr(run, name, value)
    run.seconds = time.monotonic() - started
    with open(data_dir / "differences.ndjson", "w", encoding="utf-8") as out:  # kept when the run differs
        for i in sorted(published.keys() | expected.keys()):
            if published.get(i) != ({expected[i]} if i in expected else None):
                out.write(
                    json.dumps({"id": i, "stream": sorted(published.get(i, ())), "backtest": expected.get(i)}) + "\n"
                )
    if run.consistent:
        shutil.rmtree(data_dir, ignore_errors=True)
    return run


def bench_crash(
    console: Console, points: int, days: int, seed: int, events_per_day: int, stall_seconds: float, reference: bool
) -> list[CrashRun]:
    """Run the reference and ``points`` kills; print the table; return the runs."""
    sim = simulate(
        SimulationConfig(days=days, seed=seed, start=date.today() - timedelta(days=days), events_per_day=events_per_day)
    )
    backtest = run_lines((f"sim:{i}", line) for i, line in enumerate(sim.lines))
    expected = {a.alert_id: alert_content(a) for a in backtest.alerts}
    chunks = daily_chunks(sim.lines)
    total = len(sim.lines)
    console.print(
        f"{len(sim.lines):,} lines over {len(chunks)} days (seed {seed}); backtest: {len(expected)} alerts "
        f"{backtest.summary.alerts_by_type}"
    )
    runs: list[CrashRun] = []
    workdir = Path(tempfile.mkdtemp(prefix="synthwatch-bench-crash-"))
    targets: list[int | None] = [None] if reference else []
    # Kill points spread over the stream, by consumed count (the publisher drops a few bad lines, so aim low).
    targets += [int(total * 0.97 * k / (points + 1)) for k in range(1, points + 1)]
    with EmbeddedBroker(Settings(data_dir=workdir), log_path=workdir / "tansu.log") as broker:
        base = Settings(data_dir=workdir, kafka_bootstrap_servers=broker.bootstrap_servers, web_port=0)
        for point, target in enumerate(targets, start=0 if reference else 1):
            run = run_once(broker, base, workdir, chunks, expected, point, target, stall_seconds)
            runs.append(run)
            console.print(_row_text(run))
    table = Table(title=f"SIGKILL at {points} points, {total:,} lines, backtest {len(expected)} alerts")
    for column in (
        "run",
        "killed at consumed",
        "checkpointed",
        "replayed (state held it)",
        "sightings replayed",
        "alerts",
        "ids only stream",
        "ids only backtest",
        "content differs",
        "re-sent changed",
        "spikes same",
        "novelty same",
        "committed = end",
        "consistent",
        "s",
    ):
        table.add_column(column, justify="right")
    for run in runs:
        table.add_row(
            "no kill" if run.kill_target is None else str(run.point),
            "-" if run.kill_target is None else f"{run.killed_consumed:,}",
            "-" if run.kill_target is None else f"{run.killed_checkpointed:,}",
            f"{run.replayed:,}",
            f"{run.replayed_sightings:,}",
            str(run.alerts),
            str(run.only_stream),
            str(run.only_backtest),
            str(run.other_content),
            str(run.resent_changed),
            f"{'yes' if run.spikes_same else 'NO'} ({run.spikes})",
            "yes" if run.novelty_same else "NO",
            "yes" if run.committed_end else f"no ({run.stalled})",
            "yes" if run.consistent else "NO",
            f"{run.seconds:.0f}",
        )
    console.print(table)
    kept = [r.point for r in runs if not r.consistent]
    if kept:
        console.print(f"data of runs {kept} kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return runs


def _row_text(run: CrashRun) -> str:
    where = (
        "no kill"
        if run.kill_target is None
        else f"killed at {run.killed_consumed} ({run.killed_checkpointed} checkpointed)"
    )
    return (
        f"run {run.point}: {where}; alerts {run.alerts}, only stream {run.only_stream}, only backtest "
        f"{run.only_backtest}, other content {run.other_content}, re-sent changed {run.resent_changed}, spikes "
        f"same {run.spikes_same} ({run.spikes}), novelty same {run.novelty_same}, "
        f"replayed {run.replayed}/{run.replayed_sightings}; committed = end {run.committed_end} {run.stalled}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--points", type=int, default=10, help="kills, spread over the stream")
    parser.add_argument("--days", type=int, default=16)
    parser.add_argument("--seed", type=int, default=29)
    parser.add_argument("--events-per-day", type=int, default=1500)
    parser.add_argument("--stall-seconds", type=float, default=120.0, help="no catching up this long: stalled")
    parser.add_argument("--no-reference", action="store_true", help="skip the run without a kill")
    parser.add_argument("--json", type=Path, help="also write the runs here")
    args = parser.parse_args(argv)
    console = Console(width=None if Console().is_terminal else 200)
    runs = bench_crash(
        console, args.points, args.days, args.seed, args.events_per_day, args.stall_seconds, not args.no_reference
    )
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in runs], indent=2), encoding="utf-8")
    if not all(r.consistent for r in runs):
        sys.exit(1)


if __name__ == "__main__":
    main()
