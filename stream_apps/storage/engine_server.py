"""The embedded ClickHouse engine (chDB) in a process of its own, answering ClickHouse's HTTP interface.

Why: in the worker, the engine's code (~240-290 MiB), its heap and its insert CPU sat in the worker's
process (docs/performance.md, "What 512 MiB needs"). chDB has no server mode and allows one engine per
process, so this process owns the engine directory and serves the subset of ClickHouse's HTTP interface
that clickhouse-connect's HTTP client sends: statements in the ``query`` URL parameter, the body, or a
multipart form (large bound parameters); ``param_*`` bound parameters; ``database``; every other URL
parameter a setting; ``INSERT ... FORMAT fmt`` with the data in the body (lz4/zstd/gzip per
``Content-Encoding``). Errors come back as ClickHouse's do (status 500, ``X-ClickHouse-Exception-Code``, the
engine's ``Code: N. DB::Exception: ...`` text), so the client raises the same exceptions as against a
server. The worker then runs its production path (``SYNTHWATCH_CLICKHOUSE_URL=http://...``) unchanged.
Not served (400, :func:`checked_statement`): statements that change a session (``SET``, ``USE``, temporary
tables, transactions), as handles are pooled and they would change the next request's session; statements that
reach beyond the request (``SYSTEM`` but for stopping and starting merges, ``KILL``, ``EXECUTE AS``, ``CREATE
FUNCTION``); several statements in one text; an INSERT with its data in the statement text rather than the body.

Security: it listens on loopback only, and every request, ``/ping`` included, must carry the password
created by whoever started it (Basic auth, or ``X-ClickHouse-User``/``X-ClickHouse-Key``); anything else
gets 401 with no detail. The password comes in :data:`PASSWORD_ENV` (never on the command line, where
``ps`` shows it) and is never printed. Requests from web pages (an ``Origin`` header) are refused too.
What it holds is bounded whatever clients send: requests running (:class:`Admission`), waiting, connections
and so threads (:class:`EngineHTTPServer`; a new connection's headers within :data:`HEADER_SECONDS`), idle
handles (:meth:`Engine.handle`), request bodies (read in the request's turn, at most :data:`MAX_BODY` as sent
and once decompressed).

Run by :mod:`synthwatch.stack.engine`: ``python -m synthwatch.stream_apps.storage.engine_server DIR FD`` with
the password in the environment and ``FD`` a listening loopback socket it inherits.
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import io
import json
import os
import re
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Iterator, Mapping
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlparse

from synthwatch.errors import SynthwatchError
from synthwatch.stream_apps.storage.clickhouse import leave_other_embedded_engine, prepare_embedded_engine

#: The environment variable that hands the process its password.
PASSWORD_ENV = "SYNTHWATCH_ENGINE_PASSWORD"
#: The user name the engine accepts (ClickHouse's default user's name, so URLs look like a server's).
USER = "synthwatch"
#: The database a request that names none runs in: a new chDB connection's, as a server's default user's.
DEFAULT_DATABASE = "default"
#: The largest request body accepted (a sink insert of a 100k-event checkpoint is ~30 MiB).
MAX_BODY = 1 << 30

#: URL parameters that are not settings: the HTTP interface's own, and the transport settings
#: clickhouse-connect sends that the engine does not know (chDB would refuse them as unknown).
_NOT_SETTINGS = frozenset(
    {
        "query",
        "database",
        "default_format",
        "user",
        "password",
        "query_id",
        "session_id",
        "session_timeout",
        "session_check",
        "compress",
        "decompress",
        "buffer_size",
        "wait_end_of_query",
        "client_protocol_version",
        "role",
        "quota_key",
        "enable_http_compression",
        "send_progress_in_http_headers",
        "http_headers_progress_interval_ms",
        "cancel_http_readonly_queries_on_client_close",
    }
)
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TRAILING_FORMAT = re.compile(r"\sFORMAT\s+(\w+)\s*;?\s*$", re.IGNORECASE)
_INSERT = re.compile(r"^\s*INSERT\s+INTO\s+(.+?)\s+FORMAT\s+(\w+)\s*$", re.IGNORECASE | re.DOTALL)
_INLINE_INSERT = re.compile(rb"\s*(INSERT\s+INTO\s+.+?\s+FORMAT\s+\w+)[ \t]*\r?\n", re.IGNORECASE | re.DOTALL)
_CODE = re.compile(r"Code:\s*(\d+)")
#: Statements that change the session they run in, as ClickHouse's formatter writes them (keywords upper case,
#: single spaces, no comments): settings and query parameters (``SET``, ``SET ROLE``, ``SET TRANSACTION
#: SNAPSHOT``), the current database (``USE``), transactions, and temporary tables (session-scoped; an unqualified
#: name finds a temporary table first, so one would shadow a real table for later requests).
_SESSION_STATEMENT = re.compile(
    r"^(?:(?:SET|USE|BEGIN|COMMIT|ROLLBACK)\b|(?:CREATE|ATTACH|REPLACE|DROP|DETACH)(?: OR REPLACE)? TEMPORARY\b)"
)
#: Statements that reach beyond the request, canonical: ``SYSTEM`` (``SYSTEM SHUTDOWN`` signals the engine's whole
#: process group, ``SYSTEM KILL`` kills the engine) except the merges switch the backfill uses
#: (``stream_apps/storage/backfill/ingest.py``); ``KILL`` (``KILL QUERY WHERE 1`` ends every other request's
#: query); ``EXECUTE AS`` (another user's rights); ``CREATE``/``DROP FUNCTION`` (global and stored in the engine
#: directory: a function made by one request runs in every later one, analysts' included).
_ENGINE_STATEMENT = re.compile(
    r"^(?:SYSTEM (?!(?:STOP|START) MERGES\b)|KILL\b|EXECUTE AS\b|(?:CREATE|DROP)(?: OR REPLACE)? FUNCTION\b)"
)
_AUTH_FAILED = b"Code: 516. DB::Exception: Authentication failed. (AUTHENTICATION_FAILED)\n"


class RequestError(SynthwatchError):
    """A request this endpoint cannot serve, answered as ClickHouse answers: ``code`` and ``message``."""

    def __init__(self, code: int, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


def authorized(headers: Mapping[str, str], password: str) -> bool:
    """Whether the request carries :data:`USER` and ``password`` (Basic auth or ClickHouse's own headers).

    Compared in constant time; URL parameters (``?password=``) are not accepted: they end up in logs.
    """
    lowered = {name.lower(): value for name, value in headers.items()}
    user, given = "", ""
    scheme, _, value = lowered.get("authorization", "").partition(" ")
    if scheme.lower() == "basic":
        with contextlib.suppress(ValueError, UnicodeDecodeError):
            user, _, given = base64.b64decode(value.strip(), validate=True).decode().partition(":")
    elif "x-clickhouse-user" in lowered:
        user, given = lowered["x-clickhouse-user"], lowered.get("x-clickhouse-key", "")
    ok_user = hmac.compare_digest(user.encode(), USER.encode())
    ok_password = hmac.compare_digest(given.encode(), password.encode())
    return bool(password) and ok_user and ok_password


def decompress(encoding: str, body: bytes, limit: int = MAX_BODY) -> bytes:
    """A request body as clickhouse-connect sends it: lz4 or zstd frames (one per block), gzip, or plain; at most
    ``limit`` bytes once decompressed (a few KiB of zeros compressed expand to GiB), else 400."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding == "lz4":
        import lz4.frame

        return _bounded(lz4.frame.LZ4FrameDecompressor, body, limit)
    if encoding == "zstd":
        from clickhouse_connect.driver.compression import _require_zstd

        return _bounded(_require_zstd().ZstdDecompressor, body, limit)
    if encoding in ("gzip", "deflate"):
        import zlib

        return _bounded(lambda: zlib.decompressobj(47), body, limit)
    raise RequestError(1, f"unsupported Content-Encoding {encoding!r}")


def _bounded(decompressor: Any, body: bytes, limit: int) -> bytes:
    """``body``'s frames (members), one after the other, decompressed by a new ``decompressor()`` each; never more
    than ``limit`` + 1 bytes are made: beyond ``limit``, 400."""
    out: list[bytes] = []
    total = 0
    while body:
        frame = decompressor()
        try:
            chunk = frame.decompress(body, limit - total + 1)
        except Exception as error:  # lz4's, zstd's and zlib's errors alike
            raise RequestError(1, f"the request body does not decompress: {error}") from None
        total += len(chunk)
        if total > limit:
            raise RequestError(1, f"request body too large: more than {limit} bytes decompressed")
        if not frame.eof:
            raise RequestError(1, "the request body ends inside a compressed frame")
        out.append(chunk)
        body = frame.unused_data
    return b"".join(out)


def form_fields(content_type: str, body: bytes) -> dict[str, str]:
    """Fields of a multipart/form-data body (clickhouse-connect sends big queries and parameters so)."""
    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    fields: dict[str, str] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if isinstance(name, str) and isinstance(payload, bytes):
            fields[name] = _text(payload)  # replacing bytes that are not UTF-8 changed the statement
    return fields


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _escaped(value: str) -> str:
    """A query parameter's value as the engine reads it (the ``Escaped``/TSV text form), so it arrives unchanged."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def session_statement(canonical: str) -> str | None:
    """What a statement in ClickHouse's canonical form (``formatQuerySingleLine``) would change beyond its own
    request (``"SET"``, ``"USE"``, ``"TEMPORARY"``, ``"SYSTEM"``, ``"KILL"``, ...), or None for one that changes
    neither the session it runs in nor the engine's process.

    Why on the canonical form: ClickHouse's own parser has dropped comments, folded case and whitespace and
    refused several statements in one text, so ``/* x */ sEt``, ``\\nUSE`` and ``SELECT 1; SET ...`` look like what
    they are. Not refused: a ``SETTINGS`` clause (that statement only), ``SYSTEM STOP/START MERGES`` (the
    backfill's), DDL on real tables.
    """
    match = _SESSION_STATEMENT.match(canonical) or _ENGINE_STATEMENT.match(canonical)
    if match is None:
        return None
    word = match.group(0)
    if "TEMPORARY" in word:
        return "TEMPORARY"
    if word.endswith("FUNCTION"):
        return "FUNCTION"
    return "EXECUTE AS" if word.startswith("EXECUTE") else word.split(" ")[0]


class Admission:
    """At most ``limit`` requests in the engine at once and at most ``queue`` more waiting for their turn, served
    first come, first served; a request beyond both is refused (:class:`Busy`) at once.

    Why: each request in the engine holds a handle (a chDB session) and a thread; unbounded, a burst of
    requests grew both without end. Waiting first, not refusing, because the worker's own requests should
    simply take their turn; refusing beyond the queue, because a waiting request holds a thread too. In order,
    because a condition variable wakes whichever waiter the scheduler picks: under a stream of analysts'
    queries one sink insert could wait for ever while later requests ran. A slot that frees goes to the
    oldest waiter directly, so a request arriving meanwhile cannot take it first.
    """

    def __init__(self, limit: int, queue: int) -> None:
        self.limit, self.queue = limit, queue
        self._running = 0
        self._waiters: deque[threading.Event] = deque()
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        """Run the block as one of the ``limit`` requests, after waiting for a turn if need be."""
        turn: threading.Event | None = None
        with self._lock:
            if self._running < self.limit and not self._waiters:
                self._running += 1
            elif len(self._waiters) >= self.queue:
                raise Busy(self.limit, self.queue)
            else:
                turn = threading.Event()
                self._waiters.append(turn)
        if turn is not None:
            turn.wait()  # set by the request that hands its slot over (``_running`` counts it already)
        try:
            yield
        finally:
            with self._lock:
                if self._waiters:
                    self._waiters.popleft().set()
                else:
                    self._running -= 1

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot now."""
        with self._lock:
            return len(self._waiters)


class Busy(RequestError):
    """Every request slot and every place in the queue is taken: ClickHouse's TOO_MANY_SIMULTANEOUS_QUERIES, 503."""

    def __init__(self, limit: int, queue: int) -> None:
        super().__init__(
            202,
            f"Too many simultaneous queries: {limit} run and {queue} wait in the engine process; retry later "
            "(SYNTHWATCH_CLICKHOUSE_ENGINE_MAX_REQUESTS sets how many run). (TOO_MANY_SIMULTANEOUS_QUERIES)",
            status=503,
        )


class _Handle:
    """One chDB connection handle and the session state applied to it (``USE``, ``SET``).

    Why the state is remembered: every request clickhouse-connect sends carries the same few settings
    (``date_time_input_format``, ...); applying them with ``SET`` and restoring them after each statement
    cost several engine calls per request. A handle only changes what differs from its last request, and
    puts back to ``DEFAULT`` the settings the new request does not carry, so no request sees another's.
    ``readonly`` cannot be taken back once set (no setting can then change): a request that sets it gets a
    handle kept for requests with exactly its settings (:meth:`Engine.handle`), applied with ``readonly`` last.
    """

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self.database: str | None = DEFAULT_DATABASE  # a new connection's (None: unknown, a USE failed)
        self.settings: dict[str, str] = {}

    def prepare(self, database: str | None, settings: Mapping[str, str]) -> None:
        """Make the handle's session the request's: its database (the default one when it names none, as a
        server does) and exactly its settings. A setting counts as applied, or as reset, only once its ``SET``
        ran; whoever gets an exception from here must not pool the handle again (:meth:`Engine.handle`)."""
        database = database or DEFAULT_DATABASE
        if database != self.database:
            if not _IDENTIFIER.match(database):
                raise RequestError(81, f"Database {database!r} is not a plain identifier")
            self.database = None
            self.connection.query(f"USE {database}", "TabSeparated")
            self.database = database
        for name in [n for n in self.settings if n not in settings]:
            self.connection.query(f"SET {name} = DEFAULT", "TabSeparated")
            del self.settings[name]
        for name, value in sorted(settings.items(), key=lambda item: item[0] == "readonly"):
            if self.settings.get(name) != value:
                if not _IDENTIFIER.match(name):
                    raise RequestError(115, f"Setting name {name!r} is not a plain identifier")
                self.settings.pop(name, None)
                self.connection.query(f"SET {name} = {_quote(value)}", "TabSeparated")
                self.settings[name] = value


_Pool = tuple[tuple[str, str], ...] | None

#: Requests in the engine at once when ``clickhouse_engine_max_requests`` is unset: a few per core (a request
#: mostly waits on the engine's own threads), at least 8 (the worker's sink, analysts and commands at once).
DEFAULT_MAX_REQUESTS = max(8, 4 * (os.cpu_count() or 1))
#: How long a connection may sit idle between requests before it is closed (its thread ends): ClickHouse's own
#: ``keep_alive_timeout``. clickhouse-connect opens a new connection for a pooled one the server closed.
IDLE_SECONDS = 30
#: How long a new connection has to deliver its first request's line and headers, in all (not per read): until a
#: request has shown the password, a client holds one of the capped connections (:class:`EngineHTTPServer`), and
#: with a per-read timeout a byte every few seconds held it for ever. Loopback clients send theirs in one write.
HEADER_SECONDS = 5.0

#: Statements whose canonical form is remembered (:meth:`Engine.checked`), and the longest one remembered.
MAX_CHECKED_STATEMENTS = 256
MAX_CHECKED_CHARS = 8192

#: Read-only pools (one per distinct setting set carrying ``readonly``, see :meth:`Engine.handle`) kept at once;
#: the least recently used goes beyond it, its handles closed. The worker's analyst queries use one set.
MAX_READONLY_POOLS = 8
#: Idle handles a pool keeps; a handle coming back to a full pool is closed (the peak of concurrent requests).
MAX_IDLE_HANDLES = 8


class Engine:
    """The engine directory, pools of connection handles to it, and the statements' execution."""

    def __init__(self, path: Path, spool: Path, max_requests: int = DEFAULT_MAX_REQUESTS) -> None:
        import chdb

        self._chdb = chdb
        self.path = str(Path(path).resolve())
        self.spool = spool
        #: Requests in the engine at once, and as many waiting: handles in use are bounded by it.
        self.admission = Admission(max_requests, max_requests)
        #: Canonical forms of statements recently checked, least recently used first (:meth:`checked`).
        self._checked: OrderedDict[tuple[str, tuple[tuple[str, str], ...]], str] = OrderedDict()
        #: Idle handles per pool, least recently used pool first.
        self._idle: OrderedDict[_Pool, list[_Handle]] = OrderedDict()
        self._all: set[_Handle] = set()  # open handles, idle or in use
        self._lock = threading.Lock()
        #: Held open, never used, until :meth:`close`: chDB shuts its engine down when its last handle closes
        #: and starts it again on the next connect, and each restart left ~5 threads and ~8 descriptors behind
        #: (chDB 26.9). A failed request discards its handle, so without this one an idle engine restarted per
        #: failed request and its process grew without bound.
        leave_other_embedded_engine(self.path)  # a client's hold on another directory in this process (tests)
        self._anchor = chdb.connect(self.path)
        with self.handle({}) as handle:
            self.timezone = handle.connection.query("SELECT timezone()", "TabSeparated").bytes().decode().strip()

    @contextlib.contextmanager
    def handle(self, settings: Mapping[str, str], database: str | None = None) -> Iterator[_Handle]:
        """A handle of its own for one request (one is opened when all are busy), prepared with the request's
        ``database`` and ``settings`` (:meth:`_Handle.prepare`). Requests that set ``readonly`` share handles only
        with requests of the very same settings (see :class:`_Handle`).

        A handle goes back to its pool only when its request raised nothing: a failed ``SET`` or statement leaves
        its session in a state not known here (a request's ``max_query_size=20`` made every later ``SET`` on that
        handle fail, and the pool handed it out for ever), so it is closed instead. A pooled handle that cannot
        be prepared is replaced by a new one (it has no state to reset), so one request's settings never fail
        another's.

        Bounded whatever clients send: setting sets are the client's to choose, and a pool per set, kept for
        ever, grew with every distinct one (a handle, its session and its queue each). At most
        :data:`MAX_READONLY_POOLS` read-only pools are kept (the least recently used one's idle handles are
        closed, and its handles in use are closed when they come back) and :data:`MAX_IDLE_HANDLES` idle handles
        per pool. A set used again later only costs a new handle (~2 ms).
        """
        pool: _Pool = tuple(sorted(settings.items())) if "readonly" in settings else None
        evicted: list[_Handle] = []
        with self._lock:
            idle = self._idle.get(pool)
            if idle is None:
                idle = self._idle[pool] = []
                evicted = self._evict()
            self._idle.move_to_end(pool)
            handle = idle.pop() if idle else None
        _close(evicted)
        if handle is not None:
            try:
                handle.prepare(database, settings)
            except Exception:
                self._discard(handle)
                handle = None
        if handle is None:
            handle = _Handle(self._chdb.connect(self.path))
            with self._lock:
                self._all.add(handle)
            try:
                handle.prepare(database, settings)
            except BaseException:
                self._discard(handle)
                raise
        try:
            yield handle
        except BaseException:
            self._discard(handle)
            raise
        with self._lock:
            kept = self._idle.get(pool) is idle and len(idle) < MAX_IDLE_HANDLES
            if kept:
                idle.append(handle)
            else:
                self._all.discard(handle)
        if not kept:
            _close([handle])

    def _discard(self, handle: _Handle) -> None:
        """Close a handle that is not to be pooled again."""
        with self._lock:
            self._all.discard(handle)
        _close([handle])

    def _evict(self) -> list[_Handle]:
        """Drop the least recently used read-only pools beyond :data:`MAX_READONLY_POOLS` (under the lock); their
        idle handles, to be closed by the caller once the lock is released."""
        readonly = [pool for pool in self._idle if pool is not None]
        evicted: list[_Handle] = []
        for pool in readonly[: max(0, len(readonly) - MAX_READONLY_POOLS)]:
            evicted += self._idle.pop(pool)
        self._all.difference_update(evicted)
        return evicted

    def pools(self) -> dict[str, int]:
        """How many read-only pools and open handles there are now (for tests and diagnosis)."""
        with self._lock:
            return {"readonly_pools": sum(pool is not None for pool in self._idle), "handles": len(self._all)}

    def close(self) -> None:
        with self._lock:
            handles = list(self._all)
            self._all.clear()
            self._idle.clear()
        _close(handles)
        with contextlib.suppress(Exception):
            self._anchor.close()

    def execute(
        self, sql: str, data: bytes | None, params: Mapping[str, str], default_format: str
    ) -> tuple[bytes, str, dict[str, str]]:
        """Run one request's statement, in one of the :attr:`admission` slots the caller holds; returns (body,
        format, summary)."""
        bound = {k[len("param_") :]: v for k, v in params.items() if k.startswith("param_")}
        settings = {k: v for k, v in params.items() if k not in _NOT_SETTINGS and not k.startswith("param_")}
        if settings.get("dialect", "clickhouse").strip().lower() != "clickhouse":
            # another dialect's parser would read the statement, not the one that checked it
            raise RequestError(48, "Only the clickhouse dialect is served here")
        insert = _INSERT.match(sql) if data is not None else None
        with self.handle(settings, params.get("database")) as handle:
            if insert is not None and data is not None:
                return self._insert(handle, insert.group(1), insert.group(2), data)
            match = _TRAILING_FORMAT.search(sql)
            fmt = match.group(1) if match else default_format
            statement = sql[: match.start()] if match else sql
            canonical = self.checked(handle, statement)
            if _INLINE_DATA.match(canonical):
                raise RequestError(
                    48,
                    "INSERT with its data in the statement text is not served here (what follows the data would "
                    "run as further statements): send the data in the request body (clickhouse-connect: "
                    "client.insert), or INSERT ... SELECT with parameters (NOT_IMPLEMENTED)",
                )
            result = handle.connection.query(_engine_text(canonical), fmt, params=bound)
            return result.bytes() or b"", fmt, _summary(result, "read")

    def checked(self, handle: _Handle, statement: str) -> str:
        """:func:`checked_statement`, remembered for the last :data:`MAX_CHECKED_STATEMENTS` statements.

        Why: the check is an engine call (~1.5 ms of the engine's CPU, a third of a small query's), and most
        requests repeat a text: an insert's statement, clickhouse-connect's ``DESCRIBE TABLE``, queries with
        bound parameters. Remembered per text *and* setting set (the handle's, the request's): the parse that
        checks runs under the request's settings, which decide what parses (``implicit_select``,
        ``max_query_size``, ``max_parser_depth``); a form checked under one set is not run for another (before,
        ``1`` checked under ``implicit_select=1`` then ran as ``SELECT 1`` for requests without it). A client
        sends the same few settings with every request, so its texts still hit. Refused statements are not
        remembered.
        """
        key = (statement, tuple(sorted(handle.settings.items())))
        with self._lock:
            canonical = self._checked.get(key)
            if canonical is not None:
                self._checked.move_to_end(key)
                return canonical
        canonical = checked_statement(handle, statement)
        if len(statement) <= MAX_CHECKED_CHARS:
            with self._lock:
                self._checked[key] = canonical
                while len(self._checked) > MAX_CHECKED_STATEMENTS:
                    self._checked.popitem(last=False)
        return canonical

    def _insert(self, handle: _Handle, target: str, fmt: str, data: bytes) -> tuple[bytes, str, dict[str, str]]:
        """An insert's data, through a file only this process can read (chDB takes inserted data from a file)."""
        if not _IDENTIFIER.match(fmt):
            raise RequestError(73, f"Unknown format {fmt!r}")
        fd, name = tempfile.mkstemp(suffix=".data", dir=self.spool)
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
            # ``target`` is the client's text (``t VALUES (1); SET ...; INSERT INTO t``): checked as any statement,
            # with a file name of no consequence to the parse, so that the check is remembered for the next insert
            source = f" FROM INFILE {_quote(str(self.spool / 'data'))} FORMAT {fmt}"
            statement = self.checked(handle, f"INSERT INTO {target}{source}")
            if not statement.endswith(source):  # the parser took our clause as inline data of the client's
                raise RequestError(62, "Expected INSERT INTO table [(columns)] [SETTINGS ...] FORMAT format")
            statement = statement[: -len(source)] + f" FROM INFILE {_quote(name)} FORMAT {fmt}"
            try:
                result = handle.connection.query(_engine_text(statement), "TabSeparated")
            except Exception as error:  # the engine names the spool file: a path of this process, not the client's
                message = str(error).replace(_quote(name), "the request body").replace(name, "the request body")
                raise RuntimeError(message) from None
        finally:
            with contextlib.suppress(OSError):
                os.unlink(name)
        return b"", "TabSeparated", _summary(result, "written")


def checked_statement(handle: _Handle, statement: str) -> str:
    """``statement`` in ClickHouse's canonical form, the text to run; 400 if it would change ``handle``'s
    session, or if it is not exactly one statement.

    Why: handles are pooled; a ``SET``, ``USE`` or temporary table in one request's text would be the next
    request's session on that handle (chDB keeps them per handle, and runs every statement of an ``a; b``
    text). ClickHouse's parser decides, not a pattern on the raw text: the text goes in as a bound parameter of
    ``formatQuerySingleLine`` (parsed, never executed, on this handle with this request's settings), which
    refuses several statements and gives the canonical form :func:`session_statement` reads. The canonical form
    is what runs, as for analysts' SQL (:func:`synthwatch.stream_apps.storage.query.check_select`): the parser
    takes an INSERT's inline data (``VALUES (1); SET ...``) as opaque, chDB's statement splitter does not, and
    the canonical form has no data. Costs one engine call (~1 ms). Resetting a handle after each request
    instead is not cheap: its settings, roles and temporary tables would each need reading back.
    """
    if "\0" in statement:
        raise RequestError(62, "A statement with a NUL character is refused")
    try:
        formatted = handle.connection.query(
            "SELECT formatQuerySingleLine({q:String})", "TabSeparatedRaw", params={"q": _escaped(statement)}
        )
    except Exception as error:  # not one valid statement: the parser's own error, without our wrapping query
        message = str(error)
        raise RequestError(_code(message), _IN_SCOPE.sub("", message.split("DB::Exception: ", 1)[-1])) from None
    # bytes, not necessarily UTF-8: ``'\\xff'`` in the text is the byte 0xFF in the canonical form
    canonical = (formatted.bytes() or b"").decode("utf-8", "surrogateescape").strip()
    kind = session_statement(canonical)
    if kind is not None:
        raise RequestError(48, f"{kind} statements are not served here: {_INSTEAD[kind]} (NOT_IMPLEMENTED)")
    return canonical


#: What to do instead of each refused session statement (:func:`session_statement`).
_INSTEAD = {
    "SET": "requests share pooled sessions, so send settings as URL parameters (clickhouse-connect: settings=...) "
    "and query parameters as param_NAME (clickhouse-connect: parameters=...)",
    "USE": "requests share pooled sessions, so name the database in the database URL parameter "
    "(clickhouse-connect: database=...) or qualify tables (db.table)",
    "TEMPORARY": "temporary tables live in a session and requests share pooled sessions; use a subquery, WITH, "
    "or a table in a database",
    **dict.fromkeys(("BEGIN", "COMMIT", "ROLLBACK"), "each request runs on its own; there are no transactions"),
    "SYSTEM": "they act on the engine's process (SYSTEM SHUTDOWN signals its whole process group); only SYSTEM "
    "STOP MERGES and SYSTEM START MERGES are served",
    "KILL": "every request's query runs in this one engine, so it would end other clients' queries; bound a "
    "query with the max_execution_time setting",
    "EXECUTE AS": "requests run as the engine's one user",
    "FUNCTION": "a user-defined function is global and kept in the engine directory, so it would run in every "
    "later request; write the expression in the query, or use WITH",
}
#: An INSERT with inline data (or ``FROM INFILE``), canonical: the formatter writes ``FORMAT fmt`` last and drops
#: the data. Refused with a clear message; the canonical text that runs would have no data anyway.
_INLINE_DATA = re.compile(r"^INSERT INTO .* FORMAT \w+$")
_IN_SCOPE = re.compile(r":? In scope SELECT formatQuerySingleLine\(.*?\)\.?(?= \(|$)", re.DOTALL)


def _engine_text(statement: str) -> bytes:
    """A canonical statement as the engine wrote it (bytes its string literals hold that are not UTF-8 included)."""
    return statement.encode("utf-8", "surrogateescape")


def _code(message: str) -> int:
    match = _CODE.search(message)
    return int(match.group(1)) if match else 1002


def _close(handles: list[_Handle]) -> None:
    """Close handles taken out of the pools; one that fails to close is already unusable."""
    for handle in handles:
        with contextlib.suppress(Exception):
            handle.connection.close()


def _summary(result: Any, kind: str) -> dict[str, str]:
    try:
        return {f"{kind}_rows": str(result.rows_read()), f"{kind}_bytes": str(result.bytes_read())}
    except Exception:  # older chDB results have no statistics
        return {}


def engine_error(error: Exception) -> tuple[int, bytes]:
    """ClickHouse's HTTP error for an engine exception: (code, ``Code: N. DB::Exception: ...`` text)."""
    if isinstance(error, RequestError):
        return error.code, f"Code: {error.code}. DB::Exception: {error}\n".encode()
    message = str(error)
    start = message.find("Code: ")
    message = message[start:].strip() if start > 0 else message.strip()
    code = _code(message)
    if not message.startswith("Code:"):
        message = f"Code: {code}. DB::Exception: {message}"
    return code, (message + "\n").encode()


class _DeadlineReader(io.RawIOBase):
    """A socket's reads, each with at most ``idle`` seconds, and all of them together ending at ``deadline``
    (``time.monotonic()``; None: no deadline), past which a read raises TimeoutError."""

    def __init__(self, connection: socket.socket, idle: float, deadline: float | None) -> None:
        self.connection, self.idle, self.deadline = connection, idle, deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        timeout = self.idle
        if self.deadline is not None:
            timeout = min(timeout, self.deadline - time.monotonic())
            if timeout <= 0:
                raise TimeoutError("the request's line and headers took too long")
        self.connection.settimeout(timeout)
        return self.connection.recv_into(buffer)


def make_handler(engine: Engine, password: str, header_seconds: float = HEADER_SECONDS) -> type[BaseHTTPRequestHandler]:
    """The request handler class for one engine and password; a new connection's first request line and headers
    must arrive within ``header_seconds`` (:data:`HEADER_SECONDS`)."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "synthwatch-engine"
        sys_version = ""
        timeout = IDLE_SECONDS  # a connection idle (or a body stalled) this long is closed, its thread ends

        def setup(self) -> None:
            super().setup()
            # until a request shows the password, reads share one deadline (a timeout ends the connection)
            self._reader = _DeadlineReader(self.connection, IDLE_SECONDS, time.monotonic() + header_seconds)
            self.rfile.close()  # the socket's own file: it holds a reference that keeps the socket open
            self.rfile = io.BufferedReader(self._reader)

        def log_message(self, format: str, *args: Any) -> None:
            return None  # request lines carry queries and bound values: nothing is logged per request

        def do_GET(self) -> None:
            self._serve(post=False)

        def do_POST(self) -> None:
            self._serve(post=True)

        def _serve(self, post: bool) -> None:
            if not authorized(dict(self.headers.items()), password):
                self.close_connection = True  # the body (if any) is not read
                self._reply(401, _AUTH_FAILED, {"X-ClickHouse-Exception-Code": "516"})
                return
            self._reader.deadline = None  # the password's holder: idle and body reads as a server's
            if "Origin" in self.headers:
                self.close_connection = True
                self._reply(
                    403,
                    b"Code: 497. DB::Exception: Requests from web pages are refused.\n",
                    {"X-ClickHouse-Exception-Code": "497"},
                )
                return
            query_id = str(uuid.uuid4())
            url = urlparse(self.path)
            if url.path.rstrip("/") == "/ping":
                self.close_connection = self.close_connection or post  # a body (if any) is not read
                self._reply(200, b"Ok.\n", {})
                return
            body_read = not post
            try:
                # the body is read in the request's turn: bodies in memory are bounded by the requests running
                with engine.admission.slot():
                    body = decompress(self.headers.get("Content-Encoding", ""), self._body()) if post else b""
                    body_read = True
                    params = _url_parameters(url.query)
                    query_id = params.get("query_id") or query_id
                    content_type = self.headers.get("Content-Type", "")
                    if content_type.startswith("multipart/form-data"):
                        params.update(form_fields(content_type, body))
                        body = b""
                    sql, data = _statement(params.get("query"), body)
                    default_format = params.get("default_format") or "TabSeparated"
                    result, fmt, summary = engine.execute(sql, data, params, default_format)
            except Exception as error:  # the engine's message is what the client shows, as from a server
                if not body_read:  # refused before its body was read: what follows on the connection is that body
                    self.close_connection = True
                code, text = engine_error(error)
                status = error.status if isinstance(error, RequestError) else 500
                headers = {"X-ClickHouse-Exception-Code": str(code), "X-ClickHouse-Query-Id": query_id}
                if status == 503:
                    headers["Retry-After"] = "1"
                self._reply(status, text, headers)
                return
            self._reply(
                200,
                result,
                {
                    "X-ClickHouse-Format": fmt,
                    "X-ClickHouse-Query-Id": query_id,
                    "X-ClickHouse-Summary": json.dumps(summary),
                },
            )

        def _body(self) -> bytes:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                chunks: list[bytes] = []
                total = 0
                while True:
                    size = int(self.rfile.readline(100).split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline(1000) not in (b"\r\n", b"\n", b""):
                            pass
                        return b"".join(chunks)
                    total += size
                    if total > MAX_BODY:
                        self.close_connection = True
                        raise RequestError(1, "request body too large")
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline(100)
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY or length < 0:
                self.close_connection = True
                raise RequestError(1, "request body too large")
            return self.rfile.read(length) if length else b""

        def _reply(self, status: int, body: bytes, headers: dict[str, str]) -> None:
            self.send_response(status)
            for name, value in {
                "Content-Type": "text/plain; charset=UTF-8" if status != 200 else "application/octet-stream",
                "Content-Length": str(len(body)),
                "X-ClickHouse-Timezone": engine.timezone,
                "X-ClickHouse-Server-Display-Name": "synthwatch-engine",
                **headers,
            }.items():
                self.send_header(name, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

    return Handler


def _url_parameters(query: str) -> dict[str, str]:
    """The URL's parameters; 400 if one is not UTF-8 (decoding them with replacement changed the statement)."""
    try:
        return dict(parse_qsl(query, keep_blank_values=True, errors="strict"))
    except UnicodeDecodeError:
        raise RequestError(27, "A URL parameter is not UTF-8 text once percent-decoded") from None


def _statement(query: str | None, body: bytes) -> tuple[str, bytes | None]:
    """The statement and the insert data of a request, as ClickHouse's HTTP interface reads them.

    ``query`` parameter and body: the statement is the parameter, the body its data (an insert) or the rest
    of the statement. No parameter: the body is the statement, or ``INSERT ... FORMAT fmt\\n`` then data.
    """
    if query is not None:
        if _INSERT.match(query):
            return query, body
        return (f"{query}\n{_text(body)}" if body else query), None
    inline = _INLINE_INSERT.match(body)
    if inline is not None:
        return _text(inline.group(1)), body[inline.end() :]
    return _text(body), None


def _text(statement: bytes) -> str:
    """A statement's text, which must be UTF-8 (400 otherwise; a byte goes in a string literal as ``'\\xFF'``)."""
    try:
        return statement.decode()
    except UnicodeDecodeError:
        raise RequestError(
            27, "The statement is not UTF-8 text: write other bytes as escapes in string literals ('\\xFF')"
        ) from None


class EngineHTTPServer(ThreadingHTTPServer):
    """A thread per connection, as :class:`ThreadingHTTPServer`, but at most ``max_connections`` of them.

    Why: a thread serves one connection for as long as the client keeps it open, so threads grew with
    connections without a cap. Beyond the cap the server stops accepting until a connection ends (an idle one
    ends after :data:`IDLE_SECONDS`): new clients wait in the listening socket's backlog, as for a busy server,
    and are then served, not refused.
    """

    daemon_threads = True

    def __init__(self, listener: socket.socket, handler: type[BaseHTTPRequestHandler], max_connections: int) -> None:
        super().__init__(listener.getsockname()[:2], handler, bind_and_activate=False)
        self.socket.close()
        self.socket = listener
        self.max_connections = max_connections
        self._connections = threading.BoundedSemaphore(max_connections)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Start the connection's thread once one of ``max_connections`` is free (blocks the accepting loop)."""
        self._connections.acquire()
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._connections.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Serve the connection, then free its place (whatever ended it)."""
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connections.release()


def serve(path: Path, listener: socket.socket, password: str, max_requests: int = DEFAULT_MAX_REQUESTS) -> None:
    """Serve the engine in ``path`` on ``listener`` (a listening loopback socket); blocks.

    The socket comes bound and listening from whoever started this process (:mod:`synthwatch.stack.engine`):
    its port is known before the engine opens, and a client that connects meanwhile waits in the backlog
    instead of being refused. Anything but a loopback address is refused here. ``max_requests`` run at once,
    as many wait (:class:`Admission`), and four times as many connections are served (:class:`EngineHTTPServer`).
    """
    host = listener.getsockname()[0]
    if host not in ("127.0.0.1", "::1"):
        raise SystemExit(f"the engine serves loopback only, not {host}")
    prepare_embedded_engine()
    path.mkdir(parents=True, exist_ok=True)
    spool = Path(tempfile.mkdtemp(prefix="synthwatch-engine-"))  # 0700: inserted data is readable by us only
    engine = Engine(path, spool, max_requests)
    server = EngineHTTPServer(listener, make_handler(engine, password), 4 * max_requests)
    try:
        print(f"engine for {path} serving on {host}:{listener.getsockname()[1]}", flush=True)
        server.serve_forever()
    finally:
        server.server_close()
        engine.close()
        with contextlib.suppress(OSError):
            os.rmdir(spool)


def main(argv: list[str]) -> None:
    """``DIR FD``: the engine directory and the inherited listening socket; the password from
    :data:`PASSWORD_ENV`, ``clickhouse_engine_max_requests`` from the settings (its environment).
    SIGTERM stops it (the engine closes)."""
    import signal

    from synthwatch.settings import Settings

    if len(argv) != 2 or not argv[1].isdigit():
        raise SystemExit(f"usage: {PASSWORD_ENV}=... python -m {__name__} DIR LISTENING_SOCKET_FD")
    password = os.environ.pop(PASSWORD_ENV, "")
    if len(password) < 16:
        raise SystemExit(f"{PASSWORD_ENV} must hold a password of at least 16 characters")

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    max_requests = Settings().clickhouse_engine_max_requests or DEFAULT_MAX_REQUESTS
    with contextlib.suppress(KeyboardInterrupt):
        serve(Path(argv[0]), socket.socket(fileno=int(argv[1])), password, max_requests)


if __name__ == "__main__":
    main(sys.argv[1:])
