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

from synthwatch.producers.publisher import Publisher
from synthwatch.producers.readers import InputRecord
from synthwatch.stack.broker import EmbeddedBroker, high_watermarks
from synthwatch.stackfile import read_web_token, stack_file, web_token_file
from synthwatch.stream_apps.storage.query import QueryError, execute_remote
from tests.conftest import RunningWorker, isolated_settings, run_cli, start_worker, stop_worker, wait_until
from tests.support.factories import lab

pytestmark = pytest.mark.integration

#: The worker's analyst queries stop after this long; long enough that the "ingestion goes on" test can
#: store an event while one runs, however loaded the machine. That test waits this long for the limit, so
#: it is no longer than needed: its event is sent by a producer connected beforehand, so the window holds
#: only the worker's fetch, checkpoint (1 s) and insert, not a `synthwatch publish` process starting (a few
#: seconds under load, which the 30 s this was had to cover too).
SQL_SECONDS = 20


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


@pytest.mark.parametrize(
    "query",
    [
        "SELECT dictGetOrDefault('d', 'a', toUInt64(1), 'x')",
        "SELECT dictGetString('d', 'a', toUInt64(1))",
        "SELECT DICTGETSTRING('d', 'a', toUInt64(1))",
        "SELECT dictHas('d', toUInt64(1))",
        "SELECT * FROM dictionary('d')",
        "SELECT * FROM s3Cluster('c', 'http://127.0.0.1:1/x', 'CSV', 'a String')",
        "SELECT * FROM urlCluster('c', 'http://127.0.0.1:1/x', 'CSV', 'a String')",
        "SELECT * FROM remoteSecure('127.0.0.1:1', system.one)",
        "SELECT * FROM input('a String')",
        "SELECT * FROM jdbc('jdbc:mysql://h/db', 't')",
        "SELECT * FROM odbc('DSN=x', 't')",
        "SELECT * FROM hdfs('hdfs://h/f', 'CSV', 'a String')",
        "SELECT * FROM mysql('h:3306', 'db', 't', 'u', 'p')",
        "SELECT * FROM postgresql('h:5432', 'db', 't', 'u', 'p')",
        "SELECT * FROM executable('x.sh', 'CSV', 'a String')",
        "SELECT * FROM executablePool('x.sh', 'CSV', 'a String')",
        "SELECT * FROM icebergS3('http://127.0.0.1:1/x')",
        "SELECT count() FROM numbers(1) WHERE dictGetOrNull('d', 'a', number) IS NULL",  # nested in WHERE
    ],
)
def test_every_member_of_an_outside_reaching_function_family_is_refused(worker: RunningWorker, query: str) -> None:
    """The check matched exact names, so variants (dictGetOrDefault, dictGetString, ...) got past it."""
    status, answer = sql(worker, query)
    assert status == 400, answer
    assert "reaches outside the database" in error_of(answer)


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


def test_result_bytes_are_capped(worker: RunningWorker) -> None:
    """40 rows of 1 MiB pass the row cap: before the byte cap, such a result became GiB of Python objects and JSON
    in the worker that ingests (400 rows: 417 -> 2,391 MiB). Now it stops at 32 MiB: in the engine for a column
    it materialises, while reading for a constant one (the engine counts that once per block)."""
    status, answer = sql(worker, "SELECT repeat(toString(number % 2 + 10), 524288) FROM numbers(40)")
    assert status == 400 and "TOO_MANY_ROWS_OR_BYTES" in error_of(answer), answer
    status, answer = sql(worker, "SELECT repeat('xx', 524288) FROM numbers(40)")
    assert status == 400 and "larger than 33554432 bytes" in error_of(answer), answer
    status, answer = sql(worker, "SELECT length(repeat('xx', 524288)) FROM numbers(40)")
    assert status == 200 and isinstance(answer, dict) and len(answer["rows"]) == 40, answer
    # Wrapped in an array, a map or a tuple, the text counted as one value of 8 bytes: 40 MiB passed.
    for wrapped in ("[repeat('xx', 524288)]", "map('k', repeat('xx', 524288))", "tuple(repeat('xx', 524288), 1)"):
        status, answer = sql(worker, f"SELECT {wrapped} FROM numbers(40)")
        assert status == 400 and "larger than 33554432 bytes" in error_of(answer), (wrapped, answer)


