"""Analysts' read-only SQL against synthwatch's ClickHouse, wherever the engine lives.

Server URL: query it directly, as the read-only analyst user (``clickhouse_query_url``). Embedded engine:
if a running ``synthwatch up``/``worker`` owns the directory, ask it over its HTTP port (``POST /sql``,
with the token it wrote to ``DATA_DIR/web-token``); otherwise open the engine in this process.

Every analyst query runs in a session of its own, never in the worker's write session: a separate
chDB connection handle (own lock, so a query never holds the sink's lock) with ``readonly=1`` and
limits on time, rows and memory. ``readonly=1`` alone is not enough in the embedded engine (checked:
it still writes ``INTO OUTFILE`` and still reads files through the ``file()`` *function*), so a
statement is first parsed by ClickHouse itself (:func:`check_select`): one SELECT, no INTO OUTFILE, no
FORMAT, no SETTINGS clause anywhere, no function that reaches outside the database.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from clickhouse_connect.driver.binding import bind_query
from clickhouse_connect.driver.client import Client

from .clickhouse import connect
from .redaction import redact
from .runtime import read_stack, read_web_token
from .settings import Settings


class QueryError(RuntimeError):
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


#: What may hang directly under a SELECT's root node: its union list, and the FORMAT the client adds.
_ALLOWED_TOP = ("ExpressionList", "Identifier Native")


def analyst_settings(settings: Settings) -> dict[str, Any]:
    """Session settings of every analyst query: read-only, and bounded in time, rows and memory."""
    return {
        "max_execution_time": settings.sql_max_seconds,
        "timeout_overflow_mode": "throw",
        "max_result_rows": settings.sql_max_rows,
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

    from .clickhouse import database_of

    url = settings.resolved_clickhouse_url
    if url.startswith("chdb:"):
        if prepare:
            connect(settings).close()  # the engine and database exist before a read-only handle opens
        return clickhouse_connect.get_client(
            dsn=url, database=database_of(settings), settings=analyst_settings(settings)
        )
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
    for line in ast[1:]:
        depth = len(line) - len(line.lstrip(" "))
        node = line.strip()
        if depth == 1 and not node.startswith(_ALLOWED_TOP):
            raise QueryError("INTO OUTFILE, FORMAT and SETTINGS clauses are not allowed; send a plain SELECT")
        if node == "Set" or node.startswith("Set "):
            raise QueryError("SETTINGS clauses are not allowed (the analyst session's limits are fixed)")
        if node.startswith("Function "):
            name = node.split(" ")[1]
            if denied_function(name):
                raise QueryError(f"function {name}() reaches outside the database and is not allowed")
    return canonical, run_parameters


def _first_line(error: BaseException) -> str:
    text = redact(str(error)).strip().splitlines()
    return text[0][:500] if text else type(error).__name__


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value


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
        return execute_analyst(client, sql, parameters)


def execute_analyst(client: Client, sql: str, parameters: dict[str, Any] | None = None) -> QueryResult:
    """Check and run one SELECT on an analyst client; values made JSON-friendly."""
    canonical, run_parameters = check_select(client, sql, parameters)
    try:
        result = client.query(canonical, parameters=run_parameters)
    except Exception as error:  # ClickHouse's own message (limits, unknown column) is what the user needs
        raise QueryError(_first_line(error)) from None
    return QueryResult(list(result.column_names), [_jsonable(list(row)) for row in result.result_rows])


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


def run_query(settings: Settings, sql: str, parameters: dict[str, Any] | None = None) -> QueryResult:
    """Run a read statement where the data is: over HTTP if another process owns the engine."""
    if settings.clickhouse_is_embedded:
        info = read_stack(settings)
        if info is not None and info.pid != os.getpid():
            return execute_remote(info.web_url, sql, parameters, token=read_web_token(settings))
    client = analyst_client(settings)
    try:
        return execute_analyst(client, sql, parameters)
    finally:
        client.close()
