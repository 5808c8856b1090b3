"""Kill-and-restart runs: a worker SIGKILLed onto a backlog, a new one started, and what it then did.

Why a script and not a timed test: the restart stall (issue 11) showed in about one run in three, and
only when a fetch landed in a window of ~180 ms. A handful of test runs proves nothing either way; this
runs the recipe as often as asked and prints every run, so "0 stalls in 40" is something anyone can
check on their own machine::

    python -m synthwatch.bench.reliability --kill-restart 20          # 20 runs killed before, 20 after
    python -m synthwatch.bench.reliability --kill-restart 5 --when before --events 20000

The recipe (each run on fresh topics and a fresh consumer group, one broker for all runs): publish
``--events`` border seizures over 5 regions up front; start a worker; SIGKILL it either before its
first offset commit (``before``: as soon as it has taken events but checkpointed none) or after it
(``after``: once the group has committed offsets); start a second worker on the same data directory.
A run passes when the group's committed offset reaches the end of every input partition, every event
is stored exactly once (rows = unique ids = events), and nothing had to be restarted. A run where the
committed offsets stop moving for ``--stall-seconds`` while behind the end is a stall: it is reported,
never restarted.
"""

from __future__ import annotations

import argparse
import json
import signal
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from kafka import KafkaProducer
from rich.console import Console
from rich.table import Table

from synthwatch.bench.workers import BenchWorker, start_worker
from synthwatch.bench.workload import Topics, seizure_line
from synthwatch.settings import Settings
from synthwatch.stack.broker import EmbeddedBroker, committed_offsets

REGIONS = (("ML", "ML-BKO"), ("MA", "MA-TNG"), ("SN", "SN-DK"), ("FR", "FR-75C"), ("NL", "NL-NH"))


@dataclass
class RunResult:
    """What one kill-and-restart run did."""

    run: int
    when: str
    consumed_at_kill: int
    committed_at_kill: int  # sum over input partitions of the group's committed offsets (0: none)
    seconds_to_end: float | None  # second worker start -> committed offset = end everywhere
    rows: int
    unique: int
    committed_equals_end: bool
    stalled: bool
    watchdog_stalls: int
    offsets: str
    events: int

    @property
    def ok(self) -> bool:
        """Committed to the end, nothing stalled, every event stored exactly once."""
        return self.committed_equals_end and not self.stalled and self.rows == self.unique == self.events


def publish_seizures(
    servers: str,
    topic: str,
    prefix: str,
    count: int,
    *,
    first: int = 0,
    start: datetime = datetime(2026, 1, 1, tzinfo=UTC),
    regions: Sequence[tuple[str, str]] = REGIONS,
) -> None:
    """Publish border seizures ``prefix-first`` .. ``prefix-(first+count-1)``, one second apart from ``start``,
    round-robin over ``regions`` and keyed by region (as the publisher keys them)."""
    producer = KafkaProducer(bootstrap_servers=servers, linger_ms=20)
    for i in range(first, first + count):
        country, region = regions[i % len(regions)]
        at = (start + timedelta(seconds=i)).isoformat()
        line = seizure_line(f"{prefix}-{i}", country, region, "Tramadol", at, i)
        producer.send(topic, key=region.encode(), value=line.encode())
    producer.flush()
    producer.close()


def _committed(servers: str, group: str, topics: Sequence[str]) -> dict[Any, tuple[int, int]]:
    return committed_offsets(servers, group, topics)


def _describe(offsets: dict[Any, tuple[int, int]]) -> str:
    parts = [
        f"{tp.partition}:{committed}/{end}"
        for tp, (committed, end) in sorted(offsets.items(), key=lambda item: (item[0].topic, item[0].partition))
        if end > 0
    ]
    return " ".join(parts)


def _kill_point(worker: BenchWorker, when: str, servers: str, group: str, topics: Sequence[str], events: int) -> int:
    """Wait for the moment to kill ``worker``; returns how many events it had consumed then.

    ``before``: right after its first checkpoint (rows stored and detector state written to the changelog,
    offsets acknowledged but committed only at the next commit interval, up to a second later): the new
    worker then restores tables from the changelog, with its fetcher running while it seeks the input
    partitions, the window of the stall. ``after``: once the group has committed offsets.
    """
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        stats = worker.stats()
        if when == "before":
            if stats["checkpointed"] > 0:
                return int(stats["consumed"])
            time.sleep(0.01)
        else:
            if stats["checkpointed"] >= events // 10 and any(
                c > 0 for c, _ in _committed(servers, group, topics).values()
            ):
                return int(worker.stats()["consumed"])
            time.sleep(0.1)
    raise RuntimeError(f"no kill point ({when}) within 120 s")