@pytest.mark.slow
def test_a_slow_query_neither_stalls_ingestion_nor_runs_past_its_limit(worker: RunningWorker) -> None:
    """It held the sink lock 45 s; now it runs on a handle of its own and stops at max_execution_time."""
    marker = uuid.uuid4().hex
    slow = f"SELECT count() FROM numbers(1000000000000) WHERE NOT ignore(sipHash64(number, '{marker}'))"
    outcome: dict[str, Any] = {}
    event_id = f"sec-{marker}"

    def run() -> None:
        outcome["answer"] = sql(worker, slow)

    # connected before the query starts: the window below holds only the worker storing the event
    with Publisher(worker.settings, worker.settings.kafka_bootstrap_servers) as publisher:
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
        sent = publisher.publish_records([InputRecord(source="slow:0", raw=json.dumps(lab(event_id=event_id)))])
        assert sent.sent == 1, sent
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
    from synthwatch.stackfile import StackInfo, write_stack

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


# --- 7. the publisher: bad records are rejected with a reason, the run goes on -------------------------


def _summary(stdout: str) -> dict[str, int]:
    """The numbers of `synthwatch publish`'s summary table."""
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.replace("┃", "│").split("│") if c.strip()]
        if len(cells) == 5 and all(c.isdigit() for c in cells):
            return dict(zip(["read", "sent", "rejected", "duplicates", "failed"], map(int, cells), strict=True))
    raise AssertionError(f"no summary in output:\n{stdout}")


def _stored_ids(worker: RunningWorker, prefix: str) -> set[str]:
    rows = worker.query(
        "SELECT event_id FROM lab_detections WHERE startsWith(event_id, {p:String})", {"p": prefix}
    ).rows
    return {str(r[0]) for r in rows}


def _rejects(worker: RunningWorker, prefix: str) -> list[str]:
    return [
        str(r[0])
        for r in worker.query(
            "SELECT reason FROM rejects WHERE startsWith(source, {p:String}) ORDER BY source", {"p": prefix}
        ).rows
    ]


def test_a_csv_cell_over_128_kib_rejects_its_row_only(worker: RunningWorker, tmp_path: Path) -> None:
    prefix = f"big{uuid.uuid4().hex[:6]}"
    path = tmp_path / f"{prefix}.csv"
    header = "event_id,kind,occurred_at,country,region,substance.name,lab_id,sample_id,sample_type,method"
    row = "{id},lab_detection,2026-03-02T09:00:00Z,FR,FR-75C,{name},LAB-1,S-1,seized_material,GC-MS"
    path.write_text(
        "\n".join(
            [
                header,
                row.format(id=f"{prefix}-1", name="3-MMC"),
                row.format(id=f"{prefix}-2", name="x" * (600 * 1024)),  # over Python's 128 KiB and our 512 KiB
                row.format(id=f"{prefix}-3", name="3-MMC"),
            ]
        )
        + "\n"
    )
    done = run_cli(worker.settings, "publish", str(path))
    assert done.returncode == 1, done.stderr  # one row rejected, the others sent
    assert "Traceback" not in done.stderr
    assert _summary(done.stdout) == {"read": 3, "sent": 2, "rejected": 1, "duplicates": 0, "failed": 0}
    wait_until(lambda: _stored_ids(worker, prefix) == {f"{prefix}-1", f"{prefix}-3"}, 60, "the two good rows")
    reasons = wait_until(lambda: _rejects(worker, path.name), 60, "the reject of the big row")
    assert len(reasons) == 1 and "CSV row unreadable: field larger than field limit" in reasons[0]


def test_a_header_nested_60000_levels_deep_is_refused_with_a_reason(worker: RunningWorker, tmp_path: Path) -> None:
    prefix = f"deep{uuid.uuid4().hex[:6]}"
    path = tmp_path / f"{prefix}.csv"
    deep = ".".join(["x"] * 60_000)
    path.write_text(f"event_id,kind,{deep}\n{prefix}-1,lab_detection,1\n{prefix}-2,lab_detection,2\n")
    done = run_cli(worker.settings, "publish", str(path))
    assert done.returncode == 2, done.stderr  # nothing sent
    assert "RecursionError" not in done.stderr + done.stdout
    assert _summary(done.stdout) == {"read": 2, "sent": 0, "rejected": 2, "duplicates": 0, "failed": 0}
    reasons = wait_until(lambda: len(_rejects(worker, path.name)) == 2 and _rejects(worker, path.name), 60, "2 rejects")
    assert all("nests 60,000 levels, at most 8" in r for r in reasons)


