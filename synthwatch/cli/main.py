"""The ``synthwatch`` command line."""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, NoReturn, cast

import typer
from rich.table import Table

from synthwatch.cli.dashboards import register as register_dashboard_commands
from synthwatch.cli.data import register as register_data_commands
from synthwatch.cli.delivery import register as register_delivery_commands
from synthwatch.cli.gateway import register as register_gateway_commands
from synthwatch.cli.output import FormatOption, OutputFormat, emit
from synthwatch.cli.publish import EXIT_CODES_HELP, EXIT_NOTHING_SENT_OR_ERROR, exit_code, print_reasons, push_metrics
from synthwatch.consoles import command_console
from synthwatch.redaction import redact
from synthwatch.settings import Settings
from synthwatch.terminal import plain, say

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Early warning for new synthetic drugs.")
schemas_app = typer.Typer(no_args_is_help=True, help="Wire-contract JSON Schema files.")
db_app = typer.Typer(no_args_is_help=True, help="ClickHouse schema.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print numbers.")
app.add_typer(schemas_app, name="schemas")
app.add_typer(db_app, name="db")
app.add_typer(bench_app, name="bench")
register_data_commands(app)
register_delivery_commands(app)
register_dashboard_commands(app)
register_gateway_commands(app)

console = command_console()

err = command_console(stderr=True)


def _fail(message: str, code: int = 1) -> NoReturn:
    say(err, "[bold red]error:[/] ", redact(message))
    raise typer.Exit(code)


# --- running -------------------------------------------------------------------------------------------


@app.command()
def up(loglevel: Annotated[str, typer.Option(help="Faust log level.")] = "warning") -> None:
    """Start the embedded stack: Tansu broker, topics, Faust worker and embedded ClickHouse.

    Ctrl-C stores what the broker holds, then stops (a second Ctrl-C stops at once).
    """
    from synthwatch.stack.broker import BrokerError
    from synthwatch.stack.worker import StackError, run_embedded_stack

    settings = Settings()
    try:
        outcome = run_embedded_stack(settings, loglevel=loglevel, announce=lambda m: console.print(m, highlight=False))
    except (StackError, BrokerError) as error:
        _fail(str(error))
    if outcome is not None and not outcome.drained:
        lost = "an unknown number of" if outcome.lost is None else f"{outcome.lost:,}"
        _fail(f"{lost} accepted records were not stored ({outcome.reason})", code=3)


@app.command()
def worker(loglevel: Annotated[str, typer.Option(help="Faust log level.")] = "warning") -> None:
    """Run one Faust worker against the configured Kafka and ClickHouse (production; N replicas)."""
    import gc

    # What the worker imports and builds from here lives as long as it does: the automatic collections that
    # walk it cost ~35 ms before its group join. run_worker collects once, and turns them on, during the join.
    gc.disable()
    from synthwatch.stack.worker import StackError, run_worker
    from synthwatch.stackfile import NoBrokerConfigured, bootstrap_servers

    settings = Settings()
    try:
        servers = bootstrap_servers(settings)
        run_worker(settings, servers, loglevel=loglevel, announce=lambda m: console.print(m, highlight=False))
    except (NoBrokerConfigured, StackError) as error:
        _fail(str(error))


@app.command()
def status() -> None:
    """Show the running embedded stack (broker address, worker HTTP port), if any."""
    from synthwatch.redaction import redact
    from synthwatch.stackfile import read_stack

    settings = Settings()
    info = read_stack(settings)
    if info is None:
        console.print(f"No stack running for {settings.data_dir}. Start one with `synthwatch up`.")
        raise typer.Exit(1)
    console.print_json(redact(json.dumps(dataclasses.asdict(info))))


# --- producing -----------------------------------------------------------------------------------------


