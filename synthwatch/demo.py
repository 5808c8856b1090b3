"""``make demo``: the whole pipeline on one machine, end to end, in about a minute.

Starts ``synthwatch up`` as a child process (it owns the broker and the embedded ClickHouse), writes
a simulated month, publishes it, waits until every valid report and every reject is stored, and
prints what arrived, the alerts raised, and where to look next.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .query import QueryError, run_query
from .runtime import read_stack
from .settings import Settings


def _wait_ready(settings: Settings, process: subprocess.Popen[bytes], timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"`synthwatch up` exited with code {process.returncode}")
        info = read_stack(settings)
        if info is not None and info.ready_seconds is not None and info.pid == process.pid:
            return info.ready_seconds
        time.sleep(0.1)
    raise RuntimeError(f"`synthwatch up` was not ready after {timeout:.0f} s")


def _count(settings: Settings, sql: str) -> int:
    return int(run_query(settings, sql).rows[0][0])


def _wait_stored(settings: Settings, events: int, rejects: int, timeout: float) -> tuple[float, int, int]:
    """Until every sent event is stored (late ones too, flagged), and every publish reject is stored.

    Returns (seconds waited, events stored, stored events flagged late).
    """
    started = time.monotonic()
    stored = late = stored_rejects = 0
    while time.monotonic() - started < timeout:
        stored = _count(settings, "SELECT (SELECT count() FROM lab_detections) + (SELECT count() FROM border_seizures)")
        late = _count(
            settings, "SELECT (SELECT countIf(late) FROM lab_detections) + (SELECT countIf(late) FROM border_seizures)"
        )
        stored_rejects = _count(settings, "SELECT count() FROM rejects WHERE stage = 'publish'")
        if stored >= events and stored_rejects >= rejects:
            return time.monotonic() - started, stored, late
        time.sleep(0.25)
    raise RuntimeError(
        f"after {timeout:.0f} s only {stored} of {events} events and {stored_rejects}/{rejects} rejects were stored"
    )


def _wait_alerts(settings: Settings, timeout: float) -> None:
    """Alerts are stored by their own agent, a moment after the reports: wait until none is pending."""
    info = read_stack(settings)
    deadline = time.monotonic() + timeout
    while info is not None and time.monotonic() < deadline:
        import json
        import urllib.request

        with urllib.request.urlopen(f"{info.web_url}/ready", timeout=5) as response:
            stats = json.loads(response.read())
        if stats["alerts_stored"] >= stats["alerts_raised"] and stats["sightings_processed"] >= stats["sightings"]:
            return
        time.sleep(0.25)


def _print_query(console: Console, settings: Settings, title: str, sql: str) -> None:

    try:
        result = run_query(settings, sql)
    except QueryError as error:
        console.print(f"[yellow]{title}: {error}[/]")
        return
    table = Table(title=title, title_justify="left")
    for column in result.columns:
        table.add_column(column)
    for row in result.rows:
        table.add_row(*(str(v) for v in row))
    console.print(table)


def run_demo(days: int, seed: int, console: Console, keep_running: bool = False) -> int:
    """Run the demo; returns the process exit code."""
    from synthwatch.producers.publisher import Publisher
    from synthwatch.producers.readers import read_records
    from synthwatch.producers.simulate import SimulationConfig, simulate

    base = Settings()
    data_dir = base.data_dir / "demo"
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    settings = base.model_copy(update={"data_dir": data_dir, "kafka_bootstrap_servers": None, "clickhouse_url": None})
    env = {**os.environ, "SYNTHWATCH_DATA_DIR": str(data_dir)}
    env.pop("SYNTHWATCH_KAFKA_BOOTSTRAP_SERVERS", None)
    env.pop("SYNTHWATCH_CLICKHOUSE_URL", None)

    console.rule("synthwatch demo")
    log_path = data_dir / "up.log"
    started = time.monotonic()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "synthwatch.cli", "up"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        ready = _wait_ready(settings, process, timeout=90)
        console.print(
            f"1. Embedded stack up: Tansu broker + Faust worker + embedded ClickHouse. "
            f"[bold]Worker ready in {ready:.1f} s[/] ({time.monotonic() - started:.1f} s including Python start-up)."
        )
        from datetime import UTC, datetime, timedelta

        start = (datetime.now(UTC) - timedelta(days=days)).date()
        sim = simulate(SimulationConfig(days=days, seed=seed, start=start))
        stream_path, truth_path = data_dir / "stream.ndjson", data_dir / "truth.json"
        sim.write(stream_path, truth_path)
        console.print(f"2. Simulated {days} days from {start}: {len(sim.lines)} lines -> {stream_path}")

        info = read_stack(settings)
        assert info is not None
        t0 = time.monotonic()
        with Publisher(settings, info.bootstrap_servers) as publisher:
            summary = publisher.publish_records(read_records(str(stream_path)))
        publish_seconds = time.monotonic() - t0
        console.print(
            f"3. Published in {publish_seconds:.1f} s: read {summary.read}, sent {summary.sent}, "
            f"rejected {summary.rejected}, duplicates {summary.duplicates}, failed {len(summary.failed)}"
        )
        waited, stored, late = _wait_stored(settings, summary.sent, summary.rejected, timeout=180)
        console.print(
            f"4. Every report accounted for {waited:.1f} s after publishing ended "
            f"({summary.sent / (publish_seconds + waited):.0f} reports/s end to end): {stored} stored "
            f"({late} of them more than {settings.lateness_hours:g} h late: flagged, counted on their own day, "
            "left out of spikes), "
            f"{summary.rejected} malformed in rejects, {summary.duplicates} duplicates skipped: "
            f"{stored + summary.rejected + summary.duplicates} = {summary.read} lines read."
        )

        _print_query(
            console,
            settings,
            "Reports stored, by country and kind",
            """
            SELECT country, 'lab_detection' AS kind, count() AS reports, uniqExact(substance_key) AS substances
            FROM lab_detections GROUP BY country
            UNION ALL
            SELECT country, 'border_seizure', count(), uniqExact(substance_key) FROM border_seizures GROUP BY country
            ORDER BY country, kind""",
        )
        _print_query(
            console,
            settings,
            "Rejected input, by reason",
            """
            SELECT stage, reason, count() AS n FROM rejects GROUP BY stage, reason ORDER BY n DESC LIMIT 12""",
        )
        _print_query(
            console,
            settings,
            "Top substances seized (grams)",
            """
            SELECT resolved_name AS substance, family, round(sum(grams)) AS grams, count() AS seizures
            FROM border_seizures GROUP BY substance, family ORDER BY grams DESC LIMIT 10""",
        )
        _wait_alerts(settings, timeout=60)
        _print_query(
            console,
            settings,
            "Alerts raised, by type and severity",
            """
            SELECT alert_type, countIf(severity = 'critical') AS critical, countIf(severity = 'warning') AS warning,
                   countIf(severity = 'info') AS info, count() AS total
            FROM alerts GROUP BY alert_type ORDER BY total DESC""",
        )
        _print_query(
            console,
            settings,
            "Latest critical and warning alerts (early days are warm-up: everything is new to the network)",
            """
            SELECT formatDateTime(triggered_at, '%Y-%m-%d %H:%i') AS triggered, severity, summary

            FROM alerts WHERE severity != 'info' ORDER BY triggered_at DESC, alert_id LIMIT 15""",
        )
        console.rule("where to look next")
        console.print(
            f"Data: {data_dir} (ClickHouse files in clickhouse/, the stream and its truth labels beside them).\n"
            f"Start the stack again:   SYNTHWATCH_DATA_DIR={data_dir} .venv/bin/synthwatch up\n"
            f"Then, in another shell:  SYNTHWATCH_DATA_DIR={data_dir} .venv/bin/synthwatch sql "
            '"SELECT region, count() FROM border_seizures GROUP BY region"\n'
            f"Publish your own file:   .venv/bin/synthwatch publish FILE.ndjson   (or .csv)\n"
            f"Metrics (Prometheus):    {info.web_url}/metrics while the stack runs "
            "(rules in deploy/prometheus/, dashboards in dashboards/json/)\n"
            f"Report without Grafana:  .venv/bin/synthwatch report --out report.html (make demo writes one)\n"
            f"Worker log: {log_path}"
        )
        if keep_running:
            console.print("The stack keeps running; Ctrl-C stops it.")
            process.wait()
        return 0
    except (RuntimeError, QueryError) as error:
        console.print(f"[bold red]demo failed:[/] {error}")
        tail = Path(log_path).read_text(errors="replace").splitlines()[-30:]
        console.print("\n".join(tail), highlight=False)
        return 1
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
