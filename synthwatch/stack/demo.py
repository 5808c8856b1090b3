"""``make demo``: the whole pipeline on one machine, end to end, as an officer would meet it.

Why a history first: a network that starts empty finds everything new, so a demo that streamed a month
into an empty stack raised hundreds of "first in region" and dozens of "new substance" alerts, and taught
a newcomer to ignore alerts. The demo simulates one world for ``history_days + live_days`` days, loads the
history straight into ClickHouse with ``ingest-history``, starts ``synthwatch up`` (its worker rebuilds its
detector state from what ClickHouse holds), and publishes only the last weeks through Kafka: the alerts it
shows are the ones a network with half a year of reports behind it raises. It prints them per day and, for
contrast, what the same weeks would have raised on an empty network (the offline backtest).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from datetime import time as day_time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from synthwatch.errors import SynthwatchError
from synthwatch.settings import Settings
from synthwatch.stack.process import StackProcess
from synthwatch.stackfile import read_stack
from synthwatch.stream_apps.storage.query import QueryError, run_query
from synthwatch.terminal import plain, say

if TYPE_CHECKING:
    from synthwatch.producers.simulate import Truth

#: Days of reports loaded with ``ingest-history`` before the stack starts.
HISTORY_DAYS = 180
#: The last days, published live through Kafka: the alerts the demo shows are raised on these.
LIVE_DAYS = 21
#: The alert kinds, in the order the demo prints them.
ALERT_KINDS = ("new_substance", "first_in_region", "spread", "spike")


class DemoFailed(SynthwatchError, RuntimeError):
    """A step of the demo did not work; the message says which and why."""


def _count(settings: Settings, sql: str) -> int:
    return int(run_query(settings, sql).rows[0][0])


def _ready_stats(settings: Settings) -> dict[str, Any]:
    """The worker's counters since it started (its /ready endpoint)."""
    info = read_stack(settings)
    if info is None:
        raise DemoFailed("the stack stopped while the demo was running; its log says why")
    with urllib.request.urlopen(f"{info.web_url}/ready", timeout=5) as response:
        stats: dict[str, Any] = json.loads(response.read())
    return stats


def _stored_events(settings: Settings) -> int:
    return _count(settings, "SELECT (SELECT count() FROM lab_detections) + (SELECT count() FROM border_seizures)")


def _wait_stored(settings: Settings, history: int, sent: int, rejects: int, timeout: float) -> tuple[float, int, int]:
    """Until the worker has taken every sent event (stored, or dropped as a re-send of a stored one), the
    stored rows are all in ClickHouse beside the ``history`` rows, and every publish reject is stored.

    Returns (seconds waited, live events stored, live re-sends dropped by the worker).
    """
    started = time.monotonic()
    stats: dict[str, Any] = {}
    stored = stored_rejects = 0
    while time.monotonic() - started < timeout:
        stats = _ready_stats(settings)
        stored = _stored_events(settings) - history
        stored_rejects = _count(settings, "SELECT count() FROM rejects WHERE stage = 'publish'")
        taken = stats["stored"] + stats["duplicates"] + stats["rejected"]
        if taken >= sent and stored >= stats["stored"] and stored_rejects >= rejects:
            return time.monotonic() - started, stored, stats["duplicates"]
        time.sleep(0.25)
    raise DemoFailed(
        f"after {timeout:.0f} s the worker had taken {stats.get('stored', 0) + stats.get('duplicates', 0)} of "
        f"{sent} live events ({stored} stored in ClickHouse) and {stored_rejects}/{rejects} rejects were stored"
    )


def _wait_alerts(settings: Settings, timeout: float) -> None:
    """Alerts are stored by their own agent, a moment after the reports: wait until none is pending."""
    deadline = time.monotonic() + timeout
    stats: dict[str, Any] = {}
    while time.monotonic() < deadline:
        stats = _ready_stats(settings)
        if stats["alerts_stored"] >= stats["alerts_raised"] and stats["sightings_processed"] >= stats["sightings"]:
            return
        time.sleep(0.25)
    raise DemoFailed(
        f"after {timeout:.0f} s {stats.get('alerts_stored')} of {stats.get('alerts_raised')} alerts were stored and "
        f"{stats.get('sightings_processed')} of {stats.get('sightings')} sightings processed"
    )