@app.command(epilog=EXIT_CODES_HELP)
def publish(
    file: Annotated[str, typer.Argument(help="NDJSON or CSV file, or - for standard input.")],
    fmt: Annotated[str | None, typer.Option("--format", help="ndjson or csv (default: by extension).")] = None,
    delimiter: Annotated[
        str | None, typer.Option(help="CSV delimiter, e.g. ';' or tab (default: sniffed from the header).")
    ] = None,
    encoding: Annotated[
        str | None, typer.Option(help="Text encoding, e.g. cp1252 (default: UTF-8, with or without a BOM).")
    ] = None,
    timezone: Annotated[
        str, typer.Option(help="CSV: time zone of dates and times written without an offset (IANA name).")
    ] = "UTC",
    aliases: Annotated[
        Path | None,
        typer.Option(help="CSV: TOML file mapping a LIMS's headers to fields (docs/examples/lims_aliases.toml)."),
    ] = None,
) -> None:
    """Validate and publish reports; invalid ones go to the rejects topic with a reason.

    CSV: a BOM is dropped, the delimiter sniffed, codes (KG, Air) read in any case, decimal commas
    accepted, and a date or time without an offset is read in --timezone (UTC unless given).
    """
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from synthwatch.kafka_clients import KafkaConnectError, KafkaSecurityError
    from synthwatch.producers.publisher import Publisher, PublishSummary, SigningError
    from synthwatch.producers.readers import (
        CsvOptions,
        InputFormat,
        ReaderError,
        check_encoding,
        detect_format,
        load_aliases,
        read_records,
    )
    from synthwatch.schemas.envelope import OrgKeysError
    from synthwatch.stackfile import NoBrokerConfigured, bootstrap_servers

    error_code = EXIT_NOTHING_SENT_OR_ERROR
    settings = Settings()
    if file != "-" and Path(file).is_dir():
        _fail(f"{file} is a directory: publish one file at a time (for f in {file}/*; do ...; done)", error_code)
    if file != "-" and not Path(file).is_file():
        _fail(f"no such file: {file}", error_code)
    if fmt not in (None, "ndjson", "csv"):
        _fail("--format is ndjson or csv", error_code)
    if delimiter is not None:
        delimiter = {"tab": "\t", "\\t": "\t"}.get(delimiter, delimiter)
        if len(delimiter) != 1:
            _fail(f"--delimiter is one character (or 'tab'), not {delimiter!r}", error_code)
    try:
        check_encoding(encoding)
        options = CsvOptions(delimiter, timezone, load_aliases(aliases) if aliases is not None else None)
        options.zone()
    except ReaderError as error:
        _fail(str(error), error_code)
    try:
        servers = bootstrap_servers(settings)
    except NoBrokerConfigured as error:
        _fail(str(error), error_code)
    total = None if file == "-" else sum(1 for line in open(file, "rb") if line.strip())  # noqa: SIM115
    started = time.monotonic()
    try:
        publisher = Publisher(
            settings, servers, bootstrap_timeout_ms=int(settings.publish_connect_timeout_seconds * 1000)
        )
    except (SigningError, OrgKeysError, KafkaSecurityError, KafkaConnectError) as error:  # each says what to do
        records_in_file = (total or 0) - (1 if (fmt or detect_format(file)) == "csv" else 0)  # minus a header
        if isinstance(error, KafkaConnectError) and records_in_file > 0:  # all failed: the rule must see it
            failed = PublishSummary(read=records_in_file, failed=[("file", "no broker")] * records_in_file)
            push_metrics(settings, failed, time.monotonic() - started, None, err)
        _fail(str(error), error_code)
    records = read_records(
        file,
        cast(InputFormat | None, fmt),
        max_depth=settings.max_csv_header_depth,
        max_field=settings.max_csv_field_bytes,
        encoding=encoding,
        options=options,
    )
    with (
        publisher,
        Progress(
            TextColumn("publishing"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err,
            transient=True,
            disable=not err.is_terminal,
        ) as progress,
    ):
        task = progress.add_task("publish", total=total)
        try:
            summary = publisher.publish_records(records, progress=lambda n: progress.advance(task, n))
        except ReaderError as error:
            _fail(f"{error}; nothing after that point was read", error_code)
    push_metrics(settings, summary, time.monotonic() - started, publisher.acked_per_topic, err)
    table = Table(title=plain(f"published {file}"))
    for column in ("read", "sent", "rejected", "duplicates", "failed"):
        table.add_column(column, justify="right")
    table.add_row(
        *(str(v) for v in (summary.read, summary.sent, summary.rejected, summary.duplicates, len(summary.failed)))
    )
    console.print(table)
    print_reasons(console, summary)
    if summary.read == 0:
        say(err, "[yellow]warning:[/] ", f"{file} holds no records" + (" (only a header row)" if total else ""))
    for label, problem in summary.failed[:20]:
        say(err, "[red]not delivered[/] ", f"{label}: {problem}")
    if summary.failed:
        _fail(f"{len(summary.failed)} records were NOT delivered (listed above); re-send the file", error_code)
    raise typer.Exit(exit_code(summary))


@app.command()
def simulate(
    days: Annotated[int, typer.Option(min=1, help="Days of reports to generate.")] = 30,
    seed: Annotated[int, typer.Option(help="Random seed: same seed, same stream.")] = 1,
    out: Annotated[str, typer.Option(help="Output NDJSON file, or - for standard output.")] = "-",
    truth: Annotated[Path | None, typer.Option(help="Write the labelled incidents (JSON) here.")] = None,
    start: Annotated[str | None, typer.Option(help="First day (YYYY-MM-DD); default: DAYS ago.")] = None,
    events_per_day: Annotated[float, typer.Option(help="Mean reports per day over all regions.")] = 300.0,
    to_broker: Annotated[bool, typer.Option("--to-broker", help="Publish straight to Kafka.")] = False,
) -> None:
    """Generate a realistic labelled stream (new substances, first appearances, spikes, bad input)."""
    from datetime import UTC, date, datetime, timedelta

    from synthwatch.producers.simulate import SimulationConfig
    from synthwatch.producers.simulate import simulate as run_simulation

    first = date.fromisoformat(start) if start else (datetime.now(UTC) - timedelta(days=days)).date()
    sim = run_simulation(SimulationConfig(days=days, seed=seed, start=first, events_per_day=events_per_day))
    if truth is not None:
        truth.write_text(sim.truth.model_dump_json(indent=2), encoding="utf-8")
    if to_broker:
        from synthwatch.producers.publisher import Publisher
        from synthwatch.producers.readers import InputRecord
        from synthwatch.stackfile import bootstrap_servers

        settings = Settings()
        with Publisher(settings, bootstrap_servers(settings)) as publisher:
            summary = publisher.publish_records(
                InputRecord(source=f"simulate:{i}", raw=line) for i, line in enumerate(sim.lines, start=1)
            )
        err.print(
            f"sent {summary.sent}, rejected {summary.rejected}, duplicates {summary.duplicates}, "
            f"failed {len(summary.failed)}"
        )
    elif out == "-":
        sys.stdout.writelines(line + "\n" for line in sim.lines)
    else:
        sim.write(Path(out))
        err.print(f"wrote {len(sim.lines)} lines to {out}")


# --- data ----------------------------------------------------------------------------------------------


@schemas_app.command("export")
def schemas_export(
    out: Annotated[Path | None, typer.Option(help="Directory (default: the package's schemas/json).")] = None,
) -> None:
    """Write the JSON Schema files of the wire contract."""
    from synthwatch.schemas.json_schema import SCHEMA_DIR, export_schemas

    for path in export_schemas(out or SCHEMA_DIR):
        console.print(f"wrote {path}")


@schemas_app.command("check")
def schemas_check() -> None:
    """Fail when the committed JSON Schema files differ from the models."""
    from synthwatch.schemas.json_schema import stale_schemas

    stale = stale_schemas()
    if stale:
        _fail(f"stale JSON Schema files: {', '.join(stale)}; run `synthwatch schemas export`")
    console.print("JSON Schema files are up to date.")


@db_app.command("migrate")
def db_migrate(
    clustered: Annotated[
        bool, typer.Option("--clustered", help="Apply deploy/clickhouse/clustered (ON CLUSTER).")
    ] = False,
) -> None:
    """Apply pending ClickHouse migrations (idempotent) to the configured ClickHouse."""
    from synthwatch.stackfile import read_stack
    from synthwatch.stream_apps.storage.clickhouse import MigrationError, connect, database_of, migrate
    from synthwatch.stream_apps.storage.clustered import clustered_migrations, create_database_on_cluster

    settings = Settings()
    if settings.clickhouse_is_embedded and read_stack(settings) is not None:
        console.print("The running stack owns the embedded engine and migrated it at start-up.")
        return
    client = connect(settings)
    try:
        if clustered:
            create_database_on_cluster(client, database_of(settings))
        applied = migrate(client, clustered_migrations() if clustered else None)
    except MigrationError as error:
        _fail(str(error))
    finally:
        client.close()
    console.print(f"applied: {', '.join(f'{m.version:04d}_{m.name}' for m in applied) or 'nothing (up to date)'}")


@app.command()
def sql(
    query: Annotated[str, typer.Argument(help="One SELECT (or WITH ... SELECT) statement.")],
    fmt: FormatOption = OutputFormat.table,
) -> None:
    """Run one SELECT on synthwatch's ClickHouse in a read-only, time-bounded session (through the running stack
    if it holds the engine). Tables: SELECT name FROM system.tables WHERE database = currentDatabase()."""
    from synthwatch.stream_apps.storage.query import QueryError, run_query, trailing_format

    wanted = trailing_format(query)
    if wanted is not None:
        _fail(
            f"FORMAT {wanted} is not run by ClickHouse here (the session is read-only, and its answer must pass "
            f"the same checks); drop the FORMAT clause and pass --format csv or --format json"
        )
    try:
        result = run_query(Settings(), query)
    except QueryError as error:
        _fail(str(error))

    def table() -> Table:
        table = Table()
        for column in result.columns:
            table.add_column(plain(column))
        for row in result.rows:
            table.add_row(*(plain(v) for v in row))
        return table

    emit(fmt, result.columns, result.rows, table, console)


@app.command()
def demo(
    days: Annotated[int, typer.Option(min=1, help="Days published live through Kafka (the alerts shown).")] = 21,
    history_days: Annotated[
        int, typer.Option(min=0, help="Days of history loaded first with ingest-history (0: an empty network).")
    ] = 180,
    seed: Annotated[int, typer.Option(help="Simulation seed.")] = 7,
    end: Annotated[
        datetime | None,
        typer.Option(
            formats=["%Y-%m-%d"],
            help="The day after the simulated period (default: today, UTC); a fixed day and seed repeat the reports.",
        ),
    ] = None,
) -> None:
    """Load half a year of simulated reports, stream the last weeks through the stack, and show its alerts."""
    from synthwatch.stack.demo import run_demo

    raise typer.Exit(
        run_demo(days=days, seed=seed, console=console, history_days=history_days, end=end.date() if end else None)
    )


@app.command()
def backtest(
    input: Annotated[Path, typer.Option("--input", help="Events, NDJSON (the wire format).")],
    output: Annotated[Path, typer.Option("--output", help="Alerts, one JSON object per line.")],
    rejects: Annotated[Path | None, typer.Option(help="Rejects file (default: beside the output).")] = None,
    received_at: Annotated[
        datetime | None,
        typer.Option(
            "--received-at",
            formats=["%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%d %H:%M:%S%z", "%Y-%m-%d"],
            help="When the file's reports were received (a line records none): a line whose event time is more "
            "than SYNTHWATCH_MAX_FUTURE_HOURS after it is refused, as the worker refuses it. Default: the file's "
            "modification time (when it was written, never the time of this run).",
        ),
    ] = None,
) -> None:
    """Run the worker's detectors over a file, in file order, with no broker.

    At a terminal a progress bar on standard error shows the lines detected; piped output is unchanged.
    """
    import gc

    # What the command imports and builds (RDKit, the detector's modules, the catalogue, the run's state) lives until
    # it ends, and the reader's loop runs without the cyclic collector already: its passes over the start-up's
    # objects cost ~25 ms of CPU on the serial path (the imports and the catalogue). Back on when the command returns.
    collecting = gc.isenabled()
    gc.disable()
    try:
        _backtest(input, output, rejects, received_at)
    finally:
        if collecting:
            gc.enable()
    _TEARDOWN_SKIPPABLE.set()  # files written and closed, helper processes joined: nothing left for the teardown


def _backtest(input: Path, output: Path, rejects: Path | None, received_at: datetime | None) -> None:
    from synthwatch.stream_apps.detect.backtest import run_file
    from synthwatch.stream_apps.detect.region import DetectionConfig

    if not input.is_file():
        _fail(f"no such file: {input}")
    settings = Settings()
    config = DetectionConfig.from_settings(settings)
    future = settings.max_future_hours  # the worker's bound, so the backtest refuses what the worker refuses
    if received_at is None:
        received_at = datetime.fromtimestamp(input.stat().st_mtime, UTC)
    elif received_at.tzinfo is None:
        received_at = received_at.replace(tzinfo=UTC)
    if not err.is_terminal:
        run = run_file(input, output, config, rejects, received_at=received_at, max_future_hours=future)
    else:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with open(input, "rb") as counting:
            total = sum(1 for line in counting if line.strip())
        columns = (TextColumn("backtest"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=err, transient=True) as bar:
            task = bar.add_task("backtest", total=total)
            run = run_file(
                input,
                output,
                config,
                rejects,
                progress=lambda n: bar.advance(task, n),
                received_at=received_at,
                max_future_hours=future,
            )
    s = run.summary
    table = Table(title=f"backtest of {input.name}")
    for column in ("lines", "events", "of them late", "malformed", "duplicates", "alerts", "events/s"):
        table.add_column(column, justify="right")
    table.add_row(
        *(str(v) for v in (s.lines, s.events, s.late, s.malformed, s.duplicates, s.alerts)),
        f"{s.events_per_second:,.0f}",
    )
    console.print(table)
    for kind, count in sorted(s.alerts_by_type.items()):
        console.print(f"  {kind}: {count}")
    console.print(f"alerts -> {output}; rejects -> {rejects or output.with_name(output.name + '.rejects.ndjson')}")


@bench_app.command("detection")
def bench_detection_command(
    seeds: Annotated[str, typer.Option(help="Comma-separated simulation seeds.")] = "1,2,3,4,5",
    days: Annotated[int, typer.Option(help="Days per simulated stream.")] = 150,
    warmup: Annotated[int, typer.Option(help="Warm-up days not scored.")] = 60,
) -> None:
    """Detection quality on labelled simulated streams, beside EARS C2 on the same counts."""
    from synthwatch.bench.detection import bench_detection

    bench_detection(console, tuple(int(s) for s in seeds.split(",")), days, warmup)


@bench_app.command("backtest")
def bench_backtest_command(
    days: Annotated[int, typer.Option(help="Days of simulated reports.")] = 365,
    seed: Annotated[int, typer.Option(help="Simulation seed.")] = 1,
    small_lines: Annotated[
        int, typer.Option(min=1, help="Lines of the short file (the stream's first lines).")
    ] = 30_000,
    python: Annotated[
        list[str] | None,
        typer.Option(help="Another checkout's interpreter, run alternately: OTHER/.venv/bin/python (repeatable)."),
    ] = None,
    rounds: Annotated[int, typer.Option(min=1, help="Alternating rounds, with --python.")] = 3,
) -> None:
    """Lines/s of the whole `synthwatch backtest` command (start-up included) on a simulated year and on its first
    30,000 lines, beside the in-process detection loop in the same run; with --python, against other checkouts,
    alternating, with medians and ratios."""
    from synthwatch.bench.throughput import bench_backtest

    bench_backtest(console, days=days, seed=seed, small_lines=small_lines, others=python or (), rounds=rounds)


@bench_app.command("core")
def bench_core_command(
    days: Annotated[int, typer.Option(help="Days of simulated reports.")] = 365,
    seed: Annotated[int, typer.Option(help="Simulation seed.")] = 1,
    rounds: Annotated[int, typer.Option(min=1, help="Rounds, each pure then compiled.")] = 3,
) -> None:
    """The detector core's CPU compiled (mypyc) against pure Python, alternating in fresh processes; the same
    alerts required."""
    from synthwatch.bench.core import bench_core

    bench_core(console, days=days, seed=seed, rounds=rounds)


@bench_app.command("delivery")
def bench_delivery_command(
    runs: Annotated[int, typer.Option(min=1, help="Lab reports to time (after one warm-up).")] = 20,
) -> None:
    """A new nitazene in Bamako: publish -> the French officer's webhook, p50/p99 (target 5 s)."""
    from synthwatch.bench.delivery import bench_delivery

    bench_delivery(console, runs=runs)


@bench_app.command("delivery-hung")
def bench_delivery_hung_command(
    healthy: Annotated[int, typer.Option(min=1, help="Healthy receivers (one officer each).")] = 4,
    alerts: Annotated[int, typer.Option(min=1, help="Alerts, each to every officer.")] = 300,
    hang: Annotated[float, typer.Option(help="The hung receiver answers after this many seconds.")] = 30.0,
    timeout: Annotated[float, typer.Option(help="Webhook timeout (s).")] = 10.0,
    unlimited: Annotated[bool, typer.Option(help="Also run without per-endpoint limit and breaker.")] = True,
) -> None:
    """One receiver hung, others healthy: the healthy officers' p50/p99 delivery latency (bar: p99 < 2 s)."""
    from synthwatch.bench.delivery import bench_hung_receiver

    bench_hung_receiver(
        console, healthy=healthy, alerts=alerts, hang_s=hang, timeout_s=timeout, with_unlimited=unlimited
    )


@bench_app.command("ready")
def bench_ready_command(
    runs: Annotated[int, typer.Option(min=1, help="Workers started per interpreter, one after another.")] = 5,
    python: Annotated[
        list[str] | None, typer.Option(help="Another interpreter to compare, e.g. OTHER/.venv/bin/python (repeatable).")
    ] = None,
) -> None:
    """Worker start-up to ready (target 3 s): median from process start and by the worker's own count."""
    from synthwatch.bench.ready import bench_ready

    bench_ready(console, runs, python or ())


@bench_app.command("sink")
def bench_sink_command(
    events: Annotated[int, typer.Option(help="Reports stored from an in-memory batch source.")] = 200_000,
) -> None:
    """ClickHouseSink.store_events rows/s into a fresh embedded engine (pre-check of ids included)."""
    from synthwatch.bench.storage import bench_sink

    bench_sink(console, events=events)


@bench_app.command("ingest")
def bench_ingest_command(
    events: Annotated[int, typer.Option(help="Reports in the simulated NDJSON history.")] = 200_000,
) -> None:
    """ingest-history rows/s from NDJSON into a fresh embedded engine."""
    from synthwatch.bench.storage import bench_ingest

    bench_ingest(console, events=events)


@bench_app.command("pipeline")
def bench_pipeline_command(
    events: Annotated[int, typer.Option(help="Events for the throughput phases.")] = 100_000,
    latency_seconds: Annotated[int, typer.Option(help="Seconds of steady load for alert latency.")] = 20,
    rss_events: Annotated[int, typer.Option(help="Events before the worker's RSS is read.")] = 1_000_000,
    scale_out: Annotated[bool, typer.Option(help="Also run two workers on one broker.")] = True,
) -> None:
    """The whole pipeline: transport and framework references, end to end, latency, start-up, RSS."""
    from synthwatch.bench.pipeline import bench_pipeline

    bench_pipeline(console, events=events, latency_seconds=latency_seconds, rss_events=rss_events, scale_out=scale_out)


@bench_app.command("publish")
def bench_publish(
    events: Annotated[int, typer.Option(help="Events per producer.")] = 100_000,
) -> None:
    """kafka-python publisher (with validation) vs aiokafka's producer, same broker, same run."""
    from synthwatch.bench.throughput import bench_publish as run

    run(events=events, console=console)


#: Set by a command once all it does is written and closed and its processes are joined (only ``backtest``): then
#: :func:`main` ends the process (``os._exit``) after the exit work (exit handlers, standard streams flushed) instead
#: of through the interpreter's teardown, which freed the reader's heap, RDKit and numpy object by object and
#: collected it: 0.07-0.1 s of every backtest (a fifth of its start-up's 0.49 s).
_TEARDOWN_SKIPPABLE = threading.Event()


def main() -> None:
    _TEARDOWN_SKIPPABLE.clear()
    try:
        app()
    except SystemExit as done:
        if done.code in (0, None) and _TEARDOWN_SKIPPABLE.is_set():
            _end_without_teardown()  # returns only where the usual exit must run
        raise


def _end_without_teardown() -> None:
    """End the process as the usual exit would, less the teardown: what anything registered for the exit still runs
    (multiprocessing joins its children and runs its finalizers, logging flushes and closes its handlers, temporary
    directories are removed, coverage saves its data), then the standard streams are flushed."""
    main_thread = threading.main_thread()
    if any(t is not main_thread and not t.daemon and t.is_alive() for t in threading.enumerate()):
        return  # the usual exit waits for them first (a process pool's thread joins its processes)
    atexit._run_exitfuncs()  # each handler once: the list is emptied, so the usual exit would not run them again
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:  # None: the descriptor was closed at start (``>&-``); Rich printed to nowhere
                stream.flush()
    except (OSError, ValueError):  # a closed pipe: leave it to the usual exit, which reports it
        return
    os._exit(0)


if __name__ == "__main__":
    main()