def test_a_valid_50_mb_event_is_rejected_as_too_large_and_the_rest_is_sent(
    worker: RunningWorker, tmp_path: Path
) -> None:
    prefix = f"huge{uuid.uuid4().hex[:6]}"
    path = tmp_path / f"{prefix}.ndjson"
    with path.open("w", encoding="utf-8") as out:
        out.write(json.dumps(lab(event_id=f"{prefix}-1")) + "\n")
        out.write(json.dumps(lab(event_id=f"{prefix}-2", note="n" * (50 * 1024 * 1024))) + "\n")  # valid, 50 MB
        out.write(json.dumps(lab(event_id=f"{prefix}-3", **{f"x{i}": i for i in range(100)})) + "\n")  # 100 extras
        out.write(json.dumps(lab(event_id=f"{prefix}-4")) + "\n")
    done = run_cli(worker.settings, "publish", str(path))
    assert done.returncode == 1, done.stderr  # two rejected, the others sent
    assert "MessageSizeTooLargeError" not in done.stderr + done.stdout
    assert _summary(done.stdout) == {"read": 4, "sent": 2, "rejected": 2, "duplicates": 0, "failed": 0}
    wait_until(lambda: _stored_ids(worker, prefix) == {f"{prefix}-1", f"{prefix}-4"}, 60, "the two good events")
    reasons = wait_until(lambda: len(_rejects(worker, path.name)) == 2 and _rejects(worker, path.name), 60, "2 rejects")
    assert reasons[0].startswith("record too large: 52,")
    assert reasons[1].startswith("extra_fields: 100 unknown fields, at most 64")


def test_the_worker_applies_the_same_caps_to_other_producers(worker: RunningWorker) -> None:
    """A producer that skips `synthwatch publish` meets the same limits in the worker."""
    from kafka import KafkaProducer

    prefix = f"direct{uuid.uuid4().hex[:6]}"
    producer = KafkaProducer(bootstrap_servers=worker.settings.kafka_bootstrap_servers, max_request_size=4 << 20)
    try:
        many = lab(event_id=f"{prefix}-1", **{f"x{i}": i for i in range(100)})
        producer.send(worker.settings.topic_lab_detections, key=b"FR-75C", value=json.dumps(many).encode()).get(30)
        ok = lab(event_id=f"{prefix}-2")
        producer.send(worker.settings.topic_lab_detections, key=b"FR-75C", value=json.dumps(ok).encode()).get(30)
    finally:
        producer.close()
    wait_until(lambda: _stored_ids(worker, prefix) == {f"{prefix}-2"}, 60, "the good event")
    reasons = wait_until(
        lambda: worker.query("SELECT reason FROM rejects WHERE event_id = {e:String}", {"e": f"{prefix}-1"}).rows,
        60,
        "the reject of the event with 100 unknown fields",
    )
    assert str(reasons[0][0]).startswith("extra_fields: 100 unknown fields")


# --- 3. report text in the analysts' terminal ---------------------------------------------------------

MARKUP_NAMES = ["[/]", "[link=https://evil.example]Isotonitazene[/link]", ":x: Protonitazene"]


