"""Issue 12's attacks, reproduced against the real embedded stack (Tansu, worker process, chDB): each must fail.

One worker for the module (its own data dir and topics on the session broker); the attacks talk to its
web port as an attacker on the same machine (or a web page in the analyst's browser) would.
"""

from __future__ import annotations

import http.client
import json
import os
import stat
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from synthwatch.broker import EmbeddedBroker
from synthwatch.query import QueryError, execute_remote
from synthwatch.runtime import read_web_token, stack_file, web_token_file

from .conftest import RunningWorker, isolated_settings, run_cli, start_worker, stop_worker, wait_until
from .factories import lab

pytestmark = pytest.mark.integration

#: The worker's analyst queries stop after this long; long enough that the "ingestion goes on" test can
#: store an event while one runs, however loaded the machine.
SQL_SECONDS = 30


@pytest.fixture(scope="module")
def worker(broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningWorker]:
    data_dir = tmp_path_factory.mktemp("secure-worker")
    settings = isolated_settings(broker, data_dir, sql_max_seconds=SQL_SECONDS, sql_max_rows=1000)
    running = start_worker(settings, data_dir / "worker.log")
    try:
        yield running
    finally:
        stop_worker(running)


def post(
    worker: RunningWorker,
    path: str,
    body: bytes | dict[str, Any],
    *,
    token: str | None = "own",
    headers: dict[str, str] | None = None,
    method: str = "POST",
) -> tuple[int, dict[str, Any] | str]:
    """One raw HTTP request to the worker, headers exactly as given (``token="own"``: the real token)."""
    parts = urlsplit(worker.info.web_url)
    sent = {"Content-Type": "application/json", "Host": parts.netloc}
    if token == "own":
        token = read_web_token(worker.settings)
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    sent.update(headers or {})
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=120)
    try:
        connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for key, value in sent.items():
            connection.putheader(key, value)
        connection.putheader("Content-Length", str(len(data)))
        connection.endheaders(data)
        response = connection.getresponse()
        text = response.read().decode("utf-8", errors="replace")
    finally:
        connection.close()
    try:
        return response.status, json.loads(text)
    except ValueError:
        return response.status, text


def sql(worker: RunningWorker, query: str, **kwargs: Any) -> tuple[int, dict[str, Any] | str]:
    return post(worker, "/sql", {"sql": query}, **kwargs)


def error_of(answer: dict[str, Any] | str) -> str:
    return answer.get("error", "") if isinstance(answer, dict) else answer


# --- /sql: what a query may do -----------------------------------------------------------------------


def test_select_still_works_with_the_token(worker: RunningWorker) -> None:
    status, answer = sql(worker, "SELECT count() AS n FROM lab_detections")
    assert status == 200, answer
    assert isinstance(answer, dict) and answer["columns"] == ["n"]


@pytest.mark.parametrize(
    "query",
    [
        "SELECT * FROM file('/etc/passwd', 'LineAsString')",
        "SELECT file('/etc/passwd')",  # the function: readonly=1 alone let this one through
        "SELECT FILE('/etc/passwd')",
        "SELECT * FROM (SELECT file('/etc/passwd') AS f)",
    ],
)
def test_no_file_can_be_read(worker: RunningWorker, query: str) -> None:
    status, answer = sql(worker, query)
    assert status == 400
    assert "root:" not in json.dumps(answer)


def test_into_outfile_writes_nothing(worker: RunningWorker, tmp_path: Path) -> None:
    """The reported code execution: INTO OUTFILE '<venv>/site-packages/x.pth'. Here: any path at all."""
    target = tmp_path / "evil.pth"
    for query in (
        f"SELECT 'import os' INTO OUTFILE '{target}'",
        f"SELECT 'import os' INTO OUTFILE '{target}' FORMAT TabSeparatedRaw",
        f"SELECT 1 /* ) */ INTO OUTFILE '{target}' -- ",
        f"WITH 1 AS x SELECT x INTO OUTFILE '{target}' TRUNCATE",
    ):
        status, answer = sql(worker, query)
        assert status == 400, (query, answer)
        assert "INTO OUTFILE" in error_of(answer)
    assert not target.exists()


def test_url_is_refused_at_once(worker: RunningWorker) -> None:
    """It hung 30 s+ against a closed port; now it never connects."""
    for query in (
        "SELECT * FROM url('http://127.0.0.1:1/', 'CSV', 'x String')",
        "SELECT * FROM s3('http://127.0.0.1:1/a')",
    ):
        status, answer = sql(worker, query)
        assert status == 400 and "not allowed" in error_of(answer), answer


@pytest.mark.parametrize(
    "query",
    [
        "SELECT 1 SETTINGS readonly=0",
        "SELECT 1 SETTINGS max_execution_time=0",
        "SELECT * FROM (SELECT 1 SETTINGS readonly=0)",
    ],
)
def test_settings_cannot_be_changed(worker: RunningWorker, query: str) -> None:
    status, answer = sql(worker, query)
    assert status == 400, answer
    assert "SETTINGS" in error_of(answer) or "readonly" in error_of(answer)


@pytest.mark.parametrize(
    "query",
    [
        "DROP TABLE lab_detections",
        "SELECT 1; DROP TABLE lab_detections",
        "INSERT INTO rejects (reject_id) VALUES ('x')",
        "ALTER TABLE lab_detections DELETE WHERE 1",
        "SET readonly = 0",
        "SYSTEM SHUTDOWN",
        "CREATE TABLE x (a UInt8) ENGINE = Memory",
    ],
)
def test_only_select_statements_run(worker: RunningWorker, query: str) -> None:
    status, answer = sql(worker, query)
    assert status == 400, answer
    status, answer = sql(
        worker, "SELECT count() FROM system.tables WHERE database = currentDatabase() AND name = 'lab_detections'"
    )
    assert status == 200 and isinstance(answer, dict) and answer["rows"] == [[1]]


