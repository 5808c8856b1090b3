"""Fault-injection helpers for tests/integration/test_reliability.py: a ClickHouse HTTP endpoint, a flaky proxy,
a tailer.

Why a ClickHouse HTTP endpoint: the worker's production path is ``SYNTHWATCH_CLICKHOUSE_URL=http://...``,
but no ClickHouse server ships with the project and the embedded engine lives inside the worker's own
process, where nothing outside can make it unavailable. :func:`serve_clickhouse` answers the subset of
ClickHouse's HTTP interface that clickhouse-connect uses (queries, commands, Native inserts) with the real
engine (chDB) in a child process of its own; :class:`FlakyProxy` sits in front of it and refuses
connections while "down", then forwards again. The worker sees exactly what a ClickHouse outage looks
like to it: connection refused, then reset connections, then service again.

Run the endpoint with ``python -m tests.support.reliability_helpers clickhouse-http PORT DATA_DIR``.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

from synthwatch.bench.crash import novelty_summary
from synthwatch.stack.broker import committed_offsets, consumer_lag, high_watermarks
from synthwatch.stack.kafka_checks import daily_chunks, read_all

# --- a ClickHouse HTTP endpoint over the embedded engine --------------------------------------------------

_FORMAT = re.compile(r"\sFORMAT\s+(\w+)\s*;?\s*$", re.IGNORECASE)
_INSERT = re.compile(r"^\s*INSERT\s+INTO\s+(.+?)\s+FORMAT\s+(\w+)\s*$", re.IGNORECASE | re.DOTALL)
_INLINE_INSERT = re.compile(rb"\s*(INSERT\s+INTO\s+.+?\s+FORMAT\s+\w+)[ \t]*\r?\n", re.IGNORECASE | re.DOTALL)
_CODE = re.compile(r"Code:\s*(\d+)")


def _decompress(encoding: str, body: bytes) -> bytes:
    """A request body as sent by clickhouse-connect: lz4 or zstd frames (one per block), or plain."""
    encoding = encoding.strip().lower()
    if encoding == "lz4":
        import lz4.frame

        out = []
        while body:
            decompressor = lz4.frame.LZ4FrameDecompressor()
            out.append(decompressor.decompress(body))
            body = decompressor.unused_data
        return b"".join(out)
    if encoding == "zstd":
        from clickhouse_connect.driver.compression import _zstd_decompress

        return bytes(_zstd_decompress(body))
    if encoding in ("gzip", "deflate"):
        import zlib

        return zlib.decompress(body, 47)
    return body


def _form_fields(content_type: str, body: bytes) -> dict[str, str]:
    """Fields of a multipart/form-data body (clickhouse-connect sends big queries and parameters so)."""
    from email.parser import BytesParser
    from email.policy import HTTP

    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    fields: dict[str, str] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if isinstance(name, str) and isinstance(payload, bytes):
            fields[name] = payload.decode("utf-8", errors="replace")
    return fields


def serve_clickhouse(port: int, path: str) -> None:
    """Serve ClickHouse's HTTP interface on 127.0.0.1:``port`` from a chDB engine in ``path`` (blocks)."""
    import chdb

    connection = chdb.connect(path)
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            return None

        def do_GET(self) -> None:
            self._handle(b"")

        def do_POST(self) -> None:
            body = self._body()
            self._handle(_decompress(self.headers.get("Content-Encoding", ""), body))

        def _body(self) -> bytes:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                chunks: list[bytes] = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _handle(self, body: bytes) -> None:
            url = urlparse(self.path)
            if url.path == "/ping":
                self._reply(200, b"Ok.\n", {})
                return
            params = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
            content_type = self.headers.get("Content-Type", "")
            if content_type.startswith("multipart/form-data"):  # large queries and bound parameters
                params.update(_form_fields(content_type, body))
                body = b""
            query = params.get("query")
            data = body if query is not None else None
            inline = _INLINE_INSERT.match(body) if query is None else None
            if inline is not None:  # "INSERT ... FORMAT Native\n" then the data, in one body
                query, data = inline.group(1).decode("utf-8", errors="replace"), body[inline.end() :]
            sql = query if query is not None else body.decode("utf-8", errors="replace")
            bound = {k[len("param_") :]: v for k, v in params.items() if k.startswith("param_")}
            try:
                with lock:
                    if params.get("database"):
                        connection.query(f"USE `{params['database']}`", "TabSeparated")
                    result, fmt = self._run(sql, data, params.get("default_format") or "TabSeparated", bound)
            except Exception as error:  # the engine's message is what the client shows
                message = str(error)
                print(f"query failed: {message[:300]} (statement: {sql[:200]!r})", file=sys.stderr, flush=True)
                match = _CODE.search(message)
                code = match.group(1) if match else "1002"
                self._reply(
                    500, f"Code: {code}. DB::Exception: {message}\n".encode(), {"X-ClickHouse-Exception-Code": code}
                )
                return
            self._reply(200, result, {"X-ClickHouse-Format": fmt})

        def _run(self, sql: str, data: bytes | None, default: str, bound: dict[str, str]) -> tuple[bytes, str]:
            # Per-request settings (date_time_input_format, ...) are left out: synthwatch's statements
            # do not depend on them, and the engine's defaults apply as in the embedded path.
            insert = _INSERT.match(sql)
            if data is not None and insert is not None:
                with tempfile.NamedTemporaryFile(suffix=".bin") as tmp:
                    tmp.write(data)
                    tmp.flush()
                    target, fmt = insert.group(1), insert.group(2)
                    connection.query(f"INSERT INTO {target} FROM INFILE '{tmp.name}' FORMAT {fmt}", "TabSeparated")
                return b"", "TabSeparated"
            match = _FORMAT.search(sql)
            fmt = match.group(1) if match else default
            statement = sql[: match.start()] if match else sql
            result = connection.query(statement, fmt, params=bound) if bound else connection.query(statement, fmt)
            return result.bytes() or b"", fmt

        def _reply(self, status: int, body: bytes, headers: dict[str, str]) -> None:
            self.send_response(status)
            summary = {"read_rows": "0", "read_bytes": "0", "written_rows": "0", "written_bytes": "0"}
            for name, value in {
                "Content-Type": "application/octet-stream",
                "Content-Length": str(len(body)),
                "X-ClickHouse-Timezone": "UTC",
                "X-ClickHouse-Server-Display-Name": "chdb-http",
                "X-ClickHouse-Summary": json.dumps(summary),
                **headers,
            }.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    print(f"listening on {port}", flush=True)
    server.serve_forever()