def kill_restart_run(
    run: int,
    when: str,
    base: Settings,
    servers: str,
    workdir: Path,
    events: int,
    stall_seconds: float,
    restart_delay: float,
) -> RunResult:
    """One run of the recipe (see the module docstring)."""
    suffix = uuid.uuid4().hex[:8]
    topics = Topics(suffix)
    settings = topics.created(base, servers, partitions=4)
    group = f"bench-reliability-{suffix}"
    inputs = list(settings.input_topics)
    publish_seizures(servers, settings.topic_border_seizures, suffix, events)
    data_dir = workdir / f"run-{run}-{when}"
    first = start_worker(settings, servers, data_dir, app_id=group)
    try:
        consumed = _kill_point(first, when, servers, group, inputs, events)
    finally:
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(30)
    committed_at_kill = sum(max(c, 0) for c, _ in _committed(servers, group, inputs).values())
    time.sleep(restart_delay)  # past the session timeout, the broker has dropped the dead member: one rebalance
    started = time.monotonic()
    second = start_worker(settings, servers, data_dir, app_id=group)
    try:
        last: tuple[int, ...] = ()
        last_change = time.monotonic()
        done = stalled = False
        offsets: dict[Any, tuple[int, int]] = {}
        while time.monotonic() - started < 300:
            offsets = _committed(servers, group, inputs)
            now = tuple(c for c, _ in offsets.values())
            if offsets and all(max(c, 0) == end for c, end in offsets.values()):  # -1: none, fine if empty
                done = True
                break
            if now != last:
                last, last_change = now, time.monotonic()
            elif time.monotonic() - last_change > stall_seconds:
                stalled = True
                break
            time.sleep(0.5)
        seconds = time.monotonic() - started if done else None
        rows, unique = second.query(
            "SELECT count(), uniqExact(event_id) FROM border_seizures WHERE startsWith(event_id, %(p)s)",
            {"p": suffix},
        ).rows[0]
        stats = second.stats()
        return RunResult(
            run=run,
            when=when,
            consumed_at_kill=consumed,
            committed_at_kill=committed_at_kill,
            seconds_to_end=seconds,
            rows=int(rows),
            unique=int(unique),
            committed_equals_end=done,
            stalled=stalled,
            watchdog_stalls=int(stats.get("consumer_stalls", 0)),
            offsets=_describe(offsets),
            events=events,
        )
    finally:
        second.stop()


def print_results(console: Console, results: Sequence[RunResult], events: int) -> None:
    table = Table(title=f"Kill and restart onto a backlog of {events:,} events")
    for name in (
        "run",
        "killed",
        "consumed at kill",
        "committed at kill",
        "restart → end (s)",
        "rows",
        "unique",
        "committed = end",
        "watchdog",
        "offsets (partition:committed/end)",
        "result",
    ):
        table.add_column(name)
    for r in results:
        table.add_row(
            str(r.run),
            r.when,
            f"{r.consumed_at_kill:,}",
            f"{r.committed_at_kill:,}",
            f"{r.seconds_to_end:.1f}" if r.seconds_to_end is not None else "-",
            f"{r.rows:,}",
            f"{r.unique:,}",
            "yes" if r.committed_equals_end else "NO",
            str(r.watchdog_stalls),
            r.offsets,
            "ok" if r.ok else ("STALL" if r.stalled else "FAIL"),
        )
    console.print(table)
    for when in sorted({r.when for r in results}):
        of = [r for r in results if r.when == when]
        console.print(
            f"killed {when} the first commit: {sum(r.ok for r in of)} of {len(of)} runs ok, "
            f"{sum(r.stalled for r in of)} stalls, {sum(r.rows != events or r.unique != events for r in of)} "
            f"with rows or unique ids != {events:,}, watchdog seek-backs {sum(r.watchdog_stalls for r in of)}"
        )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kill-restart", type=int, default=20, metavar="N", help="runs for each kill point")
    parser.add_argument("--when", default="before,after", help="kill points: before, after, or both")
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--stall-seconds", type=float, default=30.0)
    parser.add_argument(
        "--restart-delay",
        type=float,
        default=5.0,
        help="seconds between the kill and the second worker's start (default: past the 4 s session timeout, so "
        "the new worker's first rebalance is its only one: the case that stalled)",
    )
    parser.add_argument("--json", type=Path, help="write the runs here as JSON")
    args = parser.parse_args(argv)
    console = Console(width=200)
    base = Settings()
    results: list[RunResult] = []
    with tempfile.TemporaryDirectory(prefix="synthwatch-kill-") as tmp, EmbeddedBroker(base) as broker:
        console.print(f"broker {broker.bootstrap_servers}; {args.kill_restart} runs per kill point")
        for when in [w.strip() for w in args.when.split(",") if w.strip()]:
            for run in range(1, args.kill_restart + 1):
                result = kill_restart_run(
                    run,
                    when,
                    base,
                    broker.bootstrap_servers,
                    Path(tmp),
                    args.events,
                    args.stall_seconds,
                    args.restart_delay,
                )
                results.append(result)
                console.print(
                    f"run {run} ({when}): {'ok' if result.ok else 'FAILED'}; rows {result.rows:,}, "
                    f"unique {result.unique:,}; {result.offsets}",
                    highlight=False,
                )
    print_results(console, results, args.events)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    if not all(r.ok for r in results):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
