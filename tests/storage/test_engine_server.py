"""The engine process (:mod:`synthwatch.stack.engine`): the embedded engine behind ClickHouse's HTTP interface.

What it must give the worker: the same rows and the same errors as the engine inside the worker, through
clickhouse-connect's HTTP client (the production path); and nothing to anyone without its password.
"""

from __future__ import annotations

import base64
import contextlib
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import pytest
from clickhouse_connect.driver.exceptions import DatabaseError

from synthwatch.settings import Settings
from synthwatch.stack.engine import EngineProcess
from synthwatch.stream_apps.detect.intake import Intake, RawMessage
from synthwatch.stream_apps.storage.clickhouse import connect, migrate
from synthwatch.stream_apps.storage.engine_server import (
    MAX_IDLE_HANDLES,
    MAX_READONLY_POOLS,
    USER,
    Engine,
    make_handler,
)
from synthwatch.stream_apps.storage.sink import ClickHouseSink
from tests.support.factories import lab, seizure

pytestmark = [pytest.mark.integration]


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineProcess]:
    root = tmp_path_factory.mktemp("engine")
    with EngineProcess(root / "chdb", root / "engine.log") as engine:
        yield engine


class _Listening(Protocol):
    port: int


def _request(
    engine: _Listening, path: str, headers: dict[str, str], body: bytes | None = None
) -> tuple[int, bytes, dict[str, str]]:
    request = urllib.request.Request(f"http://127.0.0.1:{engine.port}{path}", data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read(), dict(error.headers)


def _basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_every_request_without_the_password_is_refused_with_401_and_no_detail(engine: EngineProcess) -> None:
    good = _basic(USER, engine.password)
    assert _request(engine, "/ping", good)[:2] == (200, b"Ok.\n")
    assert _request(engine, "/?query=SELECT%2042", good)[:2] == (200, b"42\n")
    refusals = {
        "no credentials": _request(engine, "/ping", {}),
        "no credentials, a query": _request(engine, "/?query=SELECT%201", {}),
        "no credentials, a POSTed statement": _request(engine, "/", {}, b"DROP DATABASE IF EXISTS x"),
        "wrong password": _request(engine, "/?query=SELECT%201", _basic(USER, engine.password[:-1] + "x")),
        "empty password": _request(engine, "/?query=SELECT%201", _basic(USER, "")),
        "wrong user": _request(engine, "/?query=SELECT%201", _basic("default", engine.password)),
        "password in the URL": _request(engine, f"/?query=SELECT%201&user={USER}&password={engine.password}", {}),
        "bearer token": _request(engine, "/ping", {"Authorization": f"Bearer {engine.password}"}),
        "ClickHouse headers, wrong key": _request(
            engine, "/ping", {"X-ClickHouse-User": USER, "X-ClickHouse-Key": "x"}
        ),
        "malformed Basic": _request(engine, "/ping", {"Authorization": "Basic %%%"}),
    }
    bodies = set()
    for what, (status, body, headers) in refusals.items():
        assert status == 401, what
        assert headers.get("X-ClickHouse-Exception-Code") == "516", what
        bodies.add(body)
    assert bodies == {b"Code: 516. DB::Exception: Authentication failed. (AUTHENTICATION_FAILED)\n"}
    # ClickHouse's own headers with the right key are ClickHouse's other way to authenticate
    assert _request(engine, "/ping", {"X-ClickHouse-User": USER, "X-ClickHouse-Key": engine.password})[0] == 200
    # a web page on this machine (any request with an Origin) is refused even with the password
    assert _request(engine, "/ping", {**good, "Origin": "http://example.com"})[0] == 403


def test_the_password_is_on_no_command_line_and_in_no_log(engine: EngineProcess) -> None:
    cmdline = Path(f"/proc/{engine.pid}/cmdline").read_bytes()
    assert engine.password.encode() not in cmdline
    _request(engine, "/?query=SELECT%201", _basic(USER, engine.password))
    _request(engine, "/?query=SELECT%201", _basic(USER, "wrong"))
    assert engine.password not in engine.log_path.read_text(encoding="utf-8", errors="replace")


def test_a_client_with_a_wrong_password_raises_the_servers_authentication_error(
    engine: EngineProcess, tmp_path: Path
) -> None:
    wrong = engine.url("default").replace(engine.password, "not-the-password")
    with pytest.raises(DatabaseError) as raised:
        connect(Settings(data_dir=tmp_path, clickhouse_url=wrong), create=False)
    assert "516" in str(raised.value) and engine.password not in str(raised.value)


def _batch() -> list[Any]:
    now = datetime(2026, 11, 1, 12, tzinfo=UTC)
    records = [seizure(event_id=f"e-s-{i}", occurred_at=(now - timedelta(hours=i)).isoformat()) for i in range(70)]
    records += [lab(event_id=f"e-l-{i}", occurred_at=(now - timedelta(hours=i)).isoformat()) for i in range(30)]
    return Intake().process(RawMessage(f"t:0:{i}", json.dumps(r)) for i, r in enumerate(records)).events


_READ_BACK = {
    "lab_detections": "SELECT * EXCEPT (ingested_at) FROM lab_detections ORDER BY event_id",
    "border_seizures": "SELECT * EXCEPT (ingested_at) FROM border_seizures ORDER BY event_id",
    "tables": "SELECT name, engine, sorting_key FROM system.tables WHERE database = currentDatabase() ORDER BY name",
    "migrations": "SELECT version, name, checksum, toString(status) FROM schema_migrations ORDER BY version, status",
}


def _store_and_read(client: Any) -> tuple[list[int], dict[str, list[tuple[Any, ...]]], int, tuple[int, ...]]:
    applied = [m.version for m in migrate(client)]
    assert migrate(client) == []
    sink = ClickHouseSink(client)
    events = _batch()
    first = sink.store_events(events)
    again = sink.store_events(events)
    rows = {name: [tuple(r) for r in client.query(sql).result_rows] for name, sql in _READ_BACK.items()}
    with pytest.raises(DatabaseError) as raised:
        client.query("SELECT * FROM no_such_table")
    return applied, rows, raised.value.code or 0, (first.stored, again.already_stored)


def test_migrations_sink_and_reads_over_http_give_the_embedded_paths_rows_and_errors(
    engine: EngineProcess, ch: Any, tmp_path: Path
) -> None:
    remote = connect(Settings(data_dir=tmp_path, clickhouse_url=engine.url("same_rows")))
    try:
        over_http = _store_and_read(remote)
    finally:
        remote.close()
    embedded = _store_and_read(ch)
    assert over_http[3] == embedded[3] == (100, 100)
    assert over_http[0] == embedded[0] and over_http[0]
    assert over_http[2] == embedded[2] == 60  # UNKNOWN_TABLE, raised as DatabaseError with its code
    for name in _READ_BACK:
        assert over_http[1][name] == embedded[1][name], name
    assert len(over_http[1]["lab_detections"]) == 30 and len(over_http[1]["border_seizures"]) == 70


def test_per_request_settings_apply_to_their_request_only(engine: EngineProcess, tmp_path: Path) -> None:
    """A handle remembers the settings it last applied; a request without them must see the defaults."""
    client = connect(Settings(data_dir=tmp_path, clickhouse_url=engine.url("settings_scope")))
    try:
        sql = "SELECT value FROM system.settings WHERE name = 'max_threads'"
        default = client.query(sql).result_rows[0][0]
        assert client.query(sql, settings={"max_threads": 3}).result_rows[0][0] == "3"
        assert client.query(sql).result_rows[0][0] == default
        with pytest.raises(DatabaseError) as raised:
            client.query("SELECT 1", settings={"no_such_setting_at_all": 1})
        assert raised.value.code == 115  # UNKNOWN_SETTING
        assert client.query(sql).result_rows[0][0] == default
        # readonly cannot be taken back on a handle: a read-only request must not make later writes fail
        with pytest.raises(DatabaseError):
            client.command("CREATE TABLE ro (x UInt8) ENGINE = Memory", settings={"readonly": 1})
        assert client.query("SELECT 1", settings={"max_threads": 2, "readonly": 1}).result_rows == [(1,)]
        client.command("CREATE TABLE rw (x UInt8) ENGINE = Memory")
        assert client.query(sql).result_rows[0][0] == default
    finally:
        client.close()


class _Served:
    """:class:`Engine` behind its HTTP handler in this process, on the session's engine (a second set of handles,
    as the analyst client's), so a test can look at its pools: the engine process's code, without the process."""

    password = "p" * 24

    def __init__(self, path: Path, spool: Path) -> None:
        import threading
        from http.server import ThreadingHTTPServer

        self.engine = Engine(path, spool)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(self.engine, self.password))
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, name="engine-server", daemon=True).start()

    def query(self, sql: str, **params: str) -> tuple[int, bytes]:
        query = urllib.parse.urlencode({"query": sql, **params})
        return _request(self, f"/?{query}", _basic(USER, self.password))[:2]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.engine.close()


