"""The engine process (:mod:`synthwatch.stack.engine`): the embedded engine behind ClickHouse's HTTP interface.

What it must give the worker: the same rows and the same errors as the engine inside the worker, through
clickhouse-connect's HTTP client (the production path); and nothing to anyone without its password.
"""

from __future__ import annotations

import base64
import contextlib
import json
import select
import socket
import threading
import time
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
    MAX_CHECKED_CHARS,
    MAX_CHECKED_STATEMENTS,
    MAX_IDLE_HANDLES,
    MAX_READONLY_POOLS,
    USER,
    Admission,
    Busy,
    Engine,
    EngineHTTPServer,
    RequestError,
    decompress,
    make_handler,
)
from synthwatch.stream_apps.storage.sink import ClickHouseSink
from tests.conftest import wait_until
from tests.support.chdb_handles import count_chdb_handles
from tests.support.factories import lab, seizure

pytestmark = [pytest.mark.integration]


def has_input(connection: socket.socket, timeout_s: float) -> bool:
    """Whether ``connection`` has data or an end to read within ``timeout_s`` (poll, not select: a pytest
    process that ran many tests can hold descriptors past select()'s 1024 limit)."""
    poller = select.poll()
    poller.register(connection, select.POLLIN)
    return bool(poller.poll(timeout_s * 1000))


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineProcess]:
    root = tmp_path_factory.mktemp("engine")
    with EngineProcess(root / "chdb", root / "engine.log") as engine:
        yield engine


class _Listening(Protocol):
    port: int


