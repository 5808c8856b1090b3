"""Opening ClickHouse (embedded chDB or a server) and applying the versioned schema migrations.

The same clickhouse-connect client API serves both: ``chdb:///path`` opens the real ClickHouse engine
inside this process (one engine per process, one process per directory), ``http(s)://`` talks to a
server or cluster.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import hashlib
import os
import re
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse, urlunparse

from synthwatch.errors import SynthwatchError
from synthwatch.settings import Settings

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


#: jemalloc options for the embedded engine. chDB links jemalloc statically (a heap of its own, apart
#: from Python's) and reads them from ``JE_MALLOC_CONF`` when it is loaded. Its default,
#: ``dirty_decay_ms:5000``, keeps freed pages resident for seconds: under the sink's inserts (each
#: also feeding four materialized views) 50-150 MiB of freed pages sat in the worker's RSS. Returning
#: them at once (0) cut the most but cost the engine ~65 % more CPU in page faults; 1 s keeps about
#: half the saving for a third of the CPU (``python -m synthwatch.bench.memory``; docs/performance.md).
EMBEDDED_MALLOC_CONF = "dirty_decay_ms:1000"


def prepare_embedded_engine() -> bool:
    """Give chDB's allocator :data:`EMBEDDED_MALLOC_CONF` before chDB is first loaded in this process.

    False when it cannot or should not: chDB is already loaded (its allocator reads its options once
    per process), or ``JE_MALLOC_CONF`` is already set (the operator's choice wins).
    """
    if "chdb" in sys.modules or "JE_MALLOC_CONF" in os.environ:
        return False
    os.environ["JE_MALLOC_CONF"] = EMBEDDED_MALLOC_CONF
    return True


class MigrationError(SynthwatchError, RuntimeError):
    """The database is in a state the migrations cannot safely continue from."""


def database_of(settings: Settings) -> str:
    """Database name: the URL's path for a server, ``clickhouse_database`` for chdb."""
    url = settings.resolved_clickhouse_url
    if url.startswith("chdb:"):
        name = settings.clickhouse_database
    else:
        name = urlparse(url).path.strip("/").split("/")[0] or "default"
    if not _IDENTIFIER.match(name):
        raise ValueError(f"database name {name!r} must be a plain identifier (letters, digits, _)")
    return name


def without_dataframes() -> None:
    """Tell clickhouse-connect that this process passes it no pandas objects, unless pandas is loaded already.

    Why: ``client.insert`` asks whether its rows are a DataFrame, and asking imports pandas (clickhouse-connect
    resolves ``options.pd`` lazily): the worker's first checkpoint paid ~0.2-0.5 CPU s and ~47 MiB of RSS for
    it, inside the backlog it was draining. synthwatch inserts and reads lists and Arrow bytes only; a value of
    a pandas type cannot exist in a process that has not imported pandas, so every check that asks gives the
    same answer. Once set, ``query_df``/``insert_df`` in this process say pandas is not installed: a process
    that wants them imports pandas before its first client.
    """
    from clickhouse_connect.driver import options

    if "pandas" not in sys.modules and "pd" not in vars(options):
        options.pd = None
        options.pd_time_test = None


class _EngineAnchor:
    """One chDB handle on the embedded engine, held open and never used, from the process's first client on it
    until the process ends (or :func:`release_embedded_engine`).

    Why: chDB stops its engine when the last handle in the process closes and starts it again on the next
    connect, and each restart leaves ~5 threads and ~8 descriptors behind (chDB 26.9). A process whose clients
    all close between uses restarted it each time: ``synthwatch report`` (a client per panel's query, each
    opened and closed by :func:`~synthwatch.stream_apps.storage.query.run_query`) went from 44 to 169 threads
    and 26 to 317 descriptors in one run (25 restarts). chDB hosts one engine path per process: a client on
    another path first closes the anchor (the old engine stops once its last client closes, as before).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._location: str | None = None
        self._handle: Any = None

    def leave_other(self, location: str) -> None:
        """Close the anchor if it holds another path: chDB refuses a second path while any handle is open."""
        with self._lock:
            if self._location is not None and self._location != location:
                self._close()

    def hold(self, location: str) -> None:
        """Anchor the engine at ``location`` (a client on it is open: this cannot start a second engine)."""
        with self._lock:
            if self._location == location:
                return
            self._close()
            import chdb

            self._handle = chdb.connect(location)
            self._location = location

    def release(self) -> None:
        """Close the anchor: the engine stops when the process's last client on it closes."""
        with self._lock:
            self._close()

    def _close(self) -> None:
        handle, self._handle, self._location = self._handle, None, None
        if handle is not None:
            handle.close()


_ANCHOR = _EngineAnchor()
atexit.register(_ANCHOR.release)  # the engine shuts down cleanly at exit, as when the last client closed


def _engine_location(url: str) -> str | None:
    """The engine path chDB is given for a ``chdb://`` URL, spelt as clickhouse-connect spells it (chDB compares
    paths literally); None for an engine in memory (its data lives only while a handle is open: not anchored).

    Parsed as clickhouse-connect parses it (``_create_chdb_client``): the netloc, else the path as written, not
    percent-decoded. Decoded, a data directory named ``a%41b`` was held as ``aAb``, a second engine path, which
    chDB refused: every client on it failed.
    """
    parsed = urlparse(url)
    location = parsed.netloc.rpartition("@")[2] if parsed.netloc else parsed.path
    if location in ("", "memory", ":memory:") or location.startswith(("file:", ":memory:")):
        return None
    return os.path.realpath(location)


def embedded_client(url: str, **kwargs: Any) -> Client:
    """``clickhouse_connect.get_client(dsn=url, ...)`` for a ``chdb://`` URL, the engine kept running between clients
    (:class:`_EngineAnchor`): every embedded client of this process is opened here, so chDB's allocator gets
    :data:`EMBEDDED_MALLOC_CONF` whichever client loads it first (the test session's hold is opened here)."""
    import clickhouse_connect

    prepare_embedded_engine()
    location = _engine_location(url)
    if location is not None:
        _ANCHOR.leave_other(location)
    client = clickhouse_connect.get_client(dsn=url, **kwargs)
    if location is not None:
        try:
            _ANCHOR.hold(location)
        except BaseException:
            client.close()
            raise
    return client


def leave_other_embedded_engine(path: str) -> None:
    """Before chDB is opened at ``path`` other than through :func:`embedded_client` (the engine server opens its
    own handles): end this process's hold on another path, which chDB would refuse ``path`` for (one engine path
    per process). The hold on ``path`` itself is kept."""
    _ANCHOR.leave_other(os.path.realpath(path))


def release_embedded_engine() -> None:
    """End this process's hold on the embedded engine: it stops (and frees its directory for another process)
    once this process's clients on it are closed. Called when a process hands its engine over while it goes on
    (a worker stopping inside ``synthwatch up``, before the data directory is released); at exit it is automatic.
    """
    _ANCHOR.release()


@contextmanager
def engine_scratch_directory(prefix: str) -> Iterator[Path]:
    """A temporary directory for this process's embedded engine, removed only after the engine has stopped.

    Why: the engine is held for the process's life (:class:`_EngineAnchor`), so it went on with its background
    merges after the last client closed, and removing the directory under it failed ('Directory not empty:
    tmp_merge_...'; ``python -m synthwatch.bench.memory`` failed so about one run in six). Close the clients
    on it before leaving the block: the hold is released here, and the engine stops with the last client."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        try:
            yield Path(tmp)
        finally:
            release_embedded_engine()


def connect(settings: Settings, database: str | None = None, create: bool = True) -> Client:
    """A client on the configured ClickHouse, with ``database`` (created if missing) as default.

    For ``chdb://`` this opens the embedded engine in this process; a second process cannot open the
    same directory (ask the running ``synthwatch up`` instead: see :mod:`synthwatch.stream_apps.storage.query`).
    """
    import clickhouse_connect  # here, not at the top: a worker imports it in the thread that opens its client

    without_dataframes()
    url = settings.resolved_clickhouse_url
    database = database or database_of(settings)
    if url.startswith("chdb:"):
        prepare_embedded_engine()
        settings.embedded_clickhouse_path.mkdir(parents=True, exist_ok=True)
        if create:
            bootstrap = embedded_client(url)
            try:
                bootstrap.command(f"CREATE DATABASE IF NOT EXISTS {database}")
                return embedded_client(url, database=database)
            finally:
                bootstrap.close()
        return embedded_client(url, database=database)
    parts = urlparse(url)
    if create:
        server = urlunparse(parts._replace(path="/default"))
        bootstrap = clickhouse_connect.get_client(dsn=server)
        try:
            bootstrap.command(f"CREATE DATABASE IF NOT EXISTS {database}")
        finally:
            bootstrap.close()
    return clickhouse_connect.get_client(dsn=urlunparse(parts._replace(path=f"/{database}")))


# --- migrations ---------------------------------------------------------------------------------------

_MIGRATION_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()[:16]

    def statements(self) -> list[str]:
        """The file's statements: split on ``;`` at the end of a line, comments dropped."""
        lines = [line for line in self.sql.splitlines() if not line.strip().startswith("--")]
        return [s.strip() for s in re.split(r";\s*$", "\n".join(lines), flags=re.M) if s.strip()]


def available_migrations(package: str = "synthwatch.migrations") -> list[Migration]:
    """Every numbered SQL file shipped in ``deploy/clickhouse/migrations``, in version order."""
    found = []
    for entry in resources.files(package).iterdir():
        match = _MIGRATION_FILE.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migration files share a version number: {versions}")
    return found


_LEDGER = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version UInt32,
    name String,
    checksum String,
    status Enum8('started' = 1, 'applied' = 2),
    at DateTime64(3, 'UTC') DEFAULT now64(3)
) ENGINE = MergeTree ORDER BY (version, at)
"""


def applied_migrations(client: Client) -> dict[int, tuple[str, str, str]]:
    """version -> (name, checksum, latest status) as recorded in ``schema_migrations``."""
    client.command(_LEDGER)
    rows = client.query(
        # (at, status): a 'started' and its 'applied' in the same millisecond resolve to 'applied'
        "SELECT version, argMax(name, (at, status)), argMax(checksum, (at, status)), "
        "toString(argMax(status, (at, status))) "
        "FROM schema_migrations GROUP BY version ORDER BY version"
    ).result_rows
    return {int(v): (str(n), str(c), str(s)) for v, n, c, s in rows}


def migrate(client: Client, migrations: list[Migration] | None = None) -> list[Migration]:
    """Apply the pending migrations in order; idempotent. Returns the ones applied now.

    Refuses to continue (MigrationError) when a migration was started but never finished, or when an
    applied file was edited afterwards: both need a person to look.
    """
    migrations = available_migrations() if migrations is None else migrations
    ledger = applied_migrations(client)
    for version, (name, checksum, status) in ledger.items():
        if status != "applied":
            raise MigrationError(
                f"migration {version:04d}_{name} was started but not finished; inspect the database, "
                f'then record it with "INSERT INTO schema_migrations (version, name, checksum, status) '
                f"VALUES ({version}, '{name}', '{checksum}', 'applied')\" or drop what it created"
            )
        shipped = next((m for m in migrations if m.version == version), None)
        if shipped is not None and shipped.checksum != checksum:
            raise MigrationError(
                f"migration {version:04d}_{name} was applied with checksum {checksum} but the file now has "
                f"{shipped.checksum}; never edit an applied migration, add a new one instead"
            )
    done = []
    for migration in migrations:
        if migration.version in ledger:
            continue
        _record(client, migration, "started")
        for statement in migration.statements():
            client.command(statement)
        _record(client, migration, "applied")
        done.append(migration)
    return done


def _record(client: Client, migration: Migration, status: str) -> None:
    """One ledger row, as an ``INSERT ... SELECT`` of bound parameters.

    Why not ``client.insert``: its first call imported pandas (clickhouse-connect checks whether the rows
    are a DataFrame; :func:`without_dataframes` now answers that), ~0.2 core-s and ~0.3 s on every start-up
    of a fresh directory (``ingest-history``, the worker's opening), and each call asks ClickHouse for the
    table's column types first. Why not ``INSERT ... VALUES``: the engine process refuses data in a statement's
    text (chDB would run what follows the rows as statements of their own; :mod:`.engine_server`).
    """
    client.command(
        "INSERT INTO schema_migrations (version, name, checksum, status) "
        "SELECT {version:UInt32}, {name:String}, {checksum:String}, {status:String}",
        parameters={
            "version": migration.version,
            "name": migration.name,
            "checksum": migration.checksum,
            "status": status,
        },
    )


class OpeningClient:
    """A client whose engine opens, and whose migrations run, in a thread of its own, started at once.

    Why: opening the embedded engine and applying the migrations to a fresh directory took ~1-2 s of the
    worker's start-up, before it even began to join its consumer group, where it then waited ~2 s for the
    broker. In a thread, both overlap (docs/performance.md, "Worker start-up"). Every attribute (``query``,
    ``insert``, ...) waits until the client is open and raises what opening raised (a
    :class:`MigrationError`, an engine directory another process holds), so it is used as the client it
    becomes; :meth:`opened` waits without blocking an event loop.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        apply_migrations: bool = True,
        on_migrated: Callable[[list[Migration]], None] | None = None,
        start: bool = True,
    ) -> None:
        if settings.resolved_clickhouse_url.startswith("chdb:"):
            prepare_embedded_engine()  # here, not in the thread: before anything else in this process loads chDB
        self._future: concurrent.futures.Future[Client] = concurrent.futures.Future()
        # Running from the start, so it cannot be cancelled: a worker stopped while the engine opens cancels
        # the tasks awaiting :meth:`opened`, and asyncio.wrap_future passes that on to this future. Cancelled,
        # it made the opening thread fail on set_result (the opened client never closed) and close() raise
        # CancelledError, so a stop in the first seconds ended in a traceback and exit code 1.
        self._future.set_running_or_notify_cancel()
        self._thread = threading.Thread(
            target=self._open, args=(settings, apply_migrations, on_migrated), name="clickhouse-open", daemon=True
        )
        if start:
            self._thread.start()

    def start(self) -> None:
        """Start opening (when made with ``start=False``; later calls do nothing): the worker starts it when
        its group join begins, so the two do not share the interpreter's lock while the worker starts."""
        if self._thread.ident is None:
            self._thread.start()

    def _open(
        self, settings: Settings, apply_migrations: bool, on_migrated: Callable[[list[Migration]], None] | None
    ) -> None:
        try:
            client = connect(settings)
            try:
                applied = migrate(client) if apply_migrations else []
                if on_migrated is not None:
                    on_migrated(applied)
            except BaseException:
                client.close()
                raise
        except BaseException as error:  # handed to whoever uses the client (in the worker: recovery, which stops it)
            self._future.set_exception(error)
        else:
            self._future.set_result(client)

    def result(self) -> Client:
        """The open client (waits for it); raises what opening raised."""
        return self._future.result()

    async def opened(self) -> Client:
        """:meth:`result` for a coroutine: the event loop goes on meanwhile."""
        return await asyncio.wrap_future(self._future)

    def failed(self) -> BaseException | None:
        """What opening raised, once it is over; None while it runs or when it worked."""
        return self._future.exception() if self._future.done() else None

    def close(self) -> None:
        """Close the client once it is open; nothing to close when opening failed."""
        if self._thread.ident is None:  # never started (the worker stopped before): nothing was opened
            return
        self._thread.join()
        if self._future.exception() is None:
            self._future.result().close()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # not the client's: an attribute of this object that is not set (yet)
            raise AttributeError(name)
        return getattr(self.result(), name)
