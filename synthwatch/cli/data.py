"""Data commands: ``alerts``, ``rejects``, ``corrections``, ``stats``, ``substance``, ``ingest-history`` (under
:mod:`synthwatch.cli.main`).

Reads go through :mod:`synthwatch.stream_apps.storage.reads` (so they work while ``synthwatch up`` holds the
embedded engine);
the backfill opens the engine itself and refuses while a stack holds it.
"""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.table import Table

from synthwatch.cli.output import FormatOption, OutputFormat, emit, plural, rich_table, to_json, write_csv
from synthwatch.consoles import command_console
from synthwatch.redaction import redact
from synthwatch.settings import Settings
from synthwatch.terminal import plain, say

console = command_console()
err = command_console(stderr=True)


def _fail(message: str, code: int = 1) -> NoReturn:
    say(err, "[bold red]error:[/] ", redact(message))
    raise typer.Exit(code)


def _when(value: datetime | None) -> str:
    return "" if value is None else value.strftime("%Y-%m-%d %H:%M")


def _number(value: float | None, digits: int = 1) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


ALERT_COLUMNS = (
    "alert_id",
    "triggered_at",
    "detected_at",
    "severity",
    "alert_type",
    "country",
    "region",
    "substance_key",
    "substance_name",
    "family",
    "observed",
    "expected",
    "score",
    "evidence",
    "summary",
)


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
    fmt: FormatOption = OutputFormat.table,
) -> None:
    """Recent alerts, newest first by detection time (or by report time with --time triggered)."""
    from synthwatch.stream_apps.storage.query import QueryError
    from synthwatch.stream_apps.storage.reads import parse_since, recent_alerts

    try:
        rows = recent_alerts(
            Settings(), region=region, since=parse_since(since), severity=severity, limit=limit, time=time
        )
    except (ValueError, QueryError) as error:
        _fail(str(error))
    which = "detected" if time == "detected" else "triggered by a report"

    colours = {"critical": "bold red", "warning": "yellow", "info": "cyan"}

    def table() -> Table:
        return rich_table(
            plain(f"alerts {which} in the last {since}" + (f" in {region.upper()}" if region else "")),
            (
                "detected (UTC)",
                "triggered (UTC)",
                "severity",
                "type",
                "region",
                "substance",
                "observed",
                "expected",
                "summary",
            ),
            [
                (
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
                for row in rows
            ],
            right=("observed", "expected"),
            overflow="fold",
        )

    emit(fmt, ALERT_COLUMNS, [[getattr(r, c) for c in ALERT_COLUMNS] for r in rows], table, console)
    if fmt is OutputFormat.table:
        console.print(plural(len(rows), "alert"))


STATS_COLUMNS = (
    "country",
    "region",
    "substance_key",
    "substance_name",
    "family",
    "reports",
    "lab_detections",
    "border_seizures",
    "grams",
    "first_seen",
    "last_seen",
)


REJECT_COLUMNS = ("rejected_at", "stage", "source", "event_id", "reporter", "reason")


def rejects(
    since: Annotated[str, typer.Option(help="How far back: 30m, 12h, 7d, 2w.")] = "7d",
    lab: Annotated[str | None, typer.Option(help="Only records naming this lab_id (or customs agency).")] = None,
    limit: Annotated[int, typer.Option(min=1, help="Most rejects shown.")] = 200,
    fmt: FormatOption = OutputFormat.table,
) -> None:
    """Recently refused records with their reasons and where they came from, newest first: fix and re-send."""
    from synthwatch.stream_apps.storage.query import QueryError
    from synthwatch.stream_apps.storage.reads import parse_since, recent_rejects

    try:
        rows = recent_rejects(Settings(), since=parse_since(since), lab=lab, limit=limit)
    except (ValueError, QueryError) as error:
        _fail(str(error))

    def table() -> Table:
        return rich_table(
            plain(f"rejects in the last {since}" + (f" for {lab}" if lab else "")),
            ("rejected (UTC)", "stage", "source", "event id", "lab / agency", "reason"),
            [
                (
                    _when(row.rejected_at),
                    plain(row.stage),
                    plain(row.source),
                    plain(row.event_id or ""),
                    plain(row.reporter),
                    plain(row.reason),
                )
                for row in rows
            ],
            overflow="fold",
        )

    emit(fmt, REJECT_COLUMNS, [[getattr(r, c) for c in REJECT_COLUMNS] for r in rows], table, console)
    if fmt is OutputFormat.table:
        console.print(
            plural(len(rows), "reject") + (f" (the newest {limit}; --limit shows more)" if len(rows) == limit else "")
        )


CORRECTION_COLUMNS = (
    "corrected",
    "corrected_by",
    "kind",
    "reporter",
    "old_substance",
    "new_substance",
    "old_quantity",
    "new_quantity",
    "occurred_at",
    "superseded",
)


def corrections(
    event_id: Annotated[str | None, typer.Argument(help="Only this report: is it corrected, and by which id?")] = None,
    since: Annotated[str, typer.Option(help="How far back (by the correction's occurrence): 30d, 2w.")] = "365d",
    lab: Annotated[str | None, typer.Option(help="Only corrections by this lab_id (or customs agency).")] = None,
    limit: Annotated[int, typer.Option(min=1, help="Most corrections shown.")] = 200,
    fmt: FormatOption = OutputFormat.table,
) -> None:
    """Reports corrected by their reporter: which report, by which id, old and new substance and quantity."""
    from synthwatch.stream_apps.storage.query import QueryError
    from synthwatch.stream_apps.storage.reads import parse_since, recent_corrections

    try:
        rows = recent_corrections(Settings(), since=parse_since(since), lab=lab, event_id=event_id, limit=limit)
    except (ValueError, QueryError) as error:
        _fail(str(error))

    def table() -> Table:
        return rich_table(
            plain("corrected reports" + (f" ({event_id})" if event_id else "") + (f" for {lab}" if lab else "")),
            ("report", "corrected by", "kind", "lab / agency", "substance", "quantity", "occurred (UTC)"),
            [
                (
                    plain(row.corrected),
                    plain(row.corrected_by + (" (itself corrected since)" if row.superseded else "")),
                    plain(row.kind),
                    plain(row.reporter),
                    plain(f"{row.old_substance} -> {row.new_substance}"),
                    plain(f"{row.old_quantity} -> {row.new_quantity}" if row.new_quantity else ""),
                    _when(row.occurred_at),
                )
                for row in rows
            ],
            overflow="fold",
        )

    emit(fmt, CORRECTION_COLUMNS, [[getattr(r, c) for c in CORRECTION_COLUMNS] for r in rows], table, console)
    if fmt is OutputFormat.table:
        if event_id and not rows:
            console.print(plain(f"report {event_id} is not corrected (and corrects nothing)"))
        else:
            console.print(plural(len(rows), "corrected report"))


def stats(
    days: Annotated[int, typer.Option(min=1, help="Window in days (today included).")] = 30,
    region: Annotated[str | None, typer.Option(help="Only this ISO 3166-2 region.")] = None,
    fmt: FormatOption = OutputFormat.table,
) -> None:
    """Reports and seized grams per region and substance, with first and last sighting."""
    from synthwatch.stream_apps.storage.query import QueryError
    from synthwatch.stream_apps.storage.reads import stats as read_stats

    try:
        rows = read_stats(Settings(), days=days, region=region)
    except (ValueError, QueryError) as error:
        _fail(str(error))

    def table() -> Table:
        numbers = ("reports", "lab detections", "seizures", "grams")
        return rich_table(
            plain(f"reports in the last {plural(days, 'day')}" + (f" in {region.upper()}" if region else "")),
            ("region", "substance", "family", *numbers, "first seen", "last seen"),
            [
                (
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
                for row in rows
            ],
            right=numbers,
        )

    emit(fmt, STATS_COLUMNS, [[getattr(r, c) for c in STATS_COLUMNS] for r in rows], table, console)
    if fmt is OutputFormat.table:
        reports = plural(sum(r.reports for r in rows), "report")
        console.print(f"{reports} over {plural(len(rows), 'region x substance row')}")


def substance(
    name: Annotated[str, typer.Argument(help="A name (any spelling), an InChIKey or its first block.")],
    fmt: FormatOption = OutputFormat.table,
    part: Annotated[
        str,
        typer.Option(help="With --format csv: which table, regions, months, alerts or similar (JSON has all)."),
    ] = "regions",
) -> None:
    """Everything stored about one substance: first seen, regions, months, alerts, structurally similar substances."""
    import dataclasses

    from synthwatch.stream_apps.storage.query import QueryError
    from synthwatch.stream_apps.storage.reads import similar_substance_names, substance_history

    parts = ("regions", "months", "alerts", "similar")
    if part not in parts:
        _fail(f"--part is one of {', '.join(parts)}, not {part!r}", code=2)
    settings = Settings()
    try:
        history = substance_history(settings, name)
        similar = similar_substance_names(settings, name) if history is None else []
    except (ValueError, QueryError) as error:
        _fail(str(error))
    if history is None:
        hint = f"; did you mean {', '.join(similar)}?" if similar else "; `synthwatch stats` lists the names stored"
        _fail(f"no report of {name!r} is stored{hint}", code=2)
    if fmt is OutputFormat.json:
        sys.stdout.write(to_json(dataclasses.asdict(history)) + "\n")
        return
    if fmt is OutputFormat.csv:
        items = getattr(history, part)
        columns = [f.name for f in dataclasses.fields(items[0])] if items else []
        write_csv(columns, [[getattr(item, c) for c in columns] for item in items])
        return
    header = plain(history.substance_name, style="bold")
    header.append_text(
        plain(f" (key {history.substance_key}, {history.family or 'family unknown'}; matched by {history.resolved_by})")
    )
    console.print(header)
    console.print(
        f"first seen {_when(history.first_seen)}, last seen {_when(history.last_seen)}, "
        f"{plural(history.reports, 'report')}",
        highlight=False,
    )
    console.print(
        rich_table(
            "regions, in order of first sighting",
            ("region", "country", "first seen", "last seen", "reports"),
            [
                (plain(r.region), plain(r.country), _when(r.first_seen), _when(r.last_seen), f"{r.reports:,}")
                for r in history.regions
            ],
            right=("reports",),
        )
    )
    counts = ("reports", "lab detections", "seizures", "grams")
    console.print(
        rich_table(
            "reports per month",
            ("month", *counts),
            [
                (
                    m.month.strftime("%Y-%m"),
                    f"{m.reports:,}",
                    f"{m.lab_detections:,}",
                    f"{m.border_seizures:,}",
                    _number(m.grams),
                )
                for m in history.months
            ],
            right=counts,
        )
    )
    console.print(
        rich_table(
            plural(len(history.alerts), "alert"),
            ("triggered (UTC)", "severity", "type", "region", "summary"),
            [
                (
                    _when(a.triggered_at),
                    plain(a.severity),
                    plain(a.alert_type),
                    plain(a.region or "(network)"),
                    plain(a.summary),
                )
                for a in history.alerts
            ],
            overflow="fold",
        )
    )
    if history.family_guess:  # only for a structure no SMARTS pattern classified
        console.print(plain(f"family guess (nearest known relative): {history.family_guess}"), highlight=False)
    control = {True: "controlled", False: "not controlled", None: "unknown"}
    console.print(
        rich_table(
            "nearest known structures (similarity 0-1)",
            ("substance", "similarity", "family", "control", "known from"),
            [
                (
                    plain(n.name),
                    f"{n.score:.2f}",
                    plain(n.family or "unclassified"),
                    control[n.controlled],
                    "catalogue" if n.catalogued else "reports",
                )
                for n in history.similar
            ],
            right=("similarity",),
        )
        if history.similar
        else "no known structure to compare with (no structure reported)"
    )


def ingest_history(
    file: Annotated[Path, typer.Argument(help="NDJSON file of reports (one JSON object per line).")],
    batch_size: Annotated[
        int | None,
        typer.Option(
            min=1000,
            help="Lines per chunk and per insert, at most (default: 1,200,000 when the embedded engine parses the "
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
    from synthwatch.stream_apps.storage.backfill.ingest import IngestRefused
    from synthwatch.stream_apps.storage.backfill.ingest import ingest_history as run_ingest

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
        "lab detections",
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
    app.command("rejects")(rejects)
    app.command("corrections")(corrections)
    app.command("stats")(stats)
    app.command("substance")(substance)
    app.command("ingest-history")(ingest_history)