@dataclass(frozen=True, slots=True)
class DemoQuery:
    """A table the demo prints: its title and the read-only query behind it."""

    title: str
    sql: str


#: What the demo shows once every report is stored (the test runs these same queries).
STORED_QUERIES: tuple[DemoQuery, ...] = (
    DemoQuery(
        "Reports stored, by country and kind",
        # ORDER BY after UNION ALL belongs to the last SELECT: the union is sorted as a whole outside it.
        """
        SELECT country, kind, reports, substances FROM (
            SELECT country, 'lab_detection' AS kind, count() AS reports, uniqExact(substance_key) AS substances
            FROM lab_detections GROUP BY country
            UNION ALL
            SELECT country, 'border_seizure' AS kind, count() AS reports, uniqExact(substance_key) AS substances
            FROM border_seizures GROUP BY country
        ) ORDER BY country, kind""",
    ),
    DemoQuery(
        "Rejected input, by reason",
        """
        SELECT stage, reason, count() AS n FROM rejects GROUP BY stage, reason
        ORDER BY n DESC, stage, reason LIMIT 12""",
    ),
    DemoQuery(
        "Top substances seized (grams)",
        """
        SELECT resolved_name AS substance, family, round(sum(grams)) AS grams, count() AS seizures
        FROM border_seizures GROUP BY substance, family ORDER BY grams DESC, substance LIMIT 10""",
    ),
)

#: What the demo shows once the alerts are stored.
ALERT_QUERIES: tuple[DemoQuery, ...] = (
    DemoQuery(
        "Alerts raised, by type and severity",
        """
        SELECT alert_type, countIf(severity = 'critical') AS critical, countIf(severity = 'warning') AS warning,
               countIf(severity = 'info') AS info, count() AS total
        FROM alerts GROUP BY alert_type ORDER BY total DESC, alert_type""",
    ),
    DemoQuery(
        "Latest critical and warning alerts (what a liaison officer received)",
        """
        SELECT formatDateTime(triggered_at, '%Y-%m-%d %H:%i') AS triggered, severity, summary
        FROM alerts WHERE severity != 'info' ORDER BY triggered_at DESC, alert_id LIMIT 15""",
    ),
)


def _print_query(console: Console, settings: Settings, query: DemoQuery) -> None:
    """Print one of the demo's tables; a query that fails stops the demo (a demo must not hide errors)."""
    try:
        result = run_query(settings, query.sql)
    except QueryError as error:
        raise DemoFailed(f"the query for {query.title!r} failed: {error}") from error
    table = Table(title=query.title, title_justify="left")
    for column in result.columns:
        table.add_column(column)
    for row in result.rows:
        table.add_row(*(plain(v) for v in row))
    console.print(table)


@dataclass(frozen=True)
class DemoStreams:
    """One simulated world cut in two at ``cutover`` by arrival time: ``history`` (loaded straight into
    ClickHouse) and ``live`` (published through Kafka). Same substances, regions, labs and agencies on both
    sides; the incidents the simulator plants (new substances, first appearances, spikes) all start live."""

    history: list[str]
    live: list[str]
    cutover: datetime
    end: date
    truth: Truth

    @property
    def history_days(self) -> int:
        """Days before the cut-over (the simulator's warm-up: no planted incident starts in them)."""
        return self.truth.config.warmup_days

    @property
    def live_days(self) -> int:
        """Days from the cut-over to ``end`` (exclusive)."""
        return (self.end - self.cutover.date()).days

    def planted(self) -> Counter[str]:
        """What the simulator planted in the live weeks, by the alert kind that should report it: each new
        substance, and each region it or a known substance newly reached, and each spike."""
        planted: Counter[str] = Counter()
        for incident in self.truth.incidents:
            planted[incident.type] += 1
            if incident.type == "new_substance":
                planted["first_in_region"] += max(0, len(incident.spread) - 1)
        return planted