def _request(
    engine: _Listening, path: str, headers: dict[str, str], body: bytes | None = None, timeout: float = 30
) -> tuple[int, bytes, dict[str, str]]:
    request = urllib.request.Request(f"http://127.0.0.1:{engine.port}{path}", data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
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
        # a setting that makes the next request's reset fail (its SET is longer than 20 bytes) is that request's
        # problem only: before, the handle went back to the pool and every later request on it failed, for ever
        for _ in range(3):
            with contextlib.suppress(DatabaseError):
                client.query("SELECT 1", settings={"max_query_size": 20})
            assert [client.query("SELECT 1").result_rows for _ in range(4)] == [[(1,)]] * 4
        assert client.query(sql).result_rows[0][0] == default
        # the statement check runs under the request's settings: what one setting lets parse (``1`` as ``SELECT 1``
        # under implicit_select) is not run for a request without it (before: the remembered check ran it)
        assert client.command("1", settings={"implicit_select": 1}) == 1
        with pytest.raises(DatabaseError) as raised:
            client.command("1")
        assert raised.value.code == 62  # SYNTAX_ERROR
    finally:
        client.close()


def test_statements_whose_strings_hold_bytes_that_are_not_utf8_run(engine: EngineProcess, tmp_path: Path) -> None:
    """``'\\xff'`` in a string literal is the byte 0xFF, which ClickHouse's canonical form holds as is. Before, the
    canonical form was decoded as UTF-8: such valid queries failed with a generic engine error (500). A statement
    text that is itself not UTF-8 gets a 400 that says so."""
    client = connect(Settings(data_dir=tmp_path, clickhouse_url=engine.url("bytes")))
    try:
        assert client.query(r"SELECT '\xff' = unhex('FF') AS a, length('\xfe\xff') AS b").result_rows == [(1, 2)]
        assert client.query(r"SELECT hex({s:String} || '\xff') AS h", parameters={"s": "a"}).result_rows == [("61FF",)]
    finally:
        client.close()
    status, body, _ = _request(engine, "/", _basic(USER, engine.password), b"SELECT '\xff'")
    assert status == 400 and b"not UTF-8" in body


@pytest.mark.parametrize("encoding", ["gzip", "lz4", "zstd"])
def test_a_compressed_body_is_decompressed_up_to_a_bound_only(encoding: str) -> None:
    """A few KiB of compressed zeros expand to GiB: before, bodies were decompressed whatever they grew to. Now at
    most ``limit`` bytes (MAX_BODY in the server) come out, frame after frame, and a body cut inside a frame is
    refused, each as a 400 (RequestError)."""
    import gzip

    import lz4.frame
    from clickhouse_connect.driver.compression import _require_zstd

    compress = {"gzip": gzip.compress, "lz4": lz4.frame.compress, "zstd": _require_zstd().compress}[encoding]
    frame = compress(bytes(1 << 20))  # 1 MiB of zeros: a few hundred bytes to a few KiB compressed
    assert len(frame) < 8192
    body = frame + compress(b"tail")
    assert decompress(encoding, body, limit=(1 << 20) + 4) == bytes(1 << 20) + b"tail"
    for limit, refusal in (((1 << 20) + 3, "too large"), (1000, "too large"), (1 << 30, "inside")):
        with pytest.raises(RequestError) as raised:
            decompress(encoding, body[:-2] if refusal == "inside" else body, limit=limit)
        assert refusal in str(raised.value) and raised.value.status == 400


def test_a_request_without_a_database_runs_in_the_default_one(engine: EngineProcess) -> None:
    """A server runs a request that names no database in the user's default one. Before, the handle kept the
    database of the request that used it last: after a request in ``system``, one naming none ran there too."""
    auth = _basic(USER, engine.password)
    current = "/?" + urllib.parse.urlencode({"query": "SELECT currentDatabase()"})
    for _ in range(2):
        assert _request(engine, current + "&database=system", auth)[:2] == (200, b"system\n")
        assert _request(engine, current, auth)[:2] == (200, b"default\n")


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


def test_remembered_checks_are_canonical_and_bounded(ch: Any, ch_settings: Settings, tmp_path: Path) -> None:
    """The engine remembers the canonical form of the statements it checked (an engine call each), at most
    MAX_CHECKED_STATEMENTS of them and none longer than MAX_CHECKED_CHARS: ever-new texts do not grow it."""
    served = _Served(ch_settings.embedded_clickhouse_path, tmp_path)
    try:
        with served.engine.handle({}) as handle:
            for n in range(MAX_CHECKED_STATEMENTS + 10):
                assert served.engine.checked(handle, f"select  {n} -- a comment") == f"SELECT {n}"
            assert len(served.engine._checked) == MAX_CHECKED_STATEMENTS
            long = f"SELECT '{'x' * MAX_CHECKED_CHARS}'"
            assert served.engine.checked(handle, long) == long
            assert all(text != long for text, _ in served.engine._checked)
    finally:
        served.close()


#: Statements that would change the session of the pooled handle they run on, as a client could send them
#: (comments, case, whitespace, several statements in one text), and the word the refusal says to use instead.
_SESSION_CHANGES = {
    "SET max_threads = 3": "settings",
    "/* a comment */ sEt\tmax_threads=3": "settings",
    "-- a comment\n\n   set max_threads = 3;": "settings",
    "SELECT 1; SET max_threads = 3": "Multi-statements",
    "SELECT 1;\nSET max_threads = 3 -- hidden": "Multi-statements",
    "SET param_shadow = 'x'": "param_NAME",
    "SET ROLE NONE": "settings",
    "USE system": "database",
    "/* x */\n uSe\nsystem": "database",
    "CREATE TEMPORARY TABLE shadowed AS SELECT 99 AS x": "temporary tables",
    "create  temporary table if not exists shadowed (x UInt8)": "temporary tables",
    "BEGIN TRANSACTION": "transactions",
    "INSERT INTO shadowed VALUES (7); SET max_threads = 3": "request body",
    "INSERT INTO shadowed VALUES (7)\n;\n/* */ USE system": "request body",
    # beyond the request: the engine's process (SYSTEM SHUTDOWN signalled the worker's whole process group), every
    # other request's query (KILL), another user (EXECUTE AS), functions kept for every later request
    "SYSTEM DROP DNS CACHE": "SYSTEM STOP MERGES",
    "/* x */ system\tflush logs": "SYSTEM STOP MERGES",
    "KILL QUERY WHERE 1": "max_execution_time",
    "kill mutation where 0": "max_execution_time",
    "EXECUTE AS default": "one user",
    "CREATE FUNCTION sw_shadow AS (x) -> x + 1": "user-defined function",
    "create or replace function sw_shadow as (x) -> x": "user-defined function",
    "DROP FUNCTION IF EXISTS sw_shadow": "user-defined function",
    "SYSTEM KILL": "SYSTEM STOP MERGES",  # last two: on code that runs them, they end the engine (and more)
    "SYSTEM SHUTDOWN": "SYSTEM STOP MERGES",
}


def test_statements_that_change_a_pooled_session_are_refused_and_change_nothing(
    engine: EngineProcess, tmp_path: Path
) -> None:
    """Handles are pooled: before, a ``SET``/``USE``/temporary table in one request's text (also behind comments, in
    odd case, or after a first statement: chDB runs every statement of ``a; b``) stayed on the handle, and the next
    request that got it ran with another setting, in another database, or read the temporary table instead of the
    real one. Now ClickHouse's parser tells what the statement is and such statements get a 400 saying what to do
    instead; the next request on the same client (the same handle: a pool gives back the handle just returned)
    sees the session unchanged. Failed on the first statement before (it ran)."""
    client = connect(Settings(data_dir=tmp_path, clickhouse_url=engine.url("sessions")))
    probe = "SELECT getSetting('max_threads'), currentDatabase(), (SELECT max(x) FROM shadowed)"
    try:
        client.command("CREATE TABLE shadowed (x UInt8) ENGINE = MergeTree ORDER BY x")
        client.insert("shadowed", [[1]], column_names=["x"])
        before = client.query(probe).result_rows
        assert before[0][1:] == ("sessions", 1)
        for statement, instead in [*_SESSION_CHANGES.items(), ("SET max_threads = 3", "settings")]:  # twice
            with pytest.raises(DatabaseError) as raised:
                client.command(statement)
            assert instead in str(raised.value), statement
            assert client.query(probe).result_rows == before, statement
        # the insert path: the statement's target is the client's text too
        query = urllib.parse.urlencode(
            {"query": "INSERT INTO shadowed VALUES (7); SET max_threads = 3; INSERT INTO shadowed FORMAT TSV"}
        )
        status, body, _ = _request(engine, f"/?database=sessions&{query}", _basic(USER, engine.password), b"2\n")
        assert status == 400 and b"Expected INSERT INTO table" in body
        assert client.query(probe).result_rows == before
        # what clickhouse-connect sends for its own work is served as before
        assert client.query("SELECT 2", settings={"max_threads": 2}).result_rows == [(2,)]
        client.insert("shadowed", [[3]], column_names=["x"])
        assert client.query("SELECT {n:UInt8} + max(x) FROM shadowed", parameters={"n": 1}).result_rows == [(4,)]
        assert client.command("SELECT 'a; SET max_threads = 3'") == "a; SET max_threads = 3"
        client.command("SYSTEM STOP MERGES")  # the backfill's
        client.command("sYsTeM start merges")
        assert client.query("SELECT count() FROM system.functions WHERE name = 'sw_shadow'").result_rows == [(0,)]
    finally:
        client.close()


@pytest.fixture
def small_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineProcess]:
    """An engine process of its own (no other test's connections) that runs 2 requests at once (2 more wait)
    and serves 8 connections."""
    root = tmp_path_factory.mktemp("small-engine")
    with EngineProcess(root / "chdb", root / "engine.log", max_requests=2) as engine:
        yield engine