def test_markup_and_escapes_in_stored_data_reach_the_terminal_as_plain_text(
    worker: RunningWorker, tmp_path: Path
) -> None:
    """Names that look like Rich markup are valid reports; an alert that carries ESC, OSC-8 and bidi characters
    (ingest refuses them, so it is written straight to the topic, signed with the worker key as only a worker
    or someone holding its key could) is stored. `alerts`, `stats`, `substance` and `sql` print it as text."""
    from kafka import KafkaProducer

    from synthwatch.stream_apps.runtime.worker_signature import WorkerSigner, worker_key
    from tests.support.delivery_helpers import make_alert

    prefix = f"mk{uuid.uuid4().hex[:6]}"
    path = tmp_path / f"{prefix}.ndjson"
    path.write_text(
        "".join(
            json.dumps(lab(event_id=f"{prefix}-{i}", substance={"name": n})) + "\n" for i, n in enumerate(MARKUP_NAMES)
        )
    )
    done = run_cli(worker.settings, "publish", str(path))
    assert done.returncode == 0 and _summary(done.stdout)["sent"] == 3, done.stdout + done.stderr
    evil = "\x1b]8;;https://evil.example\x07Isotonitazene\x1b]8;;\x07 \x1b[2J\u202eevil"
    alert = make_alert(
        alert_id=f"{prefix}-alert",
        substance=make_alert().substance.model_copy(update={"name": "[/]" + evil}),
        summary=f"[bold]x[/] :x: {evil}\nSeverity: forged line",
    )
    producer = KafkaProducer(bootstrap_servers=worker.settings.kafka_bootstrap_servers)
    try:
        topic, key, value = worker.settings.topic_alerts, alert.alert_id.encode(), alert.model_dump_json().encode()
        signer = WorkerSigner(worker_key(None, worker.settings.data_dir))
        producer.send(topic, key=key, value=value, headers=signer.headers(topic, key, value)).get(30)
    finally:
        producer.close()
    wait_until(lambda: len(_stored_ids(worker, prefix)) == 3, 60, "the three reports")
    wait_until(
        lambda: worker.count("SELECT count() FROM alerts WHERE alert_id = {a:String}", {"a": alert.alert_id}),
        60,
        "the signed hostile alert stored",
    )
    outputs = {
        "alerts": run_cli(worker.settings, "alerts", "--since", "30d"),
        "stats": run_cli(worker.settings, "stats", "--days", "3650"),
        "substance": run_cli(worker.settings, "substance", "[/]"),
        "sql": run_cli(
            worker.settings, "sql", f"SELECT substance_name, summary FROM alerts WHERE alert_id = '{alert.alert_id}'"
        ),
    }
    for command, result in outputs.items():
        text = result.stdout + result.stderr
        assert result.returncode == 0, f"{command}: {text}"
        assert "MarkupError" not in text and "Traceback" not in text, command
        assert "\x1b" not in text and "\u202e" not in text and "\u274c" not in text, f"{command}: {text!r}"
    assert "\\x1b]8;;https://evil.example\\x07Isotonitazene" in outputs["alerts"].stdout
    assert "Severity: forged line" not in outputs["alerts"].stdout.replace("\\nSeverity: forged line", "")
    for name in MARKUP_NAMES:
        assert name in outputs["stats"].stdout, name
    assert "[/]" in outputs["substance"].stdout


def test_an_oversized_request_is_refused_before_it_is_read(worker: RunningWorker) -> None:
    status, answer = post(worker, "/sql", {"sql": "SELECT 1 -- " + "x" * (300 * 1024)})
    assert status == 413, answer