def demo_streams(history_days: int, live_days: int, seed: int, end: date) -> DemoStreams:
    """Simulate ``history_days + live_days`` days ending the day before ``end`` and cut them at the start of
    the live days.

    A line belongs to the side its arrival falls on (the simulator writes lines in arrival order, and a
    valid report's ``reported_at`` is its arrival), so a report of the last history day that arrives after
    midnight is published live and flagged late, as it would be.
    """
    from synthwatch.producers.simulate import SimulationConfig, simulate

    start = end - timedelta(days=history_days + live_days)
    sim = simulate(SimulationConfig(days=history_days + live_days, seed=seed, start=start, warmup_days=history_days))
    cutover = datetime.combine(start + timedelta(days=history_days), day_time(), UTC)
    split = 0  # no history: every line is live, even a malformed one that "arrived" before the first report
    if history_days:
        split = next(
            (
                index
                for index, (line, status) in enumerate(zip(sim.lines, sim.statuses, strict=True))
                if status == "event" and datetime.fromisoformat(json.loads(line)["reported_at"]) >= cutover
            ),
            len(sim.lines),
        )
    return DemoStreams(sim.lines[:split], sim.lines[split:], cutover, end, sim.truth)


def per_day_query(streams: DemoStreams) -> DemoQuery:
    """Alerts per day of the live weeks, by kind; a day without alerts shows zeros."""
    counts = ", ".join(f"uniqExactIf(alert_id, alert_type = '{kind}') AS {kind}" for kind in ALERT_KINDS)
    return DemoQuery(
        "Alerts per day of the live weeks (day the event occurred, UTC)",
        f"""
        SELECT toDate(triggered_at) AS day, {counts}, uniqExact(alert_id) AS total
        FROM alerts GROUP BY day
        ORDER BY day WITH FILL FROM toDate('{streams.cutover.date()}') TO toDate('{streams.end}')""",
    )


def empty_network_alerts(settings: Settings, lines: list[str]) -> Counter[str]:
    """The alerts the live lines alone raise in the offline backtest: what a network without history would say."""
    from synthwatch.stream_apps.detect.backtest import run_lines
    from synthwatch.stream_apps.detect.region import DetectionConfig

    run = run_lines(((f"live:{n}", line) for n, line in enumerate(lines)), DetectionConfig.from_settings(settings))
    return Counter(alert.alert_type for alert in run.alerts)


def _rule(console: Console, title: str) -> None:
    """A section rule: the terminal's width, or 100 columns in a log (a pipe's console has no width)."""
    console.print(Rule(title), width=None if console.is_terminal else 100)


#: Width of the demo's paragraphs in a log or pipe (a terminal gets its own width).
PROSE_WIDTH = 100


def _prose(console: Console, markup: str) -> None:
    """A paragraph of our own words, wrapped only between words: by Rich at the terminal's width, or at
    :data:`PROSE_WIDTH` columns in a log or pipe (whose console has no width, so Rich would not wrap it)."""
    text = Text.from_markup(markup, emoji=False)
    if console.is_terminal:
        console.print(text, highlight=False)
        return
    wrapped = textwrap.fill(text.plain, PROSE_WIDTH, break_long_words=False, break_on_hyphens=False)
    console.print(wrapped, markup=False, highlight=False, soft_wrap=True)


#: The line of ``ingest-history``'s summary that counts the lines it skipped as re-sends.
_INGEST_DUPLICATES = re.compile(r"^duplicates: ([\d,]+) repeated in the file, ([\d,]+) already stored$", re.MULTILINE)


