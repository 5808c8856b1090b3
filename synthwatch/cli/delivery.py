"""Commands for alert delivery: ``subscriptions check FILE`` and ``deliveries``.

``check`` is what an administrator runs before handing a file to the worker: it validates (errors name
file:line and field) and shows who would receive what for a few realistic alerts, so a route that
catches nothing, or everything, is seen before an officer misses an alert or gets spammed.
``deliveries`` reads the attempts through :func:`synthwatch.stream_apps.storage.query.run_query`, i.e.
through the running
worker when it holds the embedded engine.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from synthwatch.cli.output import FormatOption, OutputFormat, emit, rich_table
from synthwatch.consoles import command_console
from synthwatch.redaction import redact
from synthwatch.settings import Settings
from synthwatch.terminal import plain, say

_STATUS_STYLE = {
    "delivered": "green",
    "digest_sent": "green",
    "queued_digest": "cyan",
    "failed": "yellow",
    "gave_up": "bold red",
    "deferred": "magenta",
}

#: The columns DELIVERIES_SQL selects, in order (csv and json name them even when no row came back).
DELIVERY_COLUMNS = (
    "at",
    "officer_id",
    "alert_id",
    "channel",
    "route",
    "attempt",
    "status",
    "response_code",
    "duration_ms",
    "substance",
    "region",
    "reason",
)

DELIVERIES_SQL = """
SELECT at, officer_id, alert_id, channel, route, attempt, toString(status) AS status, response_code,
       duration_ms, substance, region, reason, digest_id