def test_read_only_pools_stay_bounded_whatever_setting_sets_clients_send(
    ch: Any, ch_settings: Settings, tmp_path: Path
) -> None:
    """Requests that set ``readonly`` get handles kept for their exact setting set. Before the bound, every distinct
    set a client sent left a pool and an open handle behind for the process's lifetime: a client sending ever new
    values (any setting's) grew the engine process without end. Now at most MAX_READONLY_POOLS are kept, the least
    recently used closed, a handle in use when its pool goes is closed when it comes back, and every request is
    still answered with its own settings."""
    served = _Served(ch_settings.embedded_clickhouse_path, tmp_path)
    try:
        setting = "SELECT getSetting('max_threads')"
        in_flight = served.engine.handle({"max_threads": "1", "readonly": "1"})
        held = in_flight.__enter__()  # a request under way on a pool about to be evicted
        sets = 4 * MAX_READONLY_POOLS
        for n in range(2, sets + 2):
            assert served.query(setting, readonly="1", max_threads=str(n)) == (200, f"{n}\n".encode())
            assert served.engine.pools()["readonly_pools"] <= MAX_READONLY_POOLS
        in_flight.__exit__(None, None, None)
        # Before: a pool and a handle per set, kept (33 pools, 34 handles here); failed at the 9th pool.
        assert served.engine.pools() == {"readonly_pools": MAX_READONLY_POOLS, "handles": MAX_READONLY_POOLS + 1}
        assert held not in served.engine._all
        # an evicted set again, a plain request, a write refused under readonly: all answered as before
        assert served.query(setting, readonly="1", max_threads="2") == (200, b"2\n")
        assert served.query("SELECT 42") == (200, b"42\n")
        status, body = served.query("CREATE TABLE ro_bound (x UInt8) ENGINE = Memory", readonly="1")
        assert status == 500 and b"readonly" in body.lower()
        # concurrent requests open handles; once they are done a pool keeps MAX_IDLE_HANDLES of them
        with contextlib.ExitStack() as busy:
            for _ in range(MAX_IDLE_HANDLES + 4):
                busy.enter_context(served.engine.handle({}))
        assert served.engine.pools()["handles"] <= MAX_READONLY_POOLS + MAX_IDLE_HANDLES
    finally:
        served.close()
