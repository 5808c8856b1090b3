"""Shared fixtures: one real Tansu broker and one embedded ClickHouse engine per pytest process.

chDB allows one engine per process, so every test that needs ClickHouse in this process gets its own
*database* on the session's engine. Integration tests run the worker as a real child process (it owns
its own engine directory) and read its data through its HTTP ``/sql`` endpoint, as the CLI does.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from synthwatch.settings import Settings
from synthwatch.stack.broker import EmbeddedBroker, ensure_topics
from synthwatch.stack.engine import EngineProcess
from synthwatch.stack.process import StackProcess, StackProcessError, stop_child
from synthwatch.stackfile import StackInfo
from synthwatch.stream_apps.storage.clickhouse import connect, embedded_client, release_embedded_engine
from synthwatch.stream_apps.storage.query import QueryResult, run_query

_db_counter = itertools.count()
TOPICS = ("lab_detections", "border_seizures", "rejects", "alerts", "sightings")


def wait_until(
    predicate: Callable[[], Any],
    timeout: float,
    what: str,
    interval: float = 0.2,
    details: Callable[[], str] | None = None,
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test with ``what`` otherwise.

    ``details`` is called on a timeout to say what the system was doing (a worker's counters and log),
    so a failure in CI can be understood without re-running it.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    context = ""
    if details is not None:
        try:
            context = "\n" + details()
        except Exception as error:  # the diagnosis must not hide the timeout
            context = f"\n(could not describe the state: {error!r})"
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what} (last value: {last!r}){context}")


@pytest.fixture(scope="session")
def broker() -> Iterator[EmbeddedBroker]:
    """A real Tansu broker for the whole session."""
    with EmbeddedBroker(Settings()) as running:
        yield running


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    """A Tansu broker for one test: heavy tests do not load the session broker, and its log is at hand."""
    with EmbeddedBroker(Settings(), log_path=tmp_path / "tansu.log") as running:
        yield running


@pytest.fixture(scope="session")
def engine_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The session's engine directory, its engine held up for the whole session.

    chDB stops its engine when the process's last handle closes and restarts it on the next connect, leaking
    ~5 threads and ~8 descriptors each time (chDB 26.9); the product's hold (``embedded_client``) is taken here
    at once and given up at the end. A test on another directory moves the hold there (chDB hosts one engine
    path per process) and the next test here takes it back.
    """
    path = tmp_path_factory.mktemp("chdb")
    embedded_client(Settings(data_dir=path).resolved_clickhouse_url).close()
    try:
        yield path
    finally:
        release_embedded_engine()


@pytest.fixture
def ch_settings(engine_dir: Path, request: pytest.FixtureRequest) -> Settings:
    """Settings pointing at the session's engine with a database of this test's own."""
    name = re.sub(r"[^a-z0-9_]", "_", request.node.name.lower())[:40]
    return Settings(data_dir=engine_dir, clickhouse_database=f"t{next(_db_counter)}_{name}")


@pytest.fixture
def ch(ch_settings: Settings) -> Iterator[Any]:
    """A clickhouse-connect client on the embedded engine, in a fresh database."""
    client = connect(ch_settings)
    try:
        yield client
    finally:
        client.command(f"DROP DATABASE IF EXISTS {ch_settings.clickhouse_database}")
        client.close()