def _ingest(settings: Settings, env: dict[str, str], path: Path, log_path: Path) -> tuple[float, int]:
    """``synthwatch ingest-history`` in its own process (the embedded engine then belongs to ``up``): its
    seconds and the lines it skipped as re-sends, as it reported them (they are stored nowhere)."""
    started = time.monotonic()
    with open(log_path, "wb") as log:
        result = subprocess.run(
            [sys.executable, "-m", "synthwatch.cli.main", "ingest-history", str(path)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            check=False,
        )
    if result.returncode != 0:
        raise DemoFailed(f"`synthwatch ingest-history` exited with code {result.returncode}; see {log_path}")
    seconds = time.monotonic() - started
    found = _INGEST_DUPLICATES.search(log_path.read_text(encoding="utf-8", errors="replace"))
    if found is None:
        raise DemoFailed(f"`synthwatch ingest-history` printed no count of duplicates; see {log_path}")
    return seconds, sum(int(group.replace(",", "")) for group in found.groups())


def _print_per_day(console: Console, settings: Settings, streams: DemoStreams) -> Counter[str]:
    """The per-day table; returns the live alerts by kind."""
    query = per_day_query(streams)
    _print_query(console, settings, query)
    totals: Counter[str] = Counter()
    for row in run_query(settings, query.sql).rows:
        for kind, value in zip(ALERT_KINDS, row[1:], strict=False):
            totals[kind] += int(value)
    return totals


#: New-substance alerts about a name reported by name only (severity info): a name-only report the worker read
#: before the lab report that ties the name to a structure (the topics' order is arbitrary).
NAMES_ALONE_SQL = (
    "SELECT uniqExact(alert_id) FROM alerts WHERE alert_type = 'new_substance' AND startsWith(substance_key, 'name:')"
)


def new_substances_said(alerts: int, names_alone: int, days: int, planted: int) -> str:
    """The demo's count of new-substance alerts, saying how many are about a name alone: "3 for 2 planted" read
    as a false alert when one of the three was the info alert of a name reported before its structure."""
    if not names_alone:
        return f"{alerts} in {days} days; the simulator planted {planted}"
    return (
        f"{alerts} in {days} days, {names_alone} of them at info about a name reported by name only before a lab "
        f"tied it to a structure, whose own alert names it; the simulator planted {planted}"
    )


def _print_comparison(
    console: Console,
    streams: DemoStreams,
    live: Counter[str],
    empty: Counter[str],
    settings: Settings,
    names_alone: int = 0,
) -> None:
    """Live alerts per day beside the empty network's and what the simulator planted, then what it means."""
    days = streams.live_days
    table = Table(
        title=f"The same {days} live days: with the history loaded, and on an empty network", title_justify="left"
    )
    for column in ("kind", "live alerts", "per day", "on an empty network", "per day (empty)", "planted"):
        table.add_column(column, justify="left" if column == "kind" else "right")
    planted = streams.planted()
    for kind in ALERT_KINDS:
        table.add_row(
            kind,
            str(live[kind]),
            f"{live[kind] / days:.1f}",
            str(empty[kind]),
            f"{empty[kind] / days:.1f}",
            str(planted[kind]) if kind != "spread" else "-",
        )
    spread = f"{settings.spread_regions} or more regions within {settings.spread_days} days"
    if streams.history_days == 0:
        _prose(
            console,
            "No history was loaded, so the live days are the network's warm-up: everything is new to it, and "
            "these alerts say more about the empty network than about the drugs.",
        )
        return
    console.print(table)
    new_said = new_substances_said(live["new_substance"], names_alone, days, planted["new_substance"])
    _prose(
        console,
        f"What the numbers mean: the network already knew {streams.history_days} days of reports when the live "
        f"days began, so an alert is news to it. [bold]new_substance[/]: a substance no lab or border post of the "
        f"network has ever reported ({new_said}). "
        "[bold]first_in_region[/]: a known substance reported in a region for the "
        f"first time ({live['first_in_region']}; planted: {planted['first_in_region']} arrivals of known or new "
        f"substances in a new region). [bold]spread[/]: one substance reported in {spread} ({live['spread']}; "
        "mostly rare substances whose scattered reports came together). [bold]spike[/]: a region's reports, or "
        f"grams seized, of one substance or family well above their own recent baseline ({live['spike']} for "
        f"{planted['spike']} planted spikes: one spike can raise alerts for its substance and its family, and the "
        "others are swings of ordinary traffic the detector finds improbable; read the critical ones first). "
        f"In all about {sum(live.values()) / days:.1f} alerts a day for the whole network, before any "
        "subscription narrows them to an officer's regions and substances.",
    )
    _prose(
        console,
        f"Started from an empty network instead, the same {days} days raise {empty['new_substance']} "
        f"new-substance and {empty['first_in_region']} first-in-region alerts "
        f"({empty['new_substance'] / days:.1f} and {empty['first_in_region'] / days:.1f} a day; offline backtest "
        "of the live lines alone): everything is new to a network that has seen nothing. That is why a real "
        "deployment loads its history first (`synthwatch ingest-history FILE` with the stack stopped, then "
        "`synthwatch up`: the worker rebuilds its detector state from ClickHouse).",
    )


def run_demo(
    days: int,
    seed: int,
    console: Console,
    keep_running: bool = False,
    history_days: int = HISTORY_DAYS,
    end: date | None = None,
) -> int:
    """Run the demo: ``history_days`` loaded, ``days`` live, ending yesterday (or the day before ``end``).

    Returns the process exit code.
    """
    from synthwatch.producers.publisher import Publisher
    from synthwatch.producers.readers import read_records

    base = Settings()
    data_dir = base.data_dir / "demo"
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    settings = base.model_copy(update={"data_dir": data_dir, "kafka_bootstrap_servers": None, "clickhouse_url": None})
    env = {**os.environ, "SYNTHWATCH_DATA_DIR": str(data_dir)}
    env.pop("SYNTHWATCH_KAFKA_BOOTSTRAP_SERVERS", None)
    env.pop("SYNTHWATCH_CLICKHOUSE_URL", None)

    _rule(console, "synthwatch demo")
    demo_started = time.monotonic()
    log_path = data_dir / "up.log"
    stack = StackProcess(
        [sys.executable, "-m", "synthwatch.cli.main", "up"],
        log_path,
        env=env,
        settings=settings,
        what="`synthwatch up`",
        tail=0,
    )
    try:
        streams = demo_streams(history_days, days, seed, end or datetime.now(UTC).date())
        history_path, live_path = data_dir / "history.ndjson", data_dir / "live.ndjson"
        history_path.write_bytes("".join(line + "\n" for line in streams.history).encode())
        live_path.write_bytes("".join(line + "\n" for line in streams.live).encode())
        (data_dir / "truth.json").write_text(streams.truth.model_dump_json(indent=2) + "\n")
        first_day = streams.cutover.date() - timedelta(days=history_days)
        _prose(
            console,
            f"1. Simulated one network for {history_days + days} days from {first_day} "
            f"({time.monotonic() - demo_started:.1f} s): {len(streams.history)} lines of history before "
            f"{streams.cutover:%Y-%m-%d %H:%M} UTC, then {len(streams.live)} lines for the last {days} days.",
        )

        ingest_seconds, history_duplicates = (
            _ingest(settings, env, history_path, data_dir / "ingest.log") if streams.history else (0.0, 0)
        )
        started = time.monotonic()
        ready = stack.start().wait_ready(timeout=180).ready_seconds or 0.0
        history = _stored_events(settings)
        history_rejects = _count(settings, "SELECT count() FROM rejects WHERE stage = 'ingest'")
        _prose(
            console,
            f"2. History loaded with `synthwatch ingest-history` in {ingest_seconds:.1f} s: {history} reports "
            f"stored straight into ClickHouse, {history_rejects} malformed lines in rejects, "
            f"{history_duplicates} re-sent lines skipped: "
            f"{history + history_rejects + history_duplicates} = {len(streams.history)} lines of history."
            if streams.history
            else "2. No history loaded (--history-days 0): the network starts empty.",
        )
        rebuilt = _ready_stats(settings).get("rebuild", {})
        _prose(
            console,
            "3. Embedded stack up: Tansu broker + Faust worker + embedded ClickHouse. "
            f"[bold]Worker ready in {ready:.1f} s[/] ({time.monotonic() - started:.1f} s including Python start-up), "
            f"its detector state rebuilt from ClickHouse: {rebuilt.get('substances', '?')} substances, "
            f"{rebuilt.get('events_replayed', '?')} recent reports replayed into the spike baselines, "
            f"{rebuilt.get('names_learnt', '?')} names learnt, in {rebuilt.get('seconds', 0.0):.1f} s.",
        )

        info = read_stack(settings)
        if info is None:
            raise DemoFailed("the stack stopped before the live weeks were published; see its log")
        t0 = time.monotonic()
        with Publisher(settings, info.bootstrap_servers) as publisher:
            summary = publisher.publish_records(read_records(str(live_path)))
        publish_seconds = time.monotonic() - t0
        _prose(
            console,
            f"4. Live weeks published through Kafka in {publish_seconds:.1f} s: read {summary.read}, "
            f"sent {summary.sent}, rejected {summary.rejected}, duplicates {summary.duplicates}, "
            f"failed {len(summary.failed)}",
        )
        waited, stored, resent = _wait_stored(settings, history, summary.sent, summary.rejected, timeout=180)
        late = _count(
            settings, "SELECT (SELECT countIf(late) FROM lab_detections) + (SELECT countIf(late) FROM border_seizures)"
        )
        _prose(
            console,
            f"5. Every live report accounted for {waited:.1f} s after publishing ended "
            f"({summary.sent / (publish_seconds + waited):.0f} reports/s end to end): {stored} stored "
            f"({late} of them more than {settings.lateness_hours:g} h late: flagged, counted on their own day, "
            "left out of spikes), "
            f"{resent} re-sends of stored reports dropped by the worker, "
            f"{summary.rejected} malformed in rejects, {summary.duplicates} duplicates skipped by the publisher: "
            f"{stored + resent + summary.rejected + summary.duplicates} = {summary.read} lines read.",
        )

        for query in STORED_QUERIES:
            _print_query(console, settings, query)
        _wait_alerts(settings, timeout=60)
        empty = empty_network_alerts(settings, streams.live)
        for query in ALERT_QUERIES:
            _print_query(console, settings, query)
        live = _print_per_day(console, settings, streams)
        _print_comparison(console, streams, live, empty, settings, _count(settings, NAMES_ALONE_SQL))
        _rule(console, "where to look next")
        console.print(
            f"Data: {data_dir} (ClickHouse files in clickhouse/; history.ndjson, live.ndjson and their truth "
            "labels in truth.json beside them).\n"
            f"Start the stack again:   SYNTHWATCH_DATA_DIR={data_dir} .venv/bin/synthwatch up\n"
            f"Then, in another shell:  SYNTHWATCH_DATA_DIR={data_dir} .venv/bin/synthwatch alerts\n"
            f"                         SYNTHWATCH_DATA_DIR={data_dir} .venv/bin/synthwatch sql "
            '"SELECT region, count() FROM border_seizures GROUP BY region"\n'
            f"Publish your own file:   .venv/bin/synthwatch publish FILE.ndjson   (or .csv)\n"
            f"Load years of history:   .venv/bin/synthwatch ingest-history FILE.ndjson   (stack stopped)\n"
            f"Metrics (Prometheus):    {info.web_url}/metrics while the stack runs "
            "(rules in deploy/prometheus/, dashboards in dashboards/json/)\n"
            f"Report without Grafana:  .venv/bin/synthwatch report --out report.html (make demo writes one)\n"
            f"Worker log: {log_path}\n"
            f"Demo run time: {time.monotonic() - demo_started:.0f} s.",
            markup=False,
            highlight=False,
        )
        if keep_running:
            console.print("The stack keeps running; Ctrl-C stops it.")
            stack.process.wait()
        return 0
    except (RuntimeError, QueryError) as error:
        say(console, "[bold red]demo failed:[/] ", error)
        if log_path.exists():
            tail = log_path.read_text(errors="replace").splitlines()[-30:]
            console.print("\n".join(tail), highlight=False, soft_wrap=True)
        return 1
    finally:
        stack.stop()