# --- a TCP proxy that can refuse connections ---------------------------------------------------------


class FlakyProxy:
    """Forwards 127.0.0.1:``port`` to ``target``; ``down()`` refuses and cuts connections, ``up()`` resumes.

    While down nothing listens on the port, so clients get ECONNREFUSED, as from a stopped server. While
    ``hung`` is set, connections stay open and nothing is forwarded either way: a server that has stopped
    answering without failing (requests wait; nothing errors).
    """

    def __init__(self, target_port: int, port: int = 0) -> None:
        self.target_port = target_port
        self.port = port or _free_port()
        self._listener: socket.socket | None = None
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.accepted = 0
        self.refused_while_down = 0
        self.hung = threading.Event()

    def up(self) -> FlakyProxy:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def down(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            connections, self._connections = set(self._connections), set()
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    close = down

    @property
    def is_up(self) -> bool:
        return self._listener is not None

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self.accepted += 1
                self._connections |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                chunk = source.recv(65536)
                if not chunk:
                    break
                while self.hung.is_set():
                    time.sleep(0.02)
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for conn in (source, sink):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                with self._lock:
                    self._connections.discard(conn)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port} after {timeout:.0f} s")


# --- reading topics ----------------------------------------------------------------------------------


class Tailer:
    """Reads topics from the beginning in a thread and keeps every record value; survives broker loss.

    For the broker-restart test: what it has read from the old broker is what that broker held.
    """

    def __init__(self, servers: str, topics: Iterable[str]) -> None:
        self.servers = servers
        self.topics = list(topics)
        self.values: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.errors = 0

    def start(self) -> Tailer:
        self._thread.start()
        return self

    def _run(self) -> None:
        from kafka import KafkaConsumer, TopicPartition

        consumer: Any = None
        while not self._stop.is_set():
            try:
                if consumer is None:
                    consumer = KafkaConsumer(
                        bootstrap_servers=self.servers,
                        enable_auto_commit=False,
                        auto_offset_reset="earliest",
                        fetch_max_wait_ms=50,
                        request_timeout_ms=5000,
                        reconnect_backoff_max_ms=200,
                    )
                    partitions = []
                    for topic in self.topics:
                        found = consumer.partitions_for_topic(topic) or set()
                        partitions += [TopicPartition(topic, p) for p in sorted(found)]
                    consumer.assign(partitions)
                    consumer.seek_to_beginning()
                for records in consumer.poll(timeout_ms=100).values():
                    self.values += [r.value for r in records]
            except Exception:
                self.errors += 1
                time.sleep(0.1)

        if consumer is not None:
            with contextlib.suppress(Exception):
                consumer.close(autocommit=False)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def main(argv: list[str]) -> None:
    if len(argv) == 3 and argv[0] == "clickhouse-http":
        serve_clickhouse(int(argv[1]), argv[2])
        return
    raise SystemExit("usage: python -m tests.support.reliability_helpers clickhouse-http PORT DATA_DIR")


if __name__ == "__main__":
    main(sys.argv[1:])


# --- streams and comparisons -------------------------------------------------------------------------------


def publish_summary(stdout: str) -> dict[str, int]:
    """The numbers of `synthwatch publish`'s summary table (read, sent, rejected, duplicates, failed)."""
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.replace("┃", "│").split("│") if c.strip()]
        if len(cells) == 5 and all(c.isdigit() for c in cells):
            return dict(zip(["read", "sent", "rejected", "duplicates", "failed"], map(int, cells), strict=True))
    raise AssertionError(f"no summary in output:\n{stdout}")


def backtest_outcomes(messages: Iterable[tuple[str, bytes | str]]) -> list[tuple[str, str | None]]:
    """Per message, what the offline backtest (stream_apps.detect.backtest.run_lines) makes of it, in order:
    ("stored" | "malformed" | "too late" | "duplicate", event id)."""
    from synthwatch.schemas import WireError, parse_event
    from synthwatch.stream_apps.detect.intake import Intake
    from synthwatch.stream_apps.detect.region import Detector, Observation

    intake, detector = Intake(stage="backtest"), Detector()
    seen: set[str] = set()
    out: list[tuple[str, str | None]] = []
    for source, line in messages:
        try:
            event = parse_event(line)
        except WireError as error:
            out.append(("malformed", error.event_id))
            continue
        item = intake.enrich(event, source)
        result = detector.observe(Observation.of(item))
        if result.duplicate or (result.late_reason is not None and item.event_id in seen):
            out.append(("duplicate", item.event_id))
        elif result.late_reason is not None:
            out.append(("too late", item.event_id))
        else:
            seen.add(item.event_id)
            out.append(("stored", item.event_id))
    return out


__all__ = ["committed_offsets", "consumer_lag", "daily_chunks", "high_watermarks", "novelty_summary", "read_all"]
