"""Running a worker process, alone (``synthwatch worker``) or with its own broker (``synthwatch up``)."""

from __future__ import annotations

import faulthandler
import os
import signal
import time
from collections.abc import Callable
from datetime import UTC, datetime
from types import FrameType

import faust

from .broker import EmbeddedBroker, ensure_topics, free_port
from .clickhouse import connect, migrate
from .runtime import StackInfo, remove_stack, write_stack
from .settings import Settings


def _raise_keyboard_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_worker(
    settings: Settings,
    bootstrap_servers: str,
    *,
    started_at: float | None = None,
    loglevel: str = "warning",
    announce: Callable[[str], None] = print,
    broker_pid: int | None = None,
) -> None:
    """Open ClickHouse, apply migrations, run the Faust worker until SIGINT/SIGTERM.

    This process owns the ClickHouse client for its lifetime; other commands reach the data through
    its ``/sql`` endpoint, found through ``DATA_DIR/stack.json``.
    """
    from synthwatch.schemas.envelope import EnvelopeVerifier, OrgKeysError
    from synthwatch.stream_apps.app import WorkerContext, create_app
    from synthwatch.stream_apps.clickhouse_sink import ClickHouseSink
    from synthwatch.stream_apps.detection import RegionDetector
    from synthwatch.stream_apps.identity import SubstanceResolver
    from synthwatch.stream_apps.intake import Intake
    from synthwatch.stream_apps.metrics import WorkerMetrics
    from synthwatch.stream_apps.novelty import NoveltyDetector

    started_at = time.monotonic() if started_at is None else started_at
    if settings.event_loop == "uvloop":
        import mode.loop

        mode.loop.use("uvloop")  # before Faust creates its loop
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID` prints every stack
    client = connect(settings)
    if settings.migrate_on_start:
        applied = migrate(client)
        if applied:
            announce(f"ClickHouse: applied migrations {', '.join(f'{m.version:04d}_{m.name}' for m in applied)}")

    web_port = settings.web_port or free_port(settings.web_host)
    web_url = f"http://{settings.web_host}:{web_port}"
    pid = os.getpid()

    def on_ready(seconds: float) -> None:
        write_stack(
            settings,
            StackInfo(
                pid=pid,
                bootstrap_servers=bootstrap_servers,
                web_url=web_url,
                clickhouse_url=settings.resolved_clickhouse_url,
                started_at=datetime.now(UTC).isoformat(),
                ready_seconds=round(seconds, 3),
                broker_pid=broker_pid,
            ),
        )
        announce(f"Worker ready in {seconds:.1f} s (Kafka {bootstrap_servers}, HTTP {web_url})")

    verifier = None
    if settings.org_keys_file is not None:
        try:
            verifier = EnvelopeVerifier.from_file(settings.org_keys_file, required=settings.signed_reports_required)
        except OrgKeysError as error:
            raise SystemExit(f"SYNTHWATCH_ORG_KEYS_FILE: {error}") from error
        announce(
            f"Signed reports: {len(verifier.orgs)} organisations from {settings.org_keys_file}; "
            + ("unsigned records are rejected" if verifier.required else "unsigned records are accepted")
        )
    elif settings.signed_reports_required:
        raise SystemExit(
            "SYNTHWATCH_REQUIRE_SIGNED_REPORTS is on but SYNTHWATCH_ORG_KEYS_FILE is not set: "
            "point it at the organisation keys file (docs/security-kafka.md)"
        )
    resolver = SubstanceResolver(corroboration=settings.learnt_name_reporters)
    ctx = WorkerContext(
        settings=settings,
        client=client,
        sink=ClickHouseSink(client),
        intake=Intake(resolver, verifier=verifier),
        metrics=WorkerMetrics(app_id=settings.app_id),
        regions=RegionDetector(settings.detection_config()),
        novelty=NoveltyDetector(settings.detection_config().novelty),
        started_at=started_at,
        on_ready=on_ready,
    )
    app = create_app(ctx, bootstrap_servers, web_port)
    worker = faust_worker(app, loglevel)
    try:
        worker.execute_from_commandline()
    finally:
        remove_stack(settings, pid)
        client.close()


def faust_worker(app: faust.App, loglevel: str | int) -> faust.Worker:
    """Faust's worker for a service: no terminal spinner.

    Faust's spinner sets the root logger to DEBUG at WARNING and above (so that it spins on every
    record): every debug call of aiokafka and Faust then built a LogRecord, ~8 % of the event loop.
    """
    worker = faust.Worker(app, loglevel=loglevel, quiet=True, redirect_stdouts=False)
    worker.spinner = None
    return worker


def run_embedded_stack(
    settings: Settings, *, loglevel: str = "warning", announce: Callable[[str], None] = print
) -> None:
    """``synthwatch up``: Tansu on a free port, the topics, and a worker; stops all on Ctrl-C/SIGTERM."""
    started_at = time.monotonic()
    # Until Faust installs its own handlers, SIGTERM must unwind through `finally` to stop the broker.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    broker = EmbeddedBroker(settings, log_path=settings.data_dir / "tansu.log")
    broker.start()
    try:
        announce(f"Broker: Tansu on {broker.bootstrap_servers} (pid {broker.process.pid if broker.process else '?'})")
        created = ensure_topics(settings, broker.bootstrap_servers)
        announce(f"Topics: {', '.join(settings.all_topics)} ({settings.partitions} partitions; created {len(created)})")
        run_worker(
            settings,
            broker.bootstrap_servers,
            started_at=started_at,
            loglevel=loglevel,
            announce=announce,
            broker_pid=broker.process.pid if broker.process else None,
        )
    except KeyboardInterrupt:
        pass
    finally:
        broker.stop()
        announce("Stopped: broker and worker are down.")