def cli_env(settings: Settings, **extra: str) -> dict[str, str]:
    """Environment for a child ``synthwatch`` process with these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNTHWATCH_")}
    env["SYNTHWATCH_DATA_DIR"] = str(settings.data_dir)
    for field in settings.model_fields_set:  # every setting given explicitly, none forgotten
        value = getattr(settings, field)
        if isinstance(value, SecretStr):
            value = value.get_secret_value()  # str() of a SecretStr is asterisks
        if value is not None:
            env[f"SYNTHWATCH_{field.upper()}"] = str(value)

    env.update(extra)
    return env


def run_cli(
    settings: Settings, *args: str, timeout: float = 120, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "synthwatch.cli.main", *args],
        env=cli_env(settings),  # no COLUMNS: piped output must not depend on a width
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
    )


@dataclass
class RunningWorker:
    settings: Settings
    process: subprocess.Popen[bytes]
    info: StackInfo
    log_path: Path

    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> QueryResult:
        return run_query(self.settings, sql, parameters)

    def wait_rows(
        self, sql: str, parameters: dict[str, Any], n: int, what: str, timeout: float = 60
    ) -> list[dict[str, Any]]:
        """Poll a query until it returns exactly ``n`` rows; returns them as dicts."""

        def rows() -> list[dict[str, Any]] | None:
            found = self.query(sql, parameters).as_dicts()
            return found if len(found) == n else None

        return wait_until(rows, timeout, what)  # type: ignore[no-any-return]

    def stats(self) -> dict[str, Any]:
        """The worker's own counters (GET /ready): consumed, stored, rejected, late, alerts...

        The body carries them whether the worker is ready (200) or not (503: recovering, or the watchdog
        reports a stall, which tests that care read from ``ready``/``stalled``)."""
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(f"{self.info.web_url}/ready", timeout=10) as response:
                return json.loads(response.read())  # type: ignore[no-any-return]
        except urllib.error.HTTPError as error:
            if error.code != 503:
                raise
            return json.loads(error.read())  # type: ignore[no-any-return]

    def count(self, sql: str, parameters: dict[str, Any] | None = None) -> int:
        return int(self.query(sql, parameters).rows[0][0])

    def describe(self, log_lines: int = 60) -> str:
        """The worker's counters and the end of its log, for a failure message."""
        alive = "running" if self.process.poll() is None else f"exited with {self.process.returncode}"
        try:
            stats = json.dumps(self.stats(), sort_keys=True)
        except Exception as error:
            stats = f"(no /ready: {error!r})"
        tail = self.log_path.read_text(errors="replace").splitlines()[-log_lines:]
        return f"worker {alive}; counters {stats}\nlast {len(tail)} log lines:\n" + "\n".join(tail)


def start_worker(
    settings: Settings, log_path: Path, command: str = "worker", module: tuple[str, ...] = ("synthwatch.cli.main",)
) -> RunningWorker:
    """Start ``synthwatch worker`` (or ``up``) as a child process and wait until it is ready.

    ``module``: the module to run and its first arguments, for a worker with a fault injected (tests/support).
    """
    child = StackProcess(
        [sys.executable, "-m", *module, command, "--loglevel", "info"],
        log_path,
        # a module of tests.support is importable from the repository
        cwd=None if module == ("synthwatch.cli.main",) else Path(__file__).resolve().parent.parent,
        env=cli_env(settings),
        settings=settings,
        what=f"`synthwatch {command}`",
        tail=3000,
    ).start()

    def ready() -> StackInfo | None:
        try:
            return child.ready_info()
        except StackProcessError as error:  # it exited: fail now, with its log
            pytest.fail(str(error))

    info = wait_until(ready, 90, f"`synthwatch {command}` to become ready")
    print(f"\n[{command}] ready in {info.ready_seconds:.2f} s")
    return RunningWorker(settings, child.process, info, log_path)


def stop_worker(worker: RunningWorker, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
    """Stop the worker with ``sig`` (SIGKILL after ``timeout`` s); its exit code."""
    return stop_child(worker.process, timeout, sig=sig)


def terminate(process: subprocess.Popen[bytes], timeout: float = 30) -> int:
    """SIGTERM a child process, SIGKILL it if it does not stop in ``timeout`` s; returns its exit code."""
    return stop_child(process, timeout)


@contextlib.contextmanager
def engine_over_http(data_dir: Path, log_path: Path) -> Iterator[EngineProcess]:
    """The embedded engine answering ClickHouse's HTTP interface from a process of its own (the shipped
    :mod:`synthwatch.stack.engine`); yields it: ``engine.url(database)`` holds its password.

    A process of its own because chDB allows one engine per process (see DEVELOPERS.md).
    """
    with EngineProcess(data_dir, log_path) as engine:
        yield engine


def isolated_settings(broker: EmbeddedBroker, data_dir: Path, **overrides: Any) -> Settings:
    """Settings for a worker of its own on the shared broker: its own group, topics and data dir.

    Workers sharing the session broker must not share a topic: each would read the other's records.
    """
    suffix = uuid.uuid4().hex[:6]
    topics: dict[str, Any] = {f"topic_{name}": f"{name}-{suffix}" for name in TOPICS}
    settings = Settings(
        data_dir=data_dir,
        kafka_bootstrap_servers=broker.bootstrap_servers,
        app_id=f"synthwatch-test-{suffix}",
        web_port=0,
        **{**topics, **overrides},
    )
    ensure_topics(settings, broker.bootstrap_servers)
    return settings


@pytest.fixture(scope="session")
def stack(broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningWorker]:
    """A real worker process on the session broker, with its own embedded ClickHouse."""
    data_dir = tmp_path_factory.mktemp("worker")
    settings = isolated_settings(broker, data_dir)
    worker = start_worker(settings, data_dir / "worker.log")
    try:
        yield worker
    finally:
        stop_worker(worker)


def ndjson(records: list[Any]) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)
