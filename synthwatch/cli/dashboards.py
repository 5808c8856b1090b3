"""CLI commands for dashboards and the HTML report: ``synthwatch dashboards build|check`` and ``synthwatch report``.

Kept out of ``cli.py`` so that module stays about running the pipeline; ``cli.py`` mounts these with
:func:`register`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from synthwatch.consoles import command_console
from synthwatch.terminal import say

console = command_console()
err = command_console(stderr=True)


def register(app: typer.Typer) -> None:
    """Add ``dashboards build``, ``dashboards check`` and ``report`` to the ``synthwatch`` app."""
    dashboards_app = typer.Typer(no_args_is_help=True, help="Grafana dashboards as code (dashboards/json).")
    app.add_typer(dashboards_app, name="dashboards")

    @dashboards_app.command("build")
    def dashboards_build(
        out: Annotated[Path | None, typer.Option(help="Directory (default: the package's dashboards/json).")] = None,
    ) -> None:
        """Generate the Grafana dashboard JSON from the Python definitions."""
        from synthwatch.dashboards.build import JSON_DIR, write_all

        for path in write_all(out or JSON_DIR):
            console.print(f"wrote {path}")

    @dashboards_app.command("check")
    def dashboards_check() -> None:
        """Fail when the committed dashboard JSON differs from the Python definitions."""
        from synthwatch.dashboards.build import stale

        found = stale()
        if found:
            err.print(f"[bold red]error:[/] stale dashboards: {', '.join(found)}; run `synthwatch dashboards build`")
            raise typer.Exit(1)
        console.print("Dashboard JSON is up to date.")

    @app.command("report")
    def report(
        out: Annotated[Path, typer.Option("--out", help="HTML file to write.")] = Path("report.html"),
        since: Annotated[str, typer.Option(help="Time range ending now: 30d, 12h, 2w...")] = "30d",
    ) -> None:
        """Render the overview dashboard's panels into one self-contained HTML page (no Grafana needed)."""
        from synthwatch.dashboards.macros import parse_duration
        from synthwatch.dashboards.report import write_report
        from synthwatch.settings import Settings
        from synthwatch.stream_apps.storage.query import QueryError, run_query

        try:
            duration = parse_duration(since)
        except ValueError as error:
            say(err, "[bold red]error:[/] --since: ", str(error))
            raise typer.Exit(2) from None
        settings = Settings()
        try:
            run_query(settings, "SELECT count() FROM reports_daily")  # one clear line when there is no data
            result = write_report(settings, out, duration)
        except QueryError as error:
            say(err, "[bold red]error:[/] ", str(error))
            raise typer.Exit(1) from None
        except OSError as error:
            say(err, "[bold red]error:[/] ", f"cannot write {out}: {error.strerror or error}; choose another --out")
            raise typer.Exit(1) from None
        drawn = len(result.panels) - len(result.failed)
        console.print(f"wrote {out} ({drawn}/{len(result.panels)} panels, last {since})")
        for panel in result.failed:
            say(err, "[red]panel failed:[/] ", f"{panel.title}: {panel.error}")
        if result.failed:
            raise typer.Exit(1)