def test_deliveries_shows_hostile_names_and_no_webhook_password(tmp_path: Path) -> None:
    """`synthwatch deliveries` crashed on a substance named ``[/]``; rows also kept ``user:password@``.

    A child process that owns a fresh embedded engine stores one attempt row as the delivery service
    builds it (``target`` from ``WebhookChannel.target``, ``reason`` through ``redact``); the command then
    opens that engine itself (no stack is running).
    """
    import subprocess
    import sys

    from synthwatch.settings import Settings

    settings = Settings(data_dir=tmp_path / "data")
    code = r"""
import sys
from datetime import UTC, datetime
from synthwatch.stream_apps.storage.clickhouse import connect, migrate
from synthwatch.redaction import redact
from synthwatch.settings import Settings
from synthwatch.stream_apps.storage.tables import DELIVERY_COLUMNS, DELIVERY_TABLE
from synthwatch.stream_apps.delivery.subscriptions import WebhookChannel

client = connect(Settings(data_dir=sys.argv[1]))
migrate(client)
channel = WebhookChannel(type="webhook", url="https://officer:hunter2@hooks.example/in", secret_env="HOOK_SECRET")
row = {
    "alert_id": "a1", "officer_id": "[/]", "channel": "webhook", "channel_type": "webhook", "route": "[link=https://evil.example]r[/link]",
    "attempt": 1, "status": "failed", "reason": redact("POST https://officer:hunter2@hooks.example/in: refused"),
    "response_code": None, "target": channel.target, "at": datetime.now(UTC), "duration_ms": 1.0,
    "alert_type": "new_substance", "severity": "critical", "substance": "[/] :x: \x1b]8;;https://e\x07y",
    "region": "ML-BKO", "digest_id": "", "alert_json": "",
    "reported_by": ["[/]"], "budget_day": datetime.now(UTC).date(),
}
client.insert(DELIVERY_TABLE, [[row[c] for c in DELIVERY_COLUMNS]], column_names=DELIVERY_COLUMNS)
client.close()
"""
    prepared = subprocess.run(
        [sys.executable, "-c", code, str(settings.data_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert prepared.returncode == 0, prepared.stderr
    result = run_cli(settings, "deliveries")
    text = result.stdout + result.stderr
    assert result.returncode == 0, text
    assert "MarkupError" not in text and "\x1b" not in text and "\u274c" not in text
    assert "[/]" in result.stdout and ":x:" in result.stdout and "[link=https://evil.example]r[/link]" in result.stdout
    assert "hunter2" not in text
    rows = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from synthwatch.stream_apps.storage.query import run_query; "
            "from synthwatch.settings import Settings; "
            "print(run_query(Settings(data_dir=sys.argv[1]), 'SELECT target, reason FROM deliveries').rows)",
            str(settings.data_dir),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert rows.returncode == 0, rows.stderr
    assert "hunter2" not in rows.stdout and "officer:***@hooks.example" in rows.stdout


# --- forged records on the internal topics (issue 12 item 2: a forged critical alert reached an officer) -------


def test_forged_alerts_and_sightings_are_refused_and_a_real_alert_still_flows(worker: RunningWorker) -> None:
    """Anyone who can write to the alerts or sightings topic (the embedded broker authenticates no one) tried
    to have a critical alert stored and delivered, and a never-seen substance announced. Without a worker's
    signature both are refused and counted; an alert the worker raises itself goes through."""
    from kafka import KafkaProducer

    from tests.support.delivery_helpers import make_alert

    settings = worker.settings
    servers = settings.kafka_bootstrap_servers or ""
    forged = make_alert(alert_id=f"forged{uuid.uuid4().hex[:18]}", severity="critical")
    sighting = [
        {
            "event_id": "forged-sighting",
            "kind": "lab_detection",
            "occurred_at": "2026-12-01T10:00:00+00:00",
            "day": 20788,
            "country": "ML",
            "region": "ML-BKO",
            "key": "FORGEDXXXXXXXX",
            "name": "Evacuate now",
            "inchikey": None,
            "family": None,
            "controlled": None,
            "catalogued": False,
        }
    ]
    before = worker.stats()["forged"]
    producer = KafkaProducer(bootstrap_servers=servers, acks="all")
    producer.send(settings.topic_alerts, key=forged.alert_id.encode(), value=forged.model_dump_json().encode())
    producer.send(settings.topic_sightings, key=b"FORGEDXXXXXXXX", value=json.dumps(sighting).encode())
    # a header that only looks like the worker's
    producer.send(
        settings.topic_alerts,
        key=forged.alert_id.encode(),
        value=forged.model_dump_json().encode(),
        headers=[("synthwatch-worker-sig", b"\0" * 32)],
    )
    producer.flush()
    producer.close()
    wait_until(lambda: worker.stats()["forged"] >= before + 3, 60, "the three forged records to be refused")

    # A report of a substance never seen makes the worker raise a real alert, which is stored.
    name = f"Forgery-check-{uuid.uuid4().hex[:6]}"
    result = run_cli(settings, "publish", "-", input=json.dumps(lab(event_id=f"real-{name}", substance={"name": name})))
    assert result.returncode == 0, result.stdout + result.stderr
    wait_until(
        lambda: (
            worker.count(
                "SELECT count() FROM alerts WHERE alert_type = 'new_substance' AND position(summary, %(n)s) > 0",
                {"n": name},
            )
            == 1
        ),
        60,
        "the worker's own alert for the new substance to be stored",
    )
    assert worker.count("SELECT count() FROM alerts WHERE alert_id = %(a)s", {"a": forged.alert_id}) == 0
    assert worker.count("SELECT count() FROM alerts WHERE position(summary, 'Evacuate') > 0") == 0
    assert worker.stats()["forged"] == before + 3


# --- forged detector state on the changelog (a series record's outbox is sent as a signed alert on restart) ----


def _read_topic(servers: str, topic: str) -> list[Any]:
    """Every record on ``topic`` now, all partitions, from the start to the current end."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=servers, enable_auto_commit=False)
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        # as fetches report it: Tansu answers ListOffsets with the first offset of the last record batch
        end = high_watermarks(servers, [topic])
        assert set(end) == set(partitions), f"no end offset for some partition of {topic} within the timeout"
        records: list[Any] = []
        while any(consumer.position(tp) < end[tp] for tp in partitions):
            for batch in consumer.poll(timeout_ms=1000).values():
                records.extend(batch)
        return records
    finally:
        consumer.close()


def test_forged_detector_state_is_not_restored_and_its_outbox_never_sent(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """A series record written to the detector-regions changelog by anyone but a worker, carrying a spike
    alert in its outbox, was restored at the next start and its alert sent, signed by the worker, to the
    alerts topic (stored, delivered to officers). Now recovery restores only records a worker signed for
    that topic and partition: unsigned, falsely signed, a genuine record moved to another partition, a
    genuine record of the other table's changelog and a record whose key is not JSON (it used to stall
    recovery) are refused, counted as forged and logged; the worker's own state is still restored."""
    from kafka import KafkaProducer

    from tests.support.delivery_helpers import make_alert

    data_dir = tmp_path / "data"
    settings = isolated_settings(broker, data_dir)
    servers = settings.kafka_bootstrap_servers or ""
    changelog = f"{settings.app_id}-detector-regions-changelog"
    running = start_worker(settings, tmp_path / "worker-1.log")
    try:
        name = f"Outbox-check-{uuid.uuid4().hex[:6]}"
        published = run_cli(
            settings, "publish", "-", input=json.dumps(lab(event_id=f"s-{name}", substance={"name": name}))
        )
        assert published.returncode == 0, published.stdout + published.stderr
        wait_until(lambda: running.stats()["checkpointed"] >= 1, 60, "the event's state to be checkpointed")
        wait_until(lambda: running.stats()["alerts_stored"] >= 1, 60, "the worker's own alert to be stored")
    finally:
        assert stop_worker(running) == 0

    series = [r for r in _read_topic(servers, changelog) if r.key and json.loads(r.key).startswith("S:")]
    assert series, "the worker wrote no series record"
    genuine = series[-1]
    assert any(k == "synthwatch-worker-sig" for k, _ in genuine.headers)  # the worker signs its state
    # a signed record of the other table, and the worker's own signed alert (its key is not JSON: recovery
    # used to fail to decode it and then waited for that partition forever)
    other_table = _read_topic(servers, f"{settings.app_id}-detector-substances-changelog")[0]
    own_alert = _read_topic(servers, settings.topic_alerts)[0]
    region = json.loads(genuine.key)[2:].split("|", 1)[0]

    forged_ids = [f"forgedstate{i}{uuid.uuid4().hex[:12]}" for i in range(2)]
    producer = KafkaProducer(bootstrap_servers=servers, acks="all")
    for alert_id, headers in zip(forged_ids, ([], [("synthwatch-worker-sig", b"\1" * 32)]), strict=True):
        record = json.loads(genuine.value)
        record["x"] = [make_alert(alert_id=alert_id, region=region, summary="Evacuate the building").model_dump_json()]
        key = json.dumps(f"S:{region}|FORGED{alert_id[-6:]}").encode()
        producer.send(
            changelog, key=key, value=json.dumps(record).encode(), partition=genuine.partition, headers=headers
        )
        producer.flush()  # a batch each: Tansu 0.6 reports a partition's end as its last batch's first offset + 1
    # a genuine, signed record replayed onto another partition, and one from the other table's changelog
    producer.send(
        changelog, key=genuine.key, value=genuine.value, partition=(genuine.partition + 1) % 4, headers=genuine.headers
    )
    producer.flush()
    producer.send(
        changelog,
        key=other_table.key,
        value=other_table.value,
        partition=other_table.partition,
        headers=other_table.headers,
    )
    producer.flush()
    producer.send(changelog, key=own_alert.key, value=own_alert.value, partition=0, headers=own_alert.headers)
    producer.flush()
    producer.close()

    running = start_worker(settings, tmp_path / "worker-2.log")
    try:
        stats = running.stats()
        assert stats["forged"] == 5, running.describe()
        assert "names_learnt" in stats["rebuild"], "the worker's own state was not restored: " + running.describe()
        # The outbox is sent before the worker reports ready: the alerts topic holds all it ever will.
        sent = {json.loads(r.value).get("alert_id") for r in _read_topic(servers, settings.topic_alerts)}
        assert not sent & set(forged_ids)
        assert running.count("SELECT count() FROM alerts WHERE position(summary, 'Evacuate') > 0") == 0
        refusals = [
            line for line in running.log_path.read_text().splitlines() if "without a valid worker signature" in line
        ]
        assert refusals and all("detector-regions-changelog" in line for line in refusals)
    finally:
        stop_worker(running)


def test_one_of_several_workers_will_not_start_without_a_shared_key(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """Each worker made its own key when none was set: with several replicas, every worker refused the
    others' alerts, sightings and state. Told it is one of several, a worker without a key stops at once
    with one line saying what to set (and makes no key file)."""
    import subprocess
    import sys

    from tests.conftest import cli_env

    settings = isolated_settings(broker, tmp_path / "data", workers=3)
    result = subprocess.run(
        [sys.executable, "-m", "synthwatch.cli.main", "worker"],
        env=cli_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    last = (result.stderr.strip().splitlines() or [""])[-1]
    assert "SYNTHWATCH_WORKERS=3" in last and "SYNTHWATCH_WORKER_KEY" in last, result.stderr
    assert "Traceback" not in result.stderr
    assert not (settings.data_dir / "worker-key").exists()


def test_rejects_not_written_by_a_worker_are_refused(worker: RunningWorker) -> None:
    """Only the worker (and an operator's publisher, which holds the worker key) writes rejects; a forged
    reject written to the topic was stored as if the pipeline had refused a report. Now it is refused and
    counted as forged, while the publisher's own rejects are still stored."""
    from kafka import KafkaProducer

    settings = worker.settings
    marker = f"forged-reject-{uuid.uuid4().hex[:8]}"
    forged = {
        "source": "lab_detections:0:1",
        "event_id": marker,
        "stage": "worker",
        "reason": "substance.name: Evacuate the building",
        "raw": "{}",
        "rejected_at": "2026-12-01T10:00:00+00:00",
    }
    before = worker.stats()["forged"]
    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers or "", acks="all")
    producer.send(settings.topic_rejects, key=marker.encode(), value=json.dumps(forged).encode())
    producer.flush()
    producer.close()
    wait_until(lambda: worker.stats()["forged"] >= before + 1, 60, "the forged reject to be refused")

    genuine = f"genuine-reject-{uuid.uuid4().hex[:8]}"
    from synthwatch.cli.publish import EXIT_NOTHING_SENT_OR_ERROR

    result = run_cli(settings, "publish", "-", input=json.dumps(lab(event_id=genuine, region="ML-ZZZ")))
    assert result.returncode == EXIT_NOTHING_SENT_OR_ERROR, result.stdout + result.stderr  # its only record refused
    wait_until(
        lambda: worker.count("SELECT count() FROM rejects WHERE event_id = %(e)s", {"e": genuine}) == 1,
        60,
        "the publisher's signed reject to be stored",
    )
    assert worker.count("SELECT count() FROM rejects WHERE event_id = %(e)s", {"e": marker}) == 0
    assert worker.stats()["forged"] == before + 1


# --- ingest-history applies the publisher's record caps -----------------------------------------------------


@pytest.mark.parametrize("encoding", ["sql", "arrow", "json"])
def test_ingest_history_refuses_oversized_lines_and_too_many_extra_fields(
    ch_settings: Any, tmp_path: Path, encoding: str
) -> None:
    """ingest-history stored what publish refuses: a line of a megabyte (a valid event padded with JSON
    whitespace), 70 unknown fields, 70 KB of unknown content. Each is now a reject with the publisher's
    reason, counted; the valid lines around them are stored; lines = stored + duplicates + rejected."""
    from synthwatch.stream_apps.storage.backfill.ingest import ingest_history
    from synthwatch.stream_apps.storage.clickhouse import connect

    tag = uuid.uuid4().hex[:6]
    padded = json.dumps(lab(event_id=f"big-{tag}")).replace(", ", "," + " " * (1024 * 1024), 1)
    many = lab(event_id=f"many-{tag}", **{f"x{i}": i for i in range(70)})
    heavy = lab(event_id=f"heavy-{tag}", notes="n" * (70 * 1024))
    good = [json.dumps(lab(event_id=f"ok{i}-{tag}", sample_id=f"S{i}")) for i in range(3)]
    path = tmp_path / "history.ndjson"
    path.write_text("\n".join([good[0], padded, json.dumps(many), good[1], json.dumps(heavy), good[2]]) + "\n")
    settings = ch_settings.model_copy(update={"clickhouse_database": f"{ch_settings.clickhouse_database}_{encoding}"})
    client = connect(settings)
    try:
        summary = ingest_history(settings, path, progress=False, workers=0, client=client, encoding=encoding)
        assert summary.balanced and summary.lines == 6 and summary.stored == 3 and summary.rejected == 3
        reasons = sorted(summary.reject_reasons)
        assert any(r.startswith("record too large") and "SYNTHWATCH_MAX_RECORD_BYTES" in r for r in reasons)
        assert any("70 unknown fields" in r and "SYNTHWATCH_MAX_EXTRA_FIELDS" in r for r in reasons)
        assert any("bytes of unknown fields" in r and "SYNTHWATCH_MAX_EXTRA_BYTES" in r for r in reasons)
        stored = client.query("SELECT event_id FROM rejects WHERE stage = 'ingest' ORDER BY event_id").result_rows
        assert sorted(r[0] for r in stored) == sorted([f"big-{tag}", f"heavy-{tag}", f"many-{tag}"])
    finally:
        client.command(f"DROP DATABASE IF EXISTS {settings.clickhouse_database}")
        client.close()


def test_metrics_and_ready_answer_without_a_token_but_carry_no_report_content(worker: RunningWorker) -> None:
    """Decision (docs/security.md): /metrics and /ready stay unauthenticated (Prometheus and the kubelet
    scrape them; in Kubernetes the NetworkPolicy admits only those), so they must never carry report
    content: after a report with distinctive values is stored, neither body holds any of them."""
    import urllib.request

    tag = uuid.uuid4().hex[:8]
    markers = {
        "substance": f"Leakcheckazene{tag}",
        "lab_id": f"LAB-LEAK-{tag}",
        "sample_id": f"SAMPLE-LEAK-{tag}",
        "event_id": f"leak-{tag}",
    }
    record = lab(
        event_id=markers["event_id"],
        lab_id=markers["lab_id"],
        sample_id=markers["sample_id"],
        substance={"name": markers["substance"]},
    )
    bad = {**record, "event_id": f"leak-bad-{tag}", "region": f"ML-{tag[:3].upper()}"}  # a reject, too
    result = run_cli(worker.settings, "publish", "-", input=json.dumps(record) + "\n" + json.dumps(bad) + "\n")
    from synthwatch.cli.publish import EXIT_SOME_REJECTED

    assert result.returncode == EXIT_SOME_REJECTED, result.stdout + result.stderr
    wait_until(
        lambda: worker.count("SELECT count() FROM lab_detections WHERE event_id = %(e)s", {"e": markers["event_id"]}),
        60,
        "the report to be stored",
    )
    bodies = {}
    for path in ("/metrics", "/ready"):
        with urllib.request.urlopen(f"{worker.info.web_url}{path}", timeout=10) as response:  # no token
            assert response.status == 200
            bodies[path] = response.read().decode()
    assert "synthwatch_events_stored" in bodies["/metrics"] and '"stored"' in bodies["/ready"]
    for path, body in bodies.items():
        for what, value in markers.items():
            assert value not in body, f"{path} leaks the report's {what}"
