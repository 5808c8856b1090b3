"""Analysts' read-only SQL against synthwatch's ClickHouse, wherever the engine lives.

Server URL: query it directly, as the read-only analyst user (``clickhouse_query_url``). Embedded engine:
if a running ``synthwatch up``/``worker`` owns the directory, ask it over its HTTP port (``POST /sql``,
with the token it wrote to ``DATA_DIR/web-token``); otherwise open the engine in this process.

Every analyst query runs in a session of its own, never in the worker's write session: a separate
chDB connection handle (own lock, so a query never holds the sink's lock) with ``readonly=1`` and
limits on time, rows and memory. ``readonly=1`` alone is not enough in the embedded engine (checked:
it still writes ``INTO OUTFILE`` and still reads files through the ``file()`` *function*), so a
statement is first parsed by ClickHouse itself (:func:`check_select`): one SELECT, no INTO OUTFILE, no
FORMAT, no SETTINGS clause anywhere, no function that reaches outside the database, and in FROM only tables
and the table functions of :data:`ALLOWED_TABLE_FUNCTIONS`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from synthwatch.errors import SynthwatchError
from synthwatch.redaction import redact
from synthwatch.schemas.text import jsonable
from synthwatch.settings import Settings
from synthwatch.stackfile import read_stack, read_web_token
from synthwatch.stream_apps.storage.clickhouse import connect, database_of, embedded_client

if TYPE_CHECKING:
    # clickhouse-connect is imported where a client is opened: in the worker, by the thread that opens it.
    from clickhouse_connect.driver.client import Client


class QueryError(SynthwatchError, RuntimeError):
    """The query was refused or failed; the message says why."""


@dataclass(frozen=True, slots=True)
class QueryResult:
    columns: list[str]
    rows: list[list[Any]]

    def as_dicts(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, row, strict=True)) for row in self.rows]


#: Families of functions (and table functions) that read or write outside the database, matched by
#: name *prefix*, case-insensitive: ``readonly=1`` blocks the table functions, but the embedded engine let
#: the ``file()`` function read /etc/passwd under it, and an exact list missed variants (``dictGetOrDefault``,
#: ``dictGetString``, ``icebergS3``, ``executablePool``...). A prefix refuses each family's present and
#: future members; the price is refusing a few harmless names that share one (``URLHierarchy``,
#: ``filesystemAvailable``), which analysts of this data do not need.
DENIED_FUNCTION_PREFIXES = tuple(
    name.lower()
    for name in (
        "file",  # file, fileCluster, filesystem*
        "url",  # url, urlCluster
        "s3",  # s3, s3Cluster
        "gcs",
        "oss",
        "cosn",
        "azure",  # azureBlobStorage, azureBlobStorageCluster
        "hdfs",  # hdfs, hdfsCluster
        "hive",
        "remote",  # remote, remoteSecure
        "cluster",  # cluster, clusterAllReplicas
        "mysql",
        "postgres",  # postgresql
        "sqlite",
        "mongo",  # mongodb
        "redis",
        "jdbc",
        "odbc",
        "executable",  # executable, executablePool
        "input",
        "iceberg",  # iceberg, icebergS3, icebergAzure, icebergHDFS, icebergCluster...
        "deltalake",
        "hudi",
        "paimon",
        "ytsaurus",
        "arrowflight",
        "dict",  # dictGet*, dictHas, dictIsIn, dictionary(): a dictionary may be backed by an external source
    )
)


def denied_function(name: str) -> bool:
    """Whether a function of this name may reach outside the database (a denied family's prefix)."""
    return name.lower().startswith(DENIED_FUNCTION_PREFIXES)


#: The table functions (``FROM name(...)``) analysts may use (any case): generators of rows and views of the
#: database's own tables. An allow-list, not only the denied families: the embedded engine has table functions
#: of chDB's own that no prefix names (``python()`` reads the calling process's Python objects, ``arrowstream()``,
#: ``bigquery()`` reaches the network, ``eval()``) and each release adds some; they were kept out by ``readonly=1``
#: alone (``arrowstream()`` not even by that). A server's analyst profile is the other fence.
ALLOWED_TABLE_FUNCTIONS = ("numbers", "numbers_mt", "generate_series", "generateSeries", "values", "view")
_ALLOWED_TABLE_FUNCTIONS = frozenset(name.lower() for name in ALLOWED_TABLE_FUNCTIONS)


#: What may hang directly under a SELECT's root node: its union list, and the FORMAT the client adds.
_ALLOWED_TOP = ("ExpressionList", "Identifier Native")


def analyst_settings(settings: Settings) -> dict[str, Any]:
    """Session settings of every analyst query: read-only, and bounded in time, rows, result bytes and memory."""
    return {
        "max_execution_time": settings.sql_max_seconds,
        "timeout_overflow_mode": "throw",
        "max_result_rows": settings.sql_max_rows,
        # bytes too: a few rows of long strings passed the row cap and became GiB in the worker that serves /sql
        "max_result_bytes": settings.sql_max_result_bytes,
        "result_overflow_mode": "throw",
        "max_memory_usage": settings.sql_max_memory_bytes,
        "readonly": 1,  # last: once it is set, no other setting can be changed
    }


def analyst_client(settings: Settings, *, prepare: bool = True) -> Client:
    """A client for analysts' queries, apart from any write session.

    Embedded: a second chDB connection handle on the same engine (chDB allows one engine per process but
    several handles; each has its own lock, so analysts never wait on, or hold, the sink's). Server: the
    read-only analyst user of ``clickhouse_query_url`` (its profile's <constraints> are the real fence).
    ``prepare=False``: the engine and database are known to exist (the worker's), skip creating them.
    """
    import clickhouse_connect

    url = settings.resolved_clickhouse_url
    if url.startswith("chdb:"):
        if prepare:
            connect(settings).close()  # the engine and database exist before a read-only handle opens
        return embedded_client(url, database=database_of(settings), settings=analyst_settings(settings))
    query_url = settings.clickhouse_query_url or url
    return clickhouse_connect.get_client(dsn=query_url, settings=analyst_settings(settings))


def _ast_lines(client: Client, sql: str, parameters: dict[str, Any] | None) -> list[str]:
    return [str(row[0]) for row in client.query(f"EXPLAIN AST {sql}", parameters=parameters or None).result_rows]


def check_select(
    client: Client, sql: str, parameters: dict[str, Any] | None = None
) -> tuple[str, dict[str, Any] | None]:
    """The statement in ClickHouse's canonical form, if it is one plain SELECT; else QueryError.

    Parsed by ClickHouse itself: the text goes in as a bound parameter of ``formatQuerySingleLine`` (never
    executed; refuses several statements; drops comments), then ``EXPLAIN AST`` of the canonical text
    (which does not execute the statement, nor its INTO OUTFILE) is checked node by node. Client-side
    parameters (``%(name)s``) are bound first, so what is checked is what runs; returns the canonical text
    and the server-side parameters (``{name:Type}``) still to bind, if any.
    """
    from clickhouse_connect.driver.binding import bind_query

    statement = sql.strip().rstrip(";").strip()
    if not statement:
        raise QueryError("empty query; send one SELECT statement")
    try:
        bound, server = bind_query(statement, parameters)
    except Exception as error:
        raise QueryError(f"the parameters do not fit the query: {_first_line(error)}") from None
    if not isinstance(bound, str):
        raise QueryError("binary parameters are not accepted")
    run_parameters = parameters if server else None
    try:
        formatted = client.query("SELECT formatQuerySingleLine({q:String})", parameters={"q": bound})
        canonical = str(formatted.result_rows[0][0])
        ast = _ast_lines(client, canonical, run_parameters)
    except Exception as error:
        raise QueryError(f"not a valid statement: {_first_line(error)}") from None
    if not ast or not ast[0].startswith("SelectWithUnionQuery"):
        kind = ast[0].split(" ")[0] if ast else "nothing"
        raise QueryError(f"only a single SELECT (or WITH ... SELECT) statement is allowed, not {kind}")
    parents = [ast[0]]  # the node at each depth above the current line
    for line in ast[1:]:
        depth = len(line) - len(line.lstrip(" "))
        node = line.strip()
        del parents[depth:]
        in_from = parents[-1].startswith("TableExpression")
        parents.append(node)
        if depth == 1 and not node.startswith(_ALLOWED_TOP):
            raise QueryError("INTO OUTFILE, FORMAT and SETTINGS clauses are not allowed; send a plain SELECT")
        if node == "Set" or node.startswith("Set "):
            raise QueryError("SETTINGS clauses are not allowed (the analyst session's limits are fixed)")
        if node.startswith("Function "):
            name = node.split(" ")[1]
            if denied_function(name):
                raise QueryError(f"function {name}() reaches outside the database and is not allowed")
            if in_from and name.lower() not in _ALLOWED_TABLE_FUNCTIONS:
                allowed = ", ".join(ALLOWED_TABLE_FUNCTIONS)
                raise QueryError(f"table function {name}() is not allowed; analysts may read tables and {allowed}")
    return canonical, run_parameters


_UNKNOWN_TABLE = re.compile(r"Unknown table expression identifier '([^']+)'|Table (\S+) does not exist")
_IN_SCOPE = re.compile(r"\.? In scope .*$")


def _explained(error: BaseException, database: str | None) -> str:
    """ClickHouse's message on one line, without the echoed query, with the next step for the usual causes."""
    line = _first_line(error)
    table = _UNKNOWN_TABLE.search(line)
    if table is not None:
        name = (table.group(1) or table.group(2)).split(".")[-1]
        return (
            f"there is no table {name} in database {database} (nothing stored there yet?): run `synthwatch db "
            f"migrate`, or {_POINT_AT_DATA}"
        )
    if "UNKNOWN_IDENTIFIER" in line:
        return (
            _IN_SCOPE.sub("", line.split("DB::Exception: ", 1)[-1].split(" (UNKNOWN_IDENTIFIER)")[0]).rstrip(".")
            + '. The columns of a table: `synthwatch sql "SELECT name, type FROM system.columns WHERE database = '
            "currentDatabase() AND table = 'alerts'\"`"
        )
    return line


_TRAILING_FORMAT = re.compile(r"\bFORMAT\s+([A-Za-z][A-Za-z0-9_]*)\s*;?\s*$", re.IGNORECASE)


def trailing_format(sql: str) -> str | None:
    """The output format a statement asks for at its end (``... FORMAT CSV``), if it does.

    Why: analysts type ClickHouse's own ``FORMAT CSV``; the read-only session refuses every FORMAT
    clause (its answer is parsed by us), so the command line points them to ``--format`` instead.
    A cheap textual check for the message only: :func:`check_select` still refuses it on the AST.
    """
    match = _TRAILING_FORMAT.search(sql.strip())
    return match.group(1) if match else None


def _first_line(error: BaseException) -> str:
    text = redact(str(error)).strip().splitlines()
    return text[0][:500] if text else type(error).__name__


class AnalystSessions:
    """One read-only analyst handle per thread, opened on first use and kept.

    Opening a handle and applying its settings took ~100 ms under load, about the whole cost of a small
    query; a handle per thread (the worker's /sql pool has two) keeps analysts from waiting on each
    other's handle lock without paying that on every query. Analyst statements cannot change a
    session (SELECT only), so a kept handle stays as it was opened.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._local = threading.local()

    def run(self, sql: str, parameters: dict[str, Any] | None = None) -> QueryResult:
        """Check and run one SELECT on this thread's handle."""
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = analyst_client(self.settings, prepare=False)
        return execute_analyst(client, sql, parameters, self.settings.sql_max_result_bytes)


def converted_size(value: Any) -> int:
    """Bytes a converted value stands for in the answer: text by its length, lists and maps (Array, Map, Tuple and
    nested columns) by what they hold, anything else 8. Counted all the way down, without recursion: counted by
    its top level only, ``SELECT [repeat('xx', 100000)] FROM numbers(100)`` passed a 1 MiB bound as 100 values of
    8 bytes (20 MB; the engine counts the constant array once per block too)."""
    size, pending = 0, [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str | bytes):
            size += len(item)
        elif isinstance(item, list | tuple):
            size += 8
            pending.extend(item)
        elif isinstance(item, dict):
            size += 8
            pending.extend(item.keys())
            pending.extend(item.values())
        else:
            size += 8
    return size


def execute_analyst(
    client: Client, sql: str, parameters: dict[str, Any] | None = None, max_bytes: int | None = None
) -> QueryResult:
    """Check and run one SELECT on an analyst client; values made JSON-friendly, at most ``max_bytes`` of them.

    Why the bound here as well as the engine's ``max_result_bytes``: the engine counts a constant column once per
    block, whatever its rows, so ``SELECT repeat('xx', 524288) FROM numbers(400)`` (400 MiB) passed a 2 MiB limit
    and became GiB of Python objects and JSON in the worker that serves /sql. Rows are read block by block and
    counted as they are converted (:func:`converted_size`); past the bound the query stops with a message saying
    what to do.
    """
    canonical, run_parameters = check_select(client, sql, parameters)
    rows: list[list[Any]] = []
    size = 0
    try:
        with client.query_row_block_stream(canonical, parameters=run_parameters) as stream:
            columns = list(stream.source.column_names)
            for block in stream:
                for row in block:
                    converted = jsonable(list(row))
                    if max_bytes is not None:
                        size += converted_size(converted)
                        if size > max_bytes:
                            raise QueryError(
                                f"the result is larger than {max_bytes} bytes (SYNTHWATCH_SQL_MAX_RESULT_BYTES) after "
                                f"{len(rows)} rows: aggregate, select fewer or shorter columns, or add LIMIT"
                            )
                    rows.append(converted)
    except QueryError:
        raise
    except Exception as error:  # ClickHouse's own message (limits, unknown column) is what the user needs
        raise QueryError(_explained(error, client.database)) from None
    return QueryResult(columns, rows)


def execute_remote(
    web_url: str, sql: str, parameters: dict[str, Any] | None = None, *, token: str | None = None
) -> QueryResult:
    """Ask the process that owns the embedded engine to run a read statement (with its access token)."""
    if not token:
        raise QueryError(
            "no access token for the running stack's /sql endpoint: run this command as the user that started "
            "`synthwatch up`, with the same SYNTHWATCH_DATA_DIR (the token is DATA_DIR/web-token, mode 0600)"
        )
    body = json.dumps({"sql": sql, "parameters": parameters or {}}).encode()
    request = urllib.request.Request(
        f"{web_url}/sql",
        data=body,
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            payload = json.loads(response.read())
    except urllib.error.HTTPError as error:
        detail = error.read().decode("utf-8", errors="replace")
        with contextlib.suppress(ValueError):
            detail = json.loads(detail).get("error", detail)
        raise QueryError(detail) from None
    except urllib.error.URLError as error:
        raise QueryError(f"the running stack at {web_url} did not answer: {error.reason}") from None
    return QueryResult(payload["columns"], payload["rows"])


#: The next step when the data directory holds no synthwatch data: where the data comes from.
_POINT_AT_DATA = (
    "start the stack with `synthwatch up` (or `synthwatch demo`), or set SYNTHWATCH_DATA_DIR to the directory it uses"
)


def _embedded_problem(settings: Settings) -> str | None:
    """Why analysts' reads cannot use the embedded engine in ``settings.data_dir`` (None: they can).

    A read must not create an engine: a mistyped SYNTHWATCH_DATA_DIR would otherwise get an empty
    database that answers "Unknown table" for every command.
    """
    data_dir = settings.data_dir
    if data_dir.exists() and not data_dir.is_dir():
        return f"SYNTHWATCH_DATA_DIR {data_dir} is a file, not a directory: {_POINT_AT_DATA}"
    if not settings.embedded_clickhouse_path.is_dir():
        return (
            f"no synthwatch data in {data_dir} (no {settings.embedded_clickhouse_path.name}/ there): {_POINT_AT_DATA}"
        )
    if "chdb" not in sys.modules and _engine_held(settings.embedded_clickhouse_path):  # (ours would block us too)
        return (
            f"the embedded ClickHouse in {settings.embedded_clickhouse_path} is open in another process that does "
            "not serve queries (e.g. `synthwatch ingest-history`): wait for it to finish, then retry"
        )
    return None


def _engine_held(path: Path) -> bool:
    """Whether another process has the engine in ``path`` open (ClickHouse flocks its ``status`` file).

    Asked before opening: chDB would otherwise print its own multi-line error to stderr before ours.
    """
    import fcntl

    try:
        with open(path / "status", "rb") as status:
            try:
                fcntl.flock(status, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(status, fcntl.LOCK_UN)
    except OSError:
        return False
    return False


def _open_failure(settings: Settings, error: Exception) -> QueryError:
    """A one-line reason, and what to do, for an engine that would not open."""
    if isinstance(error, OSError):
        return QueryError(f"cannot use {settings.data_dir}: {error.strerror or error}; {_POINT_AT_DATA}")
    if settings.clickhouse_is_embedded:
        return QueryError(
            f"cannot open the embedded ClickHouse in {settings.embedded_clickhouse_path} ({_first_line(error)}); "
            "if another process has it open (e.g. `synthwatch ingest-history`), wait for it to finish, then retry"
        )
    return QueryError(f"cannot reach ClickHouse: {_first_line(error)}; check SYNTHWATCH_CLICKHOUSE_QUERY_URL")


def run_query(settings: Settings, sql: str, parameters: dict[str, Any] | None = None) -> QueryResult:
    """Run a read statement where the data is: over HTTP if another process owns the engine.

    Every failure is a :class:`QueryError` whose one-line message says what to do next.
    """
    if settings.clickhouse_is_embedded:
        try:
            info = read_stack(settings)
        except OSError as error:
            raise _open_failure(settings, error) from None
        if info is not None and info.pid != os.getpid():
            return execute_remote(info.web_url, sql, parameters, token=read_web_token(settings))
        if info is None:
            problem = _embedded_problem(settings)
            if problem is not None:
                raise QueryError(problem)
    try:
        client = analyst_client(settings)
    except Exception as error:  # chDB's "Unable to open", a server's connection error, a directory we cannot use
        raise _open_failure(settings, error) from None
    try:
        return execute_analyst(client, sql, parameters, settings.sql_max_result_bytes)
    finally:
        client.close()