def test_result_rows_are_capped(worker: RunningWorker) -> None:
    status, answer = sql(worker, "SELECT number FROM numbers(5000)")
    assert status == 400 and "TOO_MANY_ROWS" in error_of(answer)


@pytest.mark.slow
def test_a_slow_query_neither_stalls_ingestion_nor_runs_past_its_limit(worker: RunningWorker) -> None:
    """It held the sink lock 45 s; now it runs on a handle of its own and stops at max_execution_time."""
    marker = uuid.uuid4().hex
    slow = f"SELECT count() FROM numbers(1000000000000) WHERE NOT ignore(sipHash64(number, '{marker}'))"
    outcome: dict[str, Any] = {}

    def run() -> None:
        outcome["answer"] = sql(worker, slow)

    thread = threading.Thread(target=run)
    thread.start()
    # running: the engine lists it (the check's own text does not contain the marker as one string)
    wait_until(
        lambda: worker.count(
            "SELECT count() FROM system.processes WHERE position(query, {m:String}) > 0", {"m": marker}
        ),
        30,
        "the slow query to be running",
    )
    event_id = f"sec-{marker}"
    run_cli(worker.settings, "publish", "-", "--format", "ndjson", input=json.dumps(lab(event_id=event_id)) + "\n")
    wait_until(
        lambda: worker.count("SELECT count() FROM lab_detections WHERE event_id = {e:String}", {"e": event_id}),
        SQL_SECONDS,
        "the event published during the slow query to be stored",
    )
    assert thread.is_alive(), "the slow query ended before the event was stored: the test proved nothing"
    thread.join(SQL_SECONDS + 30)
    status, answer = outcome["answer"]
    assert status == 400 and "TIMEOUT_EXCEEDED" in error_of(answer), answer


# --- /sql: who may ask -------------------------------------------------------------------------------


def test_no_token_no_answer(worker: RunningWorker) -> None:
    assert sql(worker, "SELECT 1", token=None)[0] == 401
    assert sql(worker, "SELECT 1", token="x" * 43)[0] == 401
    assert sql(worker, "SELECT 1", token="")[0] == 401


def test_browser_requests_are_refused(worker: RunningWorker) -> None:
    """CSRF (any page POSTs text/plain with an Origin) and DNS rebinding (a foreign Host name)."""
    assert sql(worker, "SELECT 1", headers={"Origin": "https://evil.example"})[0] == 403
    assert sql(worker, "SELECT 1", headers={"Origin": "null"})[0] == 403
    assert sql(worker, "SELECT 1", headers={"Host": "evil.example:6066"})[0] == 403
    assert sql(worker, "SELECT 1", headers={"Content-Type": "text/plain"})[0] == 415
    assert sql(worker, "SELECT 1", headers={"Content-Type": "application/x-www-form-urlencoded"})[0] == 415
    # loopback names are fine
    assert sql(worker, "SELECT 1", headers={"Host": f"localhost:{urlsplit(worker.info.web_url).port}"})[0] == 200


def test_faust_views_are_off(worker: RunningWorker) -> None:
    for path in ("/table/", "/table/detector-regions/", "/router/", "/graph/", "/stats/", "/performance/"):
        status, _ = post(worker, path, b"", method="GET")
        assert status == 404, path


def test_the_client_without_the_token_file_is_told_what_to_do(worker: RunningWorker) -> None:
    with pytest.raises(QueryError, match="web-token"):
        execute_remote(worker.info.web_url, "SELECT 1", token=None)


# --- files and secrets -------------------------------------------------------------------------------


def test_token_and_stack_files_are_private(worker: RunningWorker) -> None:
    assert stat.S_IMODE(os.stat(worker.settings.data_dir).st_mode) == 0o700
    for path in (web_token_file(worker.settings), stack_file(worker.settings)):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path


def test_every_start_makes_a_new_token(broker: EmbeddedBroker, tmp_path: Path) -> None:
    settings = isolated_settings(broker, tmp_path / "data")
    first = start_worker(settings, tmp_path / "first.log")
    token = read_web_token(settings)
    stop_worker(first)
    second = start_worker(settings, tmp_path / "second.log")
    try:
        assert token and read_web_token(settings) and read_web_token(settings) != token
        status, _ = sql(second, "SELECT 1", token=token)
        assert status == 401
    finally:
        stop_worker(second)


def test_status_and_stack_file_show_no_clickhouse_password(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """A worker on a password-protected ClickHouse URL: neither stack.json nor `synthwatch status` holds it.

    The URL is a server one (nothing listens there): the worker is not started; the stack file it would
    write is written by the same function, and `status` reads it.
    """
    from synthwatch.runtime import StackInfo, write_stack

    settings = isolated_settings(broker, tmp_path / "data")
    secret = "s3cr3t-" + uuid.uuid4().hex
    write_stack(
        settings,
        StackInfo(
            pid=os.getpid(),
            bootstrap_servers=broker.bootstrap_servers,
            web_url="http://127.0.0.1:1",
            clickhouse_url=f"https://synthwatch:{secret}@clickhouse.example:8443/synthwatch?password={secret}",
            started_at="2026-01-01T00:00:00+00:00",
        ),
    )
    assert secret not in stack_file(settings).read_text()
    assert stat.S_IMODE(os.stat(stack_file(settings)).st_mode) == 0o600
    # `status` from another process (pid of this test process: alive, so the file counts as running)
    result = run_cli(settings, "status")
    assert result.returncode == 0, result.stderr
    assert secret not in result.stdout + result.stderr
    assert "synthwatch:***@clickhouse.example" in result.stdout
