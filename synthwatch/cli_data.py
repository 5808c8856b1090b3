"""Data commands: ``alerts``, ``stats``, ``substance``, ``ingest-history`` (mounted by :mod:`synthwatch.cli`).

Reads go through :mod:`synthwatch.reads` (so they work while ``synthwatch up`` holds the embedded engine);
the backfill opens the engine itself and refuses while a stack holds it.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.table import Table

from .consoles import command_console
from .redaction import redact
from .settings import Settings
from .terminal import plain, say

console = command_console()
err = command_console(stderr=True)


def _fail(message: str, code: int = 1) -> NoReturn:
    say(err, "[bold red]error:[/] ", redact(message))
    raise typer.Exit(code)


def _when(value: datetime | None) -> str:
    return "" if value is None else value.strftime("%Y-%m-%d %H:%M")


def _number(value: float | None, digits: int = 1) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


def alerts(
    region: Annotated[str | None, typer.Option(help="ISO 3166-2 region, e.g. ML-BKO.")] = None,
    since: Annotated[
        str,
        typer.Option(
            help="How far back: 30m, 12h, 7d, 2w; counted on detection time (when synthwatch raised the alert) "
            "unless --time triggered."
        ),
    ] = "7d",
    severity: Annotated[str | None, typer.Option(help="info, warning or critical.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="Most alerts shown.")] = 100,
    time: Annotated[
        str,
        typer.Option(
            "--time",
            help="What --since filters and sorts on: 'detected' (when synthwatch raised the alert, the default) or "
            "'triggered' (event time of the report that raised it: when the sample was taken or the seizure made).",
        ),
    ] = "detected",
) -> None:
    """Recent alerts, newest first by detection time (or by report time with --time triggered)."""
    from .query import QueryError
    from .reads import parse_since, recent_alerts

    try:
        rows = recent_alerts(
            Settings(), region=region, since=parse_since(since), severity=severity, limit=limit, time=time
        )
    except (ValueError, QueryError) as error:
        _fail(str(error))
    which = "detected" if time == "detected" else "triggered by a report"
    table = Table(title=plain(f"alerts {which} in the last {since}" + (f" in {region.upper()}" if region else "")))
    columns = ("detected (UTC)", "triggered (UTC)", "severity", "type", "region", "substance", "observed", "expected")
    for column in (*columns, "summary"):
        table.add_column(column, overflow="fold", justify="right" if column in ("observed", "expected") else "left")
    colours = {"critical": "bold red", "warning": "yellow", "info": "cyan"}
    for row in rows:
        table.add_row(
            _when(row.detected_at),
            _when(row.triggered_at),
            plain(row.severity, style=colours.get(row.severity, "")),
            plain(row.alert_type),
            plain(row.region or "(network)"),
            plain(row.substance_name),
            _number(row.observed),
            _number(row.expected),
            plain(row.summary),
        )
    console.print(table)
    console.print(f"{len(rows)} alert(s)")


def stats(
    days: Annotated[int, typer.Option(min=1, help="Window in days (today included).")] = 30,
    region: Annotated[str | None, typer.Option(help="Only this ISO 3166-2 region.")] = None,
) -> None:
    """Reports and seized grams per region and substance, with first and last sighting."""
    from .query import QueryError
    from .reads import stats as read_stats

    try:
        rows = read_stats(Settings(), days=days, region=region)
    except (ValueError, QueryError) as error:
        _fail(str(error))
    table = Table(title=plain(f"reports in the last {days} days" + (f" in {region.upper()}" if region else "")))
    for column in ("region", "substance", "family", "reports", "labs", "seizures", "grams", "first seen", "last seen"):
        table.add_column(column, justify="right" if column in ("reports", "labs", "seizures", "grams") else "left")
    for row in rows:
        table.add_row(
            plain(row.region),
            plain(row.substance_name),
            plain(row.family),
            f"{row.reports:,}",
            f"{row.lab_detections:,}",
            f"{row.border_seizures:,}",
            _number(row.grams),
            _when(row.first_seen),
            _when(row.last_seen),
        )
    console.print(table)
    console.print(f"{sum(r.reports for r in rows):,} reports over {len(rows)} region x substance rows")


def substance(
    name: Annotated[str, typer.Argument(help="A name (any spelling), an InChIKey or its first block.")],
) -> None:
    """Everything stored about one substance: first seen, regions, months, alerts."""
    from .query import QueryError
    from .reads import substance_history

    try:
        history = substance_history(Settings(), name)
    except (ValueError, QueryError) as error:
        _fail(str(error))
    if history is None:
        _fail(f"no report of {name!r} is stored", code=2)
    header = plain(history.substance_name, style="bold")
    header.append_text(
        plain(f" (key {history.substance_key}, {history.family or 'family unknown'}; matched by {history.resolved_by})")
    )
    console.print(header)
    console.print(
        f"first seen {_when(history.first_seen)}, last seen {_when(history.last_seen)}, {history.reports:,} reports",
        highlight=False,
    )
    regions = Table(title="regions, in order of first sighting")
    for column in ("region", "country", "first seen", "last seen", "reports"):
        regions.add_column(column, justify="right" if column == "reports" else "left")
    for r in history.regions:
        regions.add_row(plain(r.region), plain(r.country), _when(r.first_seen), _when(r.last_seen), f"{r.reports:,}")
    console.print(regions)
    months = Table(title="reports per month")
    for column in ("month", "reports", "labs", "seizures", "grams"):
        months.add_column(column, justify="left" if column == "month" else "right")
    for m in history.months:
        months.add_row(
            m.month.strftime("%Y-%m"),
            f"{m.reports:,}",
            f"{m.lab_detections:,}",
            f"{m.border_seizures:,}",
            _number(m.grams),
        )
    console.print(months)
    alerts_table = Table(title=f"{len(history.alerts)} alert(s)")
    for column in ("triggered (UTC)", "severity", "type", "region", "summary"):
        alerts_table.add_column(column, overflow="fold")
    for a in history.alerts:
        alerts_table.add_row(
            _when(a.triggered_at),
            plain(a.severity),
            plain(a.alert_type),
            plain(a.region or "(network)"),
            plain(a.summary),
        )
    console.print(alerts_table)


def ingest_history(
    file: Annotated[Path, typer.Argument(help="NDJSON file of reports (one JSON object per line).")],
    batch_size: Annotated[
        int | None,
        typer.Option(
            min=1000,
            help="Lines per chunk and per insert, at most (default: 600,000 when the embedded engine parses the "
            "file, 200,000 with a server).",
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Processes for the RDKit pre-pass, and for parsing with a server (default: cores, at most 2).",
        ),
    ] = None,
) -> None:
    """Load historical reports straight into ClickHouse (no Kafka); each line is stored, a duplicate, or a reject."""
    from .history import IngestRefused
    from .history import ingest_history as run_ingest

    if not file.is_file():
        _fail(f"no such file: {file}")
    try:
        summary = run_ingest(Settings(), file, batch_size=batch_size, progress=err.is_terminal, workers=workers)
    except IngestRefused as error:
        _fail(str(error))
    table = Table(title=plain(f"ingested {file.name}"))
    for column in (
        "lines",
        "stored",
        "labs",
        "seizures",
        "duplicates",
        "rejected",
        "new rejects",
        "seconds",
        "lines/s",
    ):
        table.add_column(column, justify="right")
    table.add_row(
        f"{summary.lines:,}",
        f"{summary.stored:,}",
        f"{summary.lab_detections:,}",
        f"{summary.border_seizures:,}",
        f"{summary.duplicates:,}",
        f"{summary.rejected:,}",
        f"{summary.rejects_stored:,}",
        f"{summary.seconds:.1f}",
        f"{summary.rate:,.0f}",
    )
    console.print(table)
    console.print(
        f"duplicates: {summary.duplicates_in_file:,} repeated in the file, {summary.already_stored:,} already stored"
    )
    for reason, count in sorted(summary.reject_reasons.items(), key=lambda kv: -kv[1])[:10]:
        say(console, "  rejected (", reason, f"): {count}")
    if not summary.balanced:
        _fail("counts do not add up (lines != stored + duplicates + rejected); please report this", code=3)


def register(app: typer.Typer) -> None:
    """Add the data commands to the ``synthwatch`` application."""
    app.command("alerts")(alerts)
    app.command("stats")(stats)
    app.command("substance")(substance)
    app.command("ingest-history")(ingest_history)