class _Fifos:
    """Named pipes a request reads with ``file()``: the request blocks in the engine until the test releases it.
    ``readers()`` tells which pipes a request has open (it is running in the engine); each is held until released."""

    def __init__(self, root: Path, n: int) -> None:
        import os

        self.paths = [root / f"block-{i}" for i in range(n)]
        for path in self.paths:
            os.mkfifo(path)
        self.held: dict[int, int] = {}
        self.released: set[int] = set()

    def query(self, i: int) -> str:
        return f"SELECT count() FROM file('{self.paths[i]}', 'LineAsString', 'line String')"

    def readers(self) -> set[int]:
        """Pipes a request has opened so far (the write end is opened and held, so the request keeps waiting)."""
        import os

        for i, path in enumerate(self.paths):
            if i not in self.held and i not in self.released:
                with contextlib.suppress(OSError):  # ENXIO: no reader yet
                    self.held[i] = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        return set(self.held)

    def release(self, i: int) -> None:
        import os

        fd = self.held.pop(i)
        os.write(fd, b"one line\n")
        os.close(fd)
        self.released.add(i)

    def release_all(self) -> None:
        for i in range(len(self.paths)):
            self.readers()
            if i in self.held:
                self.release(i)


def test_requests_beyond_the_cap_wait_their_turn_and_beyond_the_queue_get_503(
    small_engine: EngineProcess, tmp_path: Path
) -> None:
    """Before, every request ran at once, each on a handle and a thread of its own: a burst of requests grew the
    engine process without a bound. Now 2 run (the cap), 2 wait, and the rest get 503 with Retry-After at once,
    as ClickHouse's TOO_MANY_SIMULTANEOUS_QUERIES, which clickhouse-connect retries and then raises. Requests
    that block in the engine until the test releases them (reads of named pipes) show what runs: never more than
    2, and every waiting request runs and answers once a slot is free. Failed before: no request got 503 (the
    wait for two of them timed out) and all 6 ran at once."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    fifos = _Fifos(tmp_path, 6)
    auth = _basic(USER, small_engine.password)

    def send(i: int) -> tuple[int, bytes, dict[str, str]]:
        # waits as long as the test holds the pipes: the timeout only ends a test gone wrong
        return _request(small_engine, "/?" + urllib.parse.urlencode({"query": fifos.query(i)}), auth, timeout=600)

    def wait_for_readers(n: int) -> set[int]:
        for _ in range(600):
            readers = fifos.readers()
            assert len(readers) <= 2, f"{len(readers)} requests run at once"
            if len(readers) >= n:
                return readers
            time.sleep(0.1)
        raise AssertionError(f"{n} requests should run; {fifos.readers()} do")

    client = connect(Settings(data_dir=tmp_path, clickhouse_url=small_engine.url("default")), create=False)
    pool = ThreadPoolExecutor(6)
    try:
        running = [pool.submit(send, i) for i in (0, 1)]
        assert wait_for_readers(2) == {0, 1}
        rest = {pool.submit(send, i): i for i in range(2, 6)}
        refused: list[tuple[int, bytes, dict[str, str]]] = []
        pending = set(rest)
        for _ in range(1200):
            done, pending = wait(pending, timeout=0.1, return_when=FIRST_COMPLETED)
            refused += [future.result() for future in done]
            assert len(fifos.readers()) <= 2, f"{len(fifos.readers())} requests run at once"
            if len(refused) >= 2:
                break
        else:
            raise AssertionError("no request was refused while 2 ran and 2 waited")
        assert fifos.readers() == {0, 1} and len(pending) == 2  # the other two wait, not run
        for status, body, headers in refused:
            assert (status, headers.get("Retry-After"), headers.get("X-ClickHouse-Exception-Code")) == (503, "1", "202")
            assert b"TOO_MANY_SIMULTANEOUS_QUERIES" in body
        # a clickhouse-connect client retries a 503 on a read, then raises ClickHouse's error
        with pytest.raises(DatabaseError) as raised:
            client.query("SELECT 1")
        assert raised.value.code == 202
        # a slot frees: a waiting request runs (still 2 at most), then the other, and each answers
        for blocker in (0, 1):
            fifos.release(blocker)
            assert running[blocker].result(timeout=120)[:2] == (200, b"1\n")
        waiting = wait_for_readers(2)
        assert waiting == {rest[future] for future in pending}
        for i in waiting:
            fifos.release(i)
        assert [future.result(timeout=120)[:2] for future in pending] == [(200, b"1\n")] * 2
        assert client.query("SELECT 1").result_rows == [(1,)]
    finally:
        fifos.release_all()
        pool.shutdown(wait=True)
        client.close()


def test_connections_beyond_the_cap_wait_in_the_backlog_and_are_then_served(small_engine: EngineProcess) -> None:
    """A connection holds a server thread for as long as the client keeps it open; before, threads grew with
    connections. Now the engine serves 8 (4 times its 2 requests) and accepts a 9th once one of them closes:
    it waits, it is not refused. Failed before: the 9th was answered while 8 were open."""

    token = base64.b64encode(f"{USER}:{small_engine.password}".encode()).decode()
    ping = f"GET /ping HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {token}\r\n\r\n".encode()

    def open_and_ping() -> socket.socket:
        connection = socket.create_connection(("127.0.0.1", small_engine.port), timeout=120)
        connection.sendall(ping)
        return connection

    held = []
    try:
        for _ in range(8):
            held.append(open_and_ping())
            assert held[-1].recv(4096).startswith(b"HTTP/1.1 200")
        ninth = open_and_ping()
        held.append(ninth)
        # not answered while 8 connections are open (the wait only bounds how long the test looks)
        assert not has_input(ninth, 1)
        held.pop(0).close()
        assert ninth.recv(4096).startswith(b"HTTP/1.1 200")
    finally:
        for connection in held:
            connection.close()


#: Analysts' statements that must not reach outside the database: files, the network, processes, the calling
#: process's Python objects (chDB's ``python()``), chDB's arrow registry; and INTO OUTFILE. (Every family of
#: DENIED_FUNCTION_PREFIXES is tried against the worker's /sql in tests/integration/test_security.py.)
_OUTSIDE = [
    "SELECT * FROM file('{secret}', 'LineAsString')",
    "SELECT file('{secret}')",
    "SELECT * FROM url('http://127.0.0.1:1/', 'CSV', 'a String')",
    "SELECT * FROM remote('127.0.0.1:1', system.one)",
    "SELECT * FROM executable('x.sh', 'CSV', 'a String')",
    "SELECT * FROM python(password)",
    "SELECT * FROM arrowstream('x')",
    "SELECT * FROM bigquery('p', 'd', 't', 'token')",
    "SELECT * FROM eval('1')",
    "SELECT * FROM loop(numbers(1)) LIMIT 1",
    "SELECT x FROM (SELECT 1 AS x) AS a JOIN fuzzJSON('{{}}') AS b ON 1",
    "SELECT 1 WHERE 1 IN (SELECT * FROM generateRandom('a UInt8'))",
    "SELECT 'x' INTO OUTFILE '{outfile}'",
]


@pytest.mark.parametrize("where", ["in-process engine", "engine process"])
def test_analysts_sql_reads_no_file_reaches_no_network_and_uses_only_allowed_table_functions(
    where: str, engine: EngineProcess, ch: Any, ch_settings: Settings, tmp_path: Path
) -> None:
    """Analysts (``synthwatch sql``, the worker's /sql) are the widest audience. On both engine paths every
    function family that reaches outside the database and INTO OUTFILE are refused by the check, and a table
    function is one of a short allow-list. Before, chDB's own table functions (``python()`` reads the calling
    process's Python objects, ``bigquery()``, ``arrowstream()``, ``eval()``) passed the check and were stopped by
    ``readonly=1`` alone, ``arrowstream()`` not even by it (it reached chDB's arrow registry): failed on those."""
    from synthwatch.stream_apps.storage.query import QueryError, analyst_client, execute_analyst

    if where == "engine process":
        settings = Settings(data_dir=tmp_path / "data", clickhouse_url=engine.url("analysts"))
        connect(settings).close()  # the database exists, as the worker's does
    else:
        settings = ch_settings
    client = analyst_client(settings)  # what run_query and the worker's /sql use
    secret, outfile = tmp_path / "secret.txt", tmp_path / "out.txt"
    secret.write_text("top-secret\n")
    try:
        for template in _OUTSIDE:
            sql = template.format(secret=secret, outfile=outfile)
            with pytest.raises(QueryError) as raised:
                execute_analyst(client, sql)
            assert "not allowed" in str(raised.value), (sql, str(raised.value))
            assert "top-secret" not in str(raised.value)
        assert not outfile.exists()
        allowed = {
            "SELECT count() FROM numbers(3)": [[3]],
            "SELECT count() FROM generate_series(1, 3)": [[3]],
            "SELECT * FROM values('x UInt8', 1)": [[1]],
            "SELECT number FROM numbers(2) WHERE number IN (SELECT * FROM numbers(1))": [[0]],
        }
        for sql, rows in allowed.items():
            assert execute_analyst(client, sql).rows == rows, sql
    finally:
        client.close()


def test_clients_without_the_password_cannot_hold_the_connections_by_trickling_headers(
    ch: Any, ch_settings: Settings, tmp_path: Path
) -> None:
    """Connections are capped before a request shows the password, and the 30 s timeout was per read: a client
    sending a header byte now and then held a connection for ever, and as many such clients as the cap held the
    engine from everyone. Now a connection's first request line and headers must all arrive within a deadline
    (here 0.5 s; HEADER_SECONDS in the engine process). Two trickling clients on a server of two connections:
    the server closes both, then serves a client with the password. Failed before: neither was closed (the wait
    for it ran out) and the authorised client was never answered."""
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    engine = Engine(ch_settings.embedded_clickhouse_path, tmp_path)
    server = EngineHTTPServer(listener, make_handler(engine, "p" * 24, header_seconds=0.5), max_connections=2)
    threading.Thread(target=server.serve_forever, name="engine-server", daemon=True).start()
    port = listener.getsockname()[1]
    slow = [socket.create_connection(("127.0.0.1", port), timeout=60) for _ in range(2)]
    try:
        for connection in slow:
            connection.sendall(b"GET /ping HTTP/1.1\r\n")
        open_ = list(slow)
        for _ in range(600):  # a byte every 0.1 s on each, until the server has closed both (the bound: a failure)
            for connection in list(open_):
                if has_input(connection, 0):
                    with contextlib.suppress(OSError):
                        assert connection.recv(4096) == b""  # closed, no answer
                    open_.remove(connection)
                else:
                    with contextlib.suppress(OSError):
                        connection.sendall(b"X")
            if not open_:
                break
            time.sleep(0.1)
        assert not open_, "the trickling clients still hold their connections"
        answer = _request(_Port(port), "/ping", _basic(USER, "p" * 24), timeout=60)
        assert answer[:2] == (200, b"Ok.\n")
    finally:
        for connection in slow:
            connection.close()
        server.shutdown()
        server.server_close()
        engine.close()


class _Port:
    def __init__(self, port: int) -> None:
        self.port = port


def test_a_failed_request_on_an_idle_engine_does_not_close_its_last_chdb_handle(
    ch_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """chDB stops its engine when its last handle closes and starts it again on the next connect, and each
    restart leaves ~5 threads and ~8 descriptors behind (chDB 26.9): the engine process grew per failed request
    (a failed request's handle is discarded, and an idle engine had only that one). Handles open are counted
    through a wrapper of chdb; from the engine's start to its close they must never reach zero. Failed before:
    they did after the first failed request."""
    import chdb

    open_counts = count_chdb_handles(monkeypatch)
    engine = Engine(ch_settings.embedded_clickhouse_path, tmp_path)
    try:
        for _ in range(3):
            with pytest.raises(chdb.ChdbError):
                engine.execute("SELECT no_such_column", None, {}, "TabSeparated")
            engine.execute("SELECT 1", None, {}, "TabSeparated")
    finally:
        engine.close()
    assert open_counts[-1] == 0, "the engine left chDB handles open"
    assert 0 not in open_counts[:-1], f"the engine closed its last chDB handle while running: {open_counts}"


def test_a_freed_slot_goes_to_the_oldest_waiting_request_not_to_a_newcomer() -> None:
    """Admission is first come, first served. Before, a freed slot went to whoever took the condition's lock
    first: a request arriving as the slot freed took it ahead of one that had waited (under a stream of
    analysts' queries a sink insert could wait for ever). Here the newcomer asks in the same thread, right
    after the slot frees, and still goes after the waiter; beyond the queue it is refused at once. Deterministic on
    this code (the slot is handed over as it frees); on the condition variable's it failed as a rule, not always
    (which thread took the lock first was the scheduler's choice)."""
    admission = Admission(limit=1, queue=1)
    entered: list[str] = []
    first = contextlib.ExitStack()
    first.enter_context(admission.slot())

    def waiter() -> None:
        with admission.slot():
            entered.append("waiter")

    waiting = threading.Thread(target=waiter)
    waiting.start()
    wait_until(lambda: admission.waiting == 1, 60, "the second request to wait for the slot")
    with pytest.raises(Busy), admission.slot():  # one running, one waiting: a third is refused, not queued
        pass
    first.close()  # the slot frees: it is the waiter's now, whatever this thread does next
    with admission.slot():
        entered.append("newcomer")
    waiting.join(60)
    assert entered == ["waiter", "newcomer"]
    assert admission.waiting == 0


def test_an_insert_whose_data_does_not_parse_names_the_request_body_not_a_path_of_the_engine(
    engine: EngineProcess,
) -> None:
    """The engine takes inserted data from a spool file of its own; its parse error named that file's path
    (the engine process's temporary directory), which is not the client's to know."""
    auth = _basic(USER, engine.password)
    query = urllib.parse.urlencode({"query": "CREATE TABLE IF NOT EXISTS spool_errors (n UInt8) ENGINE = Memory"})
    assert _request(engine, "/?" + query, auth)[0] == 200
    insert = urllib.parse.urlencode({"query": "INSERT INTO spool_errors FORMAT TSV"})
    status, body, _ = _request(engine, "/?" + insert, auth, body=b"not a number\n")
    assert status == 500 and b"Code: " in body
    assert b"the request body" in body and b"synthwatch-engine-" not in body and b".data" not in body
