"""Running a worker process, alone (``synthwatch worker``) or with its own broker (``synthwatch up``)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import faulthandler
import fcntl
import gc
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from types import FrameType
from typing import IO, TYPE_CHECKING, Any, cast

import faust

from synthwatch.errors import SynthwatchError
from synthwatch.redaction import install_log_redaction, private_dir, redact
from synthwatch.settings import Settings
from synthwatch.stack.broker import (
    EmbeddedBroker,
    ensure_topics,
    free_port,
    is_our_broker,
    process_command_line,
    stop_process,
)
from synthwatch.stack.drain import DrainingWorker, DrainOutcome, describe_lag, final_count
from synthwatch.stack.service_worker import ServiceWorker
from synthwatch.stackfile import StackInfo, new_web_token, read_stack, remove_stack, write_stack
from synthwatch.stream_apps.runtime.transport import stored_uncommitted, unmarked
from synthwatch.stream_apps.storage.clickhouse import Migration, OpeningClient, database_of, release_embedded_engine

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client

    from synthwatch.stack.engine import EngineProcess

log = logging.getLogger("synthwatch.stack")


class StackError(SynthwatchError, RuntimeError):
    """The stack cannot start as configured; the message says what to do instead."""


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
    drain: bool = False,
) -> DrainOutcome | None:
    """Open ClickHouse, apply migrations, run the Faust worker until SIGINT/SIGTERM.

    ClickHouse opens and migrates in a thread (:class:`OpeningClient`), and the rest of the start-up that
    processing needs but building the app does not is done in another (:class:`JoinWaitWork`), while the
    worker waits for its group join (:func:`start_at_join`); the worker is ready only once all are done
    (:mod:`.recovery`), and stops with the error of either if it failed. This process owns the ClickHouse
    client for its lifetime; other commands reach the data through its ``/sql`` endpoint, found through
    ``DATA_DIR/stack.json``. ``drain`` (``synthwatch up``): the first stop signal waits until everything
    consumed is stored (:mod:`.drain`); returns how it went.
    """
    started_at = time.monotonic() if started_at is None else started_at
    install_log_redaction()
    private_dir(settings.data_dir)

    def migrated(applied: list[Migration]) -> None:
        if applied:
            announce(f"ClickHouse: applied migrations {', '.join(f'{m.version:04d}_{m.name}' for m in applied)}")

    engine = _engine_process(settings)
    if engine is not None:
        settings = settings.model_copy(update={"clickhouse_url": engine.url(database_of(settings))})
        announce(f"ClickHouse: the embedded engine in a process of its own (pid {engine.pid}, 127.0.0.1:{engine.port})")
    # Started when the group join begins (_run_worker): while the worker waits for the broker, not while it starts.
    client = OpeningClient(settings, apply_migrations=settings.migrate_on_start, on_migrated=migrated, start=False)
    prepare = JoinWaitWork()
    try:
        return _run_worker(
            settings,
            bootstrap_servers,
            client,
            prepare,
            started_at,
            loglevel,
            announce,
            broker_pid=broker_pid,
            drain=drain,
        )
    except BaseException:
        # The worker stopped because ClickHouse could not be opened, or its start-up work failed: that is the error.
        failed = client.failed() or prepare.failed()
        if failed is not None:
            raise failed from None
        raise
    finally:
        prepare.join()
        client.close()
        # The engine's life in this process ends with the worker's: `up` frees the data directory next, and the
        # next `up` must find the engine's directory free too.
        release_embedded_engine()
        if engine is not None:
            engine.stop()
        gc.enable()  # off while the process started (`synthwatch worker`); on again in the join wait, or here


def _engine_process(settings: Settings) -> EngineProcess | None:
    """The engine's own process, started (it opens while the worker starts), when ``clickhouse_engine_process``
    asks for it and the engine is the embedded one; None otherwise. Tied to this process: a worker killed
    hard leaves no process holding the engine's directory."""
    if not (settings.clickhouse_engine_process and settings.clickhouse_is_embedded):
        return None
    from synthwatch.stack.engine import EngineProcess

    private_dir(settings.embedded_clickhouse_path)
    return EngineProcess(
        settings.embedded_clickhouse_path,
        settings.data_dir / "engine.log",
        tied_to_parent=True,
        max_requests=settings.clickhouse_engine_max_requests,
    ).start()


