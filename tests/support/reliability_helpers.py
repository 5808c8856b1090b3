"""Fault-injection helpers for tests/integration/test_reliability.py: a flaky proxy, a tailer.

Why a flaky proxy: the worker's production path is ``SYNTHWATCH_CLICKHOUSE_URL=http://...``; the engine
process (:mod:`synthwatch.stack.engine`, the real engine behind ClickHouse's HTTP interface) stands in for
the server, and :class:`FlakyProxy` sits in front of it and refuses connections while "down", then
forwards again. The worker sees exactly what a ClickHouse outage looks like to it: connection refused,
then reset connections, then service again.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterable
from typing import Any

from synthwatch.bench.crash import novelty_summary
from synthwatch.stack.broker import committed_offsets, consumer_lag, high_watermarks
from synthwatch.stack.kafka_checks import daily_chunks, read_all

# --- a TCP proxy that can refuse connections ---------------------------------------------------------


class FlakyProxy:
    """Forwards 127.0.0.1:``port`` to ``target``; ``down()`` refuses and cuts connections, ``up()`` resumes.

    While down nothing listens on the port, so clients get ECONNREFUSED, as from a stopped server. While
    ``hung`` is set, connections stay open and nothing is forwarded either way: a server that has stopped
    answering without failing (requests wait; nothing errors).

    The port is held from construction to :meth:`close`, down or not: a socket bound to it (never
    listening, so it refuses like a closed port) stays beside the listener, both with ``SO_REUSEPORT``.
    Another process (a second pytest process picking a free port for its broker) cannot be given the
    port during an outage, so ``up()`` never finds it taken.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._holder: socket.socket | None = self._socket(0)
        self.port: int = self._holder.getsockname()[1]
        self._listener: socket.socket | None = None
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.accepted = 0
        self.hung = threading.Event()

    @staticmethod
    def _socket(port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", port))
        return sock

    def up(self) -> FlakyProxy:
        if self._holder is None:
            raise RuntimeError("this proxy was closed: make a new one")
        listener = self._socket(self.port)
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

    def close(self) -> None:
        """Down for good, and the port given back."""
        self.down()
        holder, self._holder = self._holder, None
        if holder is not None:
            holder.close()

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