FROM deliveries
WHERE {where}
ORDER BY at DESC, attempt DESC
LIMIT %(limit)s
"""


def sample_alerts(now: datetime | None = None) -> list[Any]:
    """Realistic alerts of every type and severity, to show what a subscriptions file does with them."""
    from synthwatch.schemas import Alert, AlertSubstance

    now = now or datetime.now(UTC)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)

    def alert(alert_id: str, **fields: Any) -> Alert:
        base: dict[str, Any] = {
            "alert_id": alert_id,
            "window_start": day,
            "window_end": day + timedelta(days=1),
            "triggered_at": now,
            "detected_at": now,
        }
        return Alert(**{**base, **fields})

    nitazene = AlertSubstance(
        name="N-pentyloxy nitazene (sample)", key="SAMPLENITAZENE", inchikey=None, family="nitazene", controlled=None
    )
    cathinone = AlertSubstance(name="3-MMC", key="sample-3mmc", family="synthetic_cathinone", controlled=True)
    ketamine = AlertSubstance(name="Ketamine", key="sample-ketamine", family="arylcyclohexylamine", controlled=False)
    isotonitazene = AlertSubstance(name="Isotonitazene", key="sample-isotonitazene", family="nitazene", controlled=True)
    return [
        alert(
            "sample-new-nitazene-ml-bko",
            alert_type="new_substance",
            severity="critical",
            country="ML",
            region="ML-BKO",
            substance=nitazene,
            summary="Sample: a never-seen nitazene identified by a Bamako lab.",
        ),
        alert(
            "sample-first-3mmc-sn-dk",
            alert_type="first_in_region",
            severity="warning",
            country="SN",
            region="SN-DK",
            substance=cathinone,
        ),
        alert(
            "sample-spike-3mmc-fr-75c",
            alert_type="spike",
            severity="warning",
            country="FR",
            region="FR-75C",
            substance=cathinone,
            metric="count",
            observed=14,
            expected=2.5,
            window_start=day - timedelta(days=6),
        ),
        alert(
            "sample-first-ketamine-ma-rab",
            alert_type="first_in_region",
            severity="info",
            country="MA",
            region="MA-RAB",
            substance=ketamine,
        ),
        alert(
            "sample-spread-isotonitazene",
            alert_type="spread",
            severity="critical",
            substance=isotonitazene,
            observed=3,
            expected=3,
            window_start=day - timedelta(days=13),
            details={"regions": ["MA-CAS", "ML-BKO", "SN-DK"]},
        ),
    ]


def _read_alerts(path: Path) -> list[Any]:
    """One alert JSON object, a JSON list of them, or NDJSON."""
    from synthwatch.schemas import Alert

    text = path.read_text(encoding="utf-8").strip()
    try:
        data = json.loads(text)
        items = data if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        items = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [Alert.model_validate(item) for item in items]


def _problems(subscriptions: Any, settings: Settings) -> tuple[list[str], list[str]]:
    """(errors, warnings) in *this* environment (the worker's may differ).

    Errors: a webhook secret that is unset, too short, or the same value as another officer's (the
    worker refuses to sign with it). Warnings: a webhook host that resolves to an address the worker
    would refuse, and e-mail routes without an SMTP server.
    """
    import socket
    from urllib.parse import urlsplit

    from synthwatch.stream_apps.delivery.subscriptions import WebhookChannel, secret_problems
    from synthwatch.stream_apps.delivery.targets import in_clear

    errors = [f"{key.replace('/', ' / channel ')}: {why}" for key, why in secret_problems(subscriptions).items()]
    warnings = []
    policy = subscriptions.target_policy(settings.webhook_allowed_networks)
    for officer in subscriptions.officers:
        for name, channel in officer.channels().items():
            where = f"{officer.id} / channel {name}"
            if isinstance(channel, WebhookChannel):
                host = urlsplit(channel.url).hostname or ""
                try:
                    addresses = {str(info[4][0]) for info in socket.getaddrinfo(host, None)}
                except OSError as error:
                    warnings.append(f"{where}: cannot resolve {host} here ({error})")
                    continue
                plain = in_clear(channel.url)
                refused = sorted(filter(None, (policy.refusal(host, a, plain=plain) for a in addresses)))
                warnings.extend(f"{where}: {reason}" for reason in refused[:1])
            elif not settings.smtp_host:
                warnings.append(f"{where}: e-mail, but SYNTHWATCH_SMTP_HOST is not set here")
    return errors, warnings


def delivery_id(alert_id: str, officer_id: str, channel: str) -> str:
    """The id ``deliveries resend`` takes: the signed delivery id receivers see (``webhook.delivery_id``)."""
    from synthwatch.stream_apps.delivery.webhook import delivery_id as signed_id

    return signed_id(alert_id, officer_id, channel)


def _resend(settings: Settings, delivery: str) -> dict[str, Any]:
    """Resend through the running worker when it holds the embedded engine, else from this process."""
    import asyncio
    import os

    from synthwatch.stackfile import read_stack, read_web_token

    if not re.fullmatch(r"d_[0-9a-f]{32}", delivery):
        raise ValueError(f"{delivery!r} is not a delivery id (d_ and 32 hex digits, as `synthwatch deliveries` shows)")
    if settings.clickhouse_is_embedded:
        info = read_stack(settings)
        if info is not None and info.pid != os.getpid():
            return _resend_remote(info.web_url, read_web_token(settings), delivery)
    if settings.subscriptions_file is None:
        raise ValueError("SYNTHWATCH_SUBSCRIPTIONS_FILE is not set: resend needs the officers' subscriptions")
    from synthwatch.stream_apps.delivery.service import DeliveryService
    from synthwatch.stream_apps.storage.clickhouse import connect, migrate

    client = connect(settings)
    try:
        migrate(client)  # the gave_up rows keep their alert from migration 0004 on; nothing else to add

        async def run() -> dict[str, Any]:
            service = DeliveryService.from_settings(settings, client, store_retries=3)
            try:
                outcome = await service.resend(delivery)
            finally:
                await service.close()
            return {"status": outcome.status, "attempts": outcome.attempts, "reason": outcome.reason}

        return asyncio.run(run())
    finally:
        client.close()


def _resend_remote(web_url: str, token: str | None, delivery: str) -> dict[str, Any]:
    """Ask the running worker (it owns the embedded engine and the delivery service) to resend."""
    import urllib.error
    import urllib.request

    if not token:
        raise ValueError("no access token for the running stack: run this as the user that started `synthwatch up`")
    request = urllib.request.Request(
        f"{web_url}/deliveries/resend",
        data=json.dumps({"delivery_id": delivery}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=1800) as response:
            return dict(json.loads(response.read()))
    except urllib.error.HTTPError as error:
        detail = error.read().decode("utf-8", errors="replace")
        with contextlib.suppress(ValueError):
            detail = str(json.loads(detail).get("error", detail))
        raise ValueError(detail) from None
    except urllib.error.URLError as error:
        raise ValueError(f"the running stack at {web_url} did not answer: {error.reason}") from None


def register(app: typer.Typer) -> None:
    """Add ``subscriptions check`` and ``deliveries`` to the ``synthwatch`` command line."""
    subscriptions_app = typer.Typer(no_args_is_help=True, help="Liaison officers' subscriptions (alert delivery).")
    app.add_typer(subscriptions_app, name="subscriptions")

    @subscriptions_app.command("check")
    def check(
        file: Annotated[Path, typer.Argument(help="Subscriptions YAML file.")],
        alert: Annotated[
            Path | None, typer.Option("--alert", help="Route these alerts (JSON, JSON list or NDJSON) instead.")
        ] = None,
    ) -> None:
        """Validate a subscriptions file and show who would receive what for sample alerts."""
        from synthwatch.stream_apps.delivery.subscriptions import (
            SubscriptionsError,
            load_subscriptions,
            readable_secrets,
            recipients,
        )

        console, err = command_console(), command_console(stderr=True)
        settings = Settings()
        try:
            subscriptions = load_subscriptions(file, settings.webhook_allowed_networks)
        except SubscriptionsError as error:
            for problem in error.problems:
                say(err, "[bold red]error:[/] ", problem)
            raise typer.Exit(1) from None
        try:
            alerts = _read_alerts(alert) if alert is not None else sample_alerts()
        except (OSError, ValueError) as error:
            say(err, "[bold red]error:[/] ", f"{alert}: {error}")
            raise typer.Exit(1) from None

        officers = Table(title=plain(f"{file}: {len(subscriptions.officers)} officer(s)"), title_justify="left")
        for column in ("officer", "name", "language", "digest", "routes", "channels"):
            officers.add_column(column)
        for officer in subscriptions.officers:
            officers.add_row(
                plain(officer.id),
                plain(officer.name),
                plain(officer.language),
                plain(f"{officer.digest_time:%H:%M} {officer.timezone} (below {officer.immediate_min_severity})"),
                plain(", ".join(r.name or "" for r in officer.routes)),
                plain(", ".join(f"{c.type}:{n} -> {redact(str(c.target))}" for n, c in officer.channels().items())),
            )
        console.print(officers)

        for item in alerts:
            place = item.region or "network: " + ", ".join(item.details.get("regions", []))
            table = Table(
                title=plain(
                    f"{item.alert_type} · {item.severity} · {item.substance.name} "
                    f"({item.substance.family or 'unclassified'}) · {place}"
                ),
                title_justify="left",
            )
            for column in ("officer", "language", "route", "channel", "when"):
                table.add_column(column)
            found = recipients(item, subscriptions)
            for r in found:
                when = "immediately" if r.immediate else f"digest {r.officer.digest_time:%H:%M} {r.officer.timezone}"
                table.add_row(
                    plain(r.officer.id),
                    plain(r.officer.language),
                    plain(r.route.name or ""),
                    plain(f"{r.channel.type}:{r.channel.name}"),
                    plain(when),
                )
            if not found:
                table.add_row("[yellow]nobody[/]", "", "", "", "")
            console.print(table)

        errors, warnings = _problems(subscriptions, settings)
        exposed = readable_secrets(file, subscriptions)
        warnings += [exposed] if exposed else []
        for warning in warnings:
            say(console, "[yellow]warning:[/] ", warning)
        for problem in errors:
            say(err, "[bold red]error:[/] ", problem)
        if errors:
            err.print(
                f"{file}: the worker would refuse these webhooks: give each officer's webhook its own secret "
                "(secret_env naming a variable set to e.g. `openssl rand -hex 32`)",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(1)
        console.print(plain(f"{file} is valid.", style="green"))

    deliveries_app = typer.Typer(
        help="Delivery attempts to liaison officers (newest first); `deliveries resend ID` sends one again."
    )
    app.add_typer(deliveries_app, name="deliveries")

    @deliveries_app.command("resend")
    def resend(
        delivery: Annotated[
            str, typer.Argument(metavar="ID", help="The delivery id (d_…) shown by `synthwatch deliveries`.")
        ],
    ) -> None:
        """Send again an alert delivery that gave up, with the same delivery id (receivers de-duplicate on it).

        Uses today's subscriptions file (a fixed URL or secret is what a resend is for); the new attempts
        are recorded after the old ones. With the embedded stack running, the worker sends it.
        """
        console, err = command_console(), command_console(stderr=True)
        try:
            outcome = _resend(Settings(), delivery.strip())
        except Exception as error:  # ResendError, QueryError, a configuration error: one line, what to do
            say(err, "[bold red]error:[/] ", redact(str(error)))
            raise typer.Exit(1) from None
        style = _STATUS_STYLE.get(outcome["status"], "")
        attempts = int(outcome["attempts"])
        said = f"{attempts} new attempt" + ("" if attempts == 1 else "s")
        reason = f": {redact(str(outcome['reason']))}" if outcome["reason"] else ""
        console.print(plain(f"delivery {delivery}: {outcome['status']} after {said}{reason}", style=style))
        if outcome["status"] != "delivered":
            raise typer.Exit(1)

    @deliveries_app.callback(invoke_without_command=True)
    def deliveries(
        ctx: typer.Context,
        officer: Annotated[str | None, typer.Option("--officer", help="Only this officer's attempts.")] = None,
        alert: Annotated[str | None, typer.Option("--alert", help="Only this alert's attempts.")] = None,
        status: Annotated[
            str | None, typer.Option("--status", help="delivered, failed, gave_up, queued_digest or digest_sent.")
        ] = None,
        limit: Annotated[int, typer.Option("--limit", min=1, max=10_000, help="Most recent N attempts.")] = 50,
        fmt: FormatOption = OutputFormat.table,
    ) -> None:
        """Recent delivery attempts to liaison officers and their status (newest first)."""
        from synthwatch.stream_apps.storage.query import run_query

        if ctx.invoked_subcommand is not None:
            return

        console, err = command_console(), command_console(stderr=True)
        if status is not None and status not in _STATUS_STYLE:
            err.print(f"[bold red]error:[/] --status is one of {', '.join(_STATUS_STYLE)}", highlight=False)
            raise typer.Exit(1)
        conditions, params = ["1"], {"limit": limit}
        for column, value in (("officer_id", officer), ("alert_id", alert), ("status", status)):
            if value is not None:
                conditions.append(f"{column} = %({column})s")
                params[column] = value  # type: ignore[assignment]
        try:
            result = run_query(Settings(), DELIVERIES_SQL.format(where=" AND ".join(conditions)), params)
        except Exception as error:  # QueryError, or ClickHouse's own message: either says what is wrong
            say(err, "[bold red]error:[/] ", redact(str(error)))
            if "deliveries" in str(error) and ("UNKNOWN_TABLE" in str(error) or "doesn't exist" in str(error)):
                err.print("The deliveries table is missing: run `synthwatch db migrate` (or restart the worker).")
            raise typer.Exit(1) from None
        rows = result.as_dicts()
        if fmt is not OutputFormat.table:
            columns = DELIVERY_COLUMNS
            safe = [{**r, "reason": None if r["reason"] is None else redact(str(r["reason"]))} for r in rows]
            emit(fmt, columns, [[r[c] for c in columns] for r in safe], Table, console)
            return
        title = "delivery attempts" + (f" for {officer}" if officer else "") + (f", alert {alert}" if alert else "")
        counts = Counter(row["status"] for row in rows)
        table = rich_table(
            plain(f"{title} (newest first, at most {limit})"),
            ("at (UTC)", "officer", "alert", "channel", "route", "#", "status", "code", "ms", "what", "reason"),
            [
                (
                    plain(str(row["at"]).replace("T", " ")[:19]),
                    plain(row["officer_id"]),
                    plain(row["alert_id"]),
                    plain(row["channel"]),
                    plain(row["route"]),
                    str(row["attempt"]),
                    plain(row["status"], style=_STATUS_STYLE.get(row["status"], "")),
                    "" if row["response_code"] is None else str(row["response_code"]),
                    f"{row['duration_ms']:.0f}",
                    plain(f"{row['substance']} {row['region']}".strip()),
                    plain(redact(str(row["reason"]))),
                )
                for row in rows
            ],
            right=("#", "code", "ms"),
            title_justify="left",
        )
        console.print(table)
        gave_up = {
            (row["alert_id"], row["officer_id"], row["channel"])
            for row in rows
            if row["status"] == "gave_up" and not row["digest_id"]
        }
        for alert_id, officer_id, channel in sorted(gave_up):
            console.print(
                plain(
                    f"gave up: alert {alert_id} to {officer_id}/{channel}; send it again with "
                    f"`synthwatch deliveries resend {delivery_id(alert_id, officer_id, channel)}`"
                ),
                soft_wrap=True,
            )
        if not rows:
            console.print(plain("No delivery attempts recorded" + (f" for {officer}." if officer else ".")))
        else:
            console.print(plain(", ".join(f"{name}: {n}" for name, n in sorted(counts.items()))))