def _run_worker(
    settings: Settings,
    bootstrap_servers: str,
    client: OpeningClient,
    prepare: JoinWaitWork,
    started_at: float,
    loglevel: str,
    announce: Callable[[str], None],
    *,
    broker_pid: int | None,
    drain: bool,
) -> DrainOutcome | None:
    from synthwatch.catalogue import shipped_catalogue
    from synthwatch.schemas.envelope import EnvelopeVerifier, OrgKeysError
    from synthwatch.stream_apps.app import WorkerContext, create_app
    from synthwatch.stream_apps.detect.identity import SubstanceResolver
    from synthwatch.stream_apps.detect.intake import Intake
    from synthwatch.stream_apps.detect.novelty import NoveltyDetector
    from synthwatch.stream_apps.detect.region import DetectionConfig, RegionDetector
    from synthwatch.stream_apps.runtime.metrics import WorkerMetrics
    from synthwatch.stream_apps.runtime.worker_signature import WorkerKeyError
    from synthwatch.stream_apps.storage.sink import ClickHouseSink

    if settings.event_loop == "uvloop":
        import mode.loop

        mode.loop.use("uvloop")  # before Faust creates its loop
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID` prints every stack
    web_port = web_port_for(settings)
    # The address other commands on this machine use: loopback even when the port listens on every interface.
    local_host = "127.0.0.1" if settings.web_host in ("0.0.0.0", "", "::") else settings.web_host
    web_url = f"http://{local_host}:{web_port}"
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
        announce(f"Worker ready in {seconds:.1f} s (Kafka {redact(bootstrap_servers)}, HTTP {web_url})")

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
            "point it at the organisation keys file (docs/security.md#kafka-authentication)"
        )
    # The catalogue is indexed in the join wait (prepare), before the resolver's first use: the agents and the
    # recovery that use it wait until the worker is ready, which waits for that work.
    resolver = SubstanceResolver(
        catalogue=(),
        corroboration=settings.learnt_name_reporters,
        name_horizon_days=settings.name_link_horizon_days,
    )
    prepare.add(lambda: resolver.add_catalogue(shipped_catalogue()))
    prepare.add(lambda: settle_start_up_objects(freeze=settings.gc_freeze))
    ctx = WorkerContext(
        settings=settings,
        client=cast("Client", client),  # used as the client it becomes (every use waits for it)
        sink=ClickHouseSink(cast("Client", client)),
        intake=Intake(resolver, verifier=verifier, limits=settings.record_limits()),
        metrics=WorkerMetrics(app_id=settings.app_id),
        regions=RegionDetector(DetectionConfig.from_settings(settings)),
        novelty=NoveltyDetector(DetectionConfig.from_settings(settings).novelty),
        started_at=started_at,
        on_ready=on_ready,
        web_token=new_web_token(settings),
        storage_opened=client.opened,
        prepared=prepare.done,
    )
    try:
        app = create_app(ctx, bootstrap_servers, web_port)
    except WorkerKeyError as error:  # not hex of 16+ bytes (the example's CHANGE-ME), or none for several workers
        raise SystemExit(str(error)) from error
    worker: faust.Worker
    if drain:
        worker = DrainingWorker(
            app,
            loglevel=loglevel,
            settings=settings,
            bootstrap_servers=bootstrap_servers,
            announce=announce,
            **_WORKER_OPTIONS,
        )
    else:
        worker = faust_worker(app, loglevel)
    worker.spinner = None
    start_at_join(app, client.start, prepare.start)
    # The threads that write to ClickHouse (asyncio.to_thread): a stop cancels the coroutines waiting for them
    # but not the writes, and the loop's close does not wait for them; the count after a drain does.
    writers = concurrent.futures.ThreadPoolExecutor(thread_name_prefix="asyncio")
    worker.loop.set_default_executor(writers)
    try:
        with unmarked(app):  # Faust's web server adds its own views when it starts: no discovery marks either
            worker.execute_from_commandline()
    except SystemExit as stopped:
        if not isinstance(worker, DrainingWorker) or stopped.code not in (None, 0):
            raise
        # The worker is down, and once the writes a stop left running have ended, what it stored and could not
        # commit is final (for final_count).
        writers.shutdown(wait=True)
        stored = stored_uncommitted(app.consumer)
        if stored:
            log.warning(
                "stored but not committed at stop (not counted as lost): %s",
                {f"{topic}[{partition}]": len(offsets) for (topic, partition), offsets in sorted(stored.items())},
            )
        return replace(worker.outcome, stored_uncommitted=stored)
    finally:
        remove_stack(settings, pid)


def start_at_join(app: faust.App, *starts: Callable[[], None]) -> None:
    """Start the start-up work left for the join wait (opening ClickHouse, :class:`JoinWaitWork`) when the
    consumer begins its first group join (Faust's first revocation).

    Why then: the broker holds the JoinGroup (Tansu: half the session timeout, 2 s), and the opening (the
    clickhouse-connect and chDB imports, the engine, the migrations: ~1 s) and the rest (~0.15 s) fit in that
    wait. Started before the Faust worker, the opening shared the interpreter's lock with Faust's start-up,
    which is on the path to the join (0.3 s from worker start to JoinGroup instead of 0.1 s). Each ``start``
    only starts a thread (the JoinGroup is sent once this returns); later rebalances find them started.
    """

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]  # mode's stub wants a keyword-only signal
    async def start_join_wait_work(sender: Any, *args: Any, **kwargs: Any) -> None:
        for start in starts:
            start()


class JoinWaitWork:
    """Start-up work the worker's processing needs but building its app does not, done in a thread of its
    own while the consumer waits for its first group join; the worker is ready only after it.

    Why: until the join begins the worker's start-up is one thread's CPU time (imports, building the app),
    on the path to ready; the broker then holds the join ~2 s while the process mostly waits. Work moved
    there leaves that path (docs/performance.md, "Worker ready: the join wait takes more"). :meth:`done`
    waits for it and raises what a step raised; :meth:`failed` says it once over.
    """

    def __init__(self) -> None:
        self._steps: list[Callable[[], object]] = []
        self._future: concurrent.futures.Future[None] = concurrent.futures.Future()
        # Running from the start, so that a stop cancelling the tasks that await it cannot cancel it (as
        # OpeningClient's future, whose comment says what that did).
        self._future.set_running_or_notify_cancel()
        self._thread = threading.Thread(target=self._run, name="join-wait-work", daemon=True)

    def add(self, step: Callable[[], object]) -> None:
        """Run ``step`` in the thread, after the ones added before (before :meth:`start`)."""
        if self._thread.ident is not None:
            raise RuntimeError("join-wait work added after it started")
        self._steps.append(step)

    def start(self) -> None:
        """Start the steps (later calls do nothing)."""
        if self._thread.ident is None:
            self._thread.start()

    def _run(self) -> None:
        try:
            for step in self._steps:
                step()
        except BaseException as error:  # handed to whoever waits for it (in the worker: recovery, which stops it)
            self._future.set_exception(error)
        else:
            self._future.set_result(None)

    async def done(self) -> None:
        """Wait until every step ran, without blocking the event loop; raises what a step raised."""
        await asyncio.wrap_future(self._future)

    def failed(self) -> BaseException | None:
        """What a step raised, once the work is over; None while it runs or when it worked."""
        return self._future.exception() if self._future.done() else None

    def join(self) -> None:
        """Wait for the thread, if it started (a worker stopped during the join wait)."""
        if self._thread.ident is not None:
            self._thread.join()


def settle_start_up_objects(freeze: bool) -> None:
    """Collect once what start-up left, move the rest out of the collector's sight if ``freeze``
    (``SYNTHWATCH_GC_FREEZE``), and turn automatic collection on again (`synthwatch worker` starts with it off).

    Why in the join wait: start-up makes ~100,000 objects that live as long as the worker; the automatic
    collections that walked them while it started cost ~35 ms before its join, and the full collection at
    ready (:func:`~synthwatch.stream_apps.runtime.recovery.freeze_long_lived_objects`) ~40 ms after it. With
    these frozen here, that one walks only what was made since.
    """
    gc.collect()
    if freeze:
        gc.freeze()
    gc.enable()


#: A worker for a service: no banner, standard streams left alone.
_WORKER_OPTIONS: dict[str, Any] = {"quiet": True, "redirect_stdouts": False}


def faust_worker(app: faust.App, loglevel: str | int) -> faust.Worker:
    """Faust's worker for a service: no terminal spinner, no idle second at its stop (:class:`ServiceWorker`).

    Faust's spinner sets the root logger to DEBUG at WARNING and above (so that it spins on every
    record): every debug call of aiokafka and Faust then built a LogRecord, ~8 % of the event loop.
    """
    worker = ServiceWorker(app, loglevel=loglevel, **_WORKER_OPTIONS)
    worker.spinner = None
    return worker


def web_port_for(settings: Settings) -> int:
    """The worker's HTTP port: the configured one if it is free (else a StackError naming the setting),
    or a free one when the setting is 0."""
    if settings.web_port == 0:
        return free_port(settings.web_host)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the web server binds it
        try:
            sock.bind((settings.web_host, settings.web_port))
        except OSError as error:
            why = "is in use" if error.errno == errno.EADDRINUSE else f"cannot be used ({error.strerror})"
            raise StackError(
                f"the worker's HTTP port {settings.web_host}:{settings.web_port} {why}; set SYNTHWATCH_WEB_PORT "
                "to a free port, or to 0 to pick one"
            ) from None
    return settings.web_port


def _is_synthwatch(pid: int) -> bool:
    argv = process_command_line(pid)
    return argv is not None and any("synthwatch" in part for part in argv)


def _running_message(settings: Settings, info: StackInfo | None) -> str:
    if info is None:
        return f"a stack is already running for {settings.data_dir} (starting up); stop it first"
    broker = f"broker {info.bootstrap_servers}" + (f" (pid {info.broker_pid})" if info.broker_pid else "")
    return (
        f"a stack is already running, pid {info.pid}, {broker}, data {settings.data_dir}; stop it first "
        f"(Ctrl-C in its terminal or `kill {info.pid}`), or start this one with another SYNTHWATCH_DATA_DIR"
    )


def claim_data_dir(settings: Settings, announce: Callable[[str], None]) -> IO[str]:
    """Make this process the only stack on ``data_dir``; returns the lock (held while it stays open).

    Another ``up`` (or a ``worker``) running on the directory: StackError with its pid and broker. A
    broker left running by an ``up`` that was killed before brokers died with it: stopped, once its
    command line shows it is the Tansu broker that ``up`` recorded.
    """
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    lock = open(settings.data_dir / "up.lock", "a+", encoding="utf-8")  # noqa: SIM115 - held for the life of `up`
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise StackError(_running_message(settings, read_stack(settings))) from None
    info = read_stack(settings, require_alive=False)
    if info is not None and info.pid != os.getpid():
        if _is_synthwatch(info.pid):
            lock.close()
            raise StackError(_running_message(settings, info))
        if info.broker_pid and is_our_broker(info.broker_pid, info.bootstrap_servers):
            stop_process(info.broker_pid)
            announce(
                f"Stopped the broker (pid {info.broker_pid}, {info.bootstrap_servers}) an earlier `synthwatch up` "
                f"(pid {info.pid}) left running."
            )
        with contextlib.suppress(FileNotFoundError):
            (settings.data_dir / "stack.json").unlink()
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def run_embedded_stack(
    settings: Settings, *, loglevel: str = "warning", announce: Callable[[str], None] = print
) -> DrainOutcome | None:
    """``synthwatch up``: Tansu on a free port, the topics, and a worker; stops all on Ctrl-C/SIGTERM.

    The broker keeps records in memory only, so the first stop signal drains (:mod:`.drain`) and the
    broker dies with this process however it ends. Returns how the drain went (None: stopped before
    the worker ran).
    """
    started_at = time.monotonic()
    # Until Faust installs its own handlers, SIGTERM/SIGHUP must unwind through `finally` to stop the broker.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    signal.signal(signal.SIGHUP, _raise_keyboard_interrupt)
    private_dir(settings.data_dir)
    lock = claim_data_dir(settings, announce)
    announce(f"Data directory: {settings.data_dir}")
    if settings.web_port != 0:
        web_port_for(settings)  # a configured port that is taken: said before anything starts
    broker = EmbeddedBroker(settings, log_path=settings.data_dir / "tansu.log", tied_to_parent=True)
    broker.start()
    outcome = None
    try:
        # Port 0: picked only now that the broker listens. Picked before, the port just released was free for the
        # broker's own pick, and a test saw the worker's web port taken by this broker.
        settings = settings.model_copy(update={"web_port": web_port_for(settings)})
        broker_pid = broker.process.pid if broker.process else None
        announce(f"Broker: Tansu on {broker.bootstrap_servers} (pid {broker_pid}; events in memory only)")
        write_stack(  # now: a later `up` finds this broker even if this process dies before the worker is ready
            settings,
            StackInfo(
                pid=os.getpid(),
                bootstrap_servers=broker.bootstrap_servers,
                web_url=f"http://{settings.web_host}:{settings.web_port}",
                clickhouse_url=settings.resolved_clickhouse_url,
                started_at=datetime.now(UTC).isoformat(),
                broker_pid=broker_pid,
            ),
        )
        created = ensure_topics(settings, broker.bootstrap_servers)
        announce(f"Topics: {', '.join(settings.all_topics)} ({settings.partitions} partitions; created {len(created)})")
        outcome = run_worker(
            settings,
            broker.bootstrap_servers,
            started_at=started_at,
            loglevel=loglevel,
            announce=announce,
            broker_pid=broker_pid,
            drain=True,
        )
        if outcome is not None:  # the worker ran: count what it left, while the broker still knows
            outcome = final_count(settings, broker.bootstrap_servers, outcome)
            if not outcome.drained:
                log.warning("stopped with records not stored (%s): %s", outcome.reason, outcome.not_stored)
                lost = "an unknown number of" if outcome.lost is None else f"{outcome.lost:,}"
                announce(
                    f"Not stored: {lost} records"
                    + (f": {describe_lag(settings, outcome.not_stored)}" if outcome.not_stored else "")
                )
    except KeyboardInterrupt:
        pass
    finally:
        broker.stop()
        remove_stack(settings, os.getpid())
        announce("Stopped: broker and worker are down.")
        lock.close()
    return outcome
