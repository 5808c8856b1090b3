"""Read-only SQL against synthwatch's ClickHouse, wherever the engine lives.

Server URL: query it directly. Embedded engine: if a running ``synthwatch up``/``worker`` owns the
directory, ask it over its HTTP port (``POST /sql``); otherwise open the engine in this process.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from clickhouse_connect.driver.exceptions import ClickHouseError

from .clickhouse import connect
from .runtime import read_stack
from .settings import Settings

_READ_ONLY = re.compile(r"^\s*(SELECT|WITH|SHOW|DESCRIBE|DESC|EXISTS|EXPLAIN)\b", re.IGNORECASE)


class QueryError(RuntimeError):
    """The query was refused or failed; the message says why."""


@dataclass(frozen=True, slots=True)
class QueryResult:
    columns: list[str]
    rows: list[list[Any]]

    def as_dicts(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, row, strict=True)) for row in self.rows]


def check_read_only(sql: str) -> str:
    """Allow one read statement only: the HTTP endpoint must not become a way to drop tables."""
    statement = sql.strip().rstrip(";").strip()
    if not _READ_ONLY.match(statement) or ";" in statement:
        raise QueryError("only a single SELECT / WITH / SHOW / DESCRIBE / EXISTS / EXPLAIN statement is allowed")
    return statement


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


def execute_local(client: Any, sql: str, parameters: dict[str, Any] | None = None) -> QueryResult:
    """Run a read statement on an open clickhouse-connect client; values made JSON-friendly.

    ClickHouse's own refusal becomes a :class:`QueryError`, as it does over HTTP: callers handle one error.
    """
    statement = check_read_only(sql)
    try:
        result = client.query(statement, parameters=parameters or None)
    except ClickHouseError as error:
        raise QueryError(str(error)) from error
    return QueryResult(list(result.column_names), [_jsonable(list(row)) for row in result.result_rows])


def execute_remote(web_url: str, sql: str, parameters: dict[str, Any] | None = None) -> QueryResult:
    """Ask the process that owns the embedded engine to run a read statement."""
    body = json.dumps({"sql": sql, "parameters": parameters or {}}).encode()
    request = urllib.request.Request(
        f"{web_url}/sql", data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
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
            return execute_remote(info.web_url, sql, parameters)
    client = connect(settings)
    try:
        return execute_local(client, sql, parameters)
    finally:
        client.close()
