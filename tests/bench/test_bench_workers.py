"""How the benchmarks read a worker's counters: from ``/ready`` also while it answers 503, each event once.

A real HTTP server stands in for the worker's web endpoint (``/ready`` answers as the worker does: 200 when
ready, 503 with the same counters while the watchdog finds a partition stalled).
"""

from __future__ import annotations

import json
import os
import resource
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar, cast

import pytest

from synthwatch.bench.experiments import Checkout, parse_checkouts
from synthwatch.bench.memory import process_cpu_seconds
from synthwatch.bench.workers import BenchWorker, wait_consumed, wait_idle


class _Ready(BaseHTTPRequestHandler):
    answers: ClassVar[list[tuple[int, dict[str, Any]]]] = []

    def do_GET(self) -> None:
        status, body = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if status == 0:  # a worker whose event loop is held: no answer until the test ends
            self.server.held.wait()  # type: ignore[attr-defined]
            return
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def ready_server() -> Iterator[tuple[str, list[tuple[int, dict[str, Any]]]]]:
    answers: ClassVar[list[tuple[int, dict[str, Any]]]] = []
    handler = type("Ready", (_Ready,), {"answers": answers})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.held = threading.Event()  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", answers
    finally:
        server.held.set()  # type: ignore[attr-defined]
        server.shutdown()
        server.server_close()


class _Running:
    """A process that has not exited (wait_consumed checks it between polls)."""

    returncode = None

    def poll(self) -> None:
        return None


def _worker(url: str, tmp_path: Path) -> BenchWorker:
    return BenchWorker(cast(Any, _Running()), tmp_path, tmp_path / "worker.log", web_url=url)


def test_counters_are_read_from_a_stalled_workers_503(ready_server: Any, tmp_path: Path) -> None:
    url, answers = ready_server
    answers.append((503, {"ready": False, "stalled": "intake[0] stalled", "checkpointed": 70, "replayed": 5}))
    worker = _worker(url, tmp_path)
    assert worker.stats()["checkpointed"] == 70
    assert worker.checkpointed() == 65


def test_a_phase_waits_until_its_events_are_checkpointed_once(ready_server: Any, tmp_path: Path) -> None:
    """Events read again after a seek-back count in 'checkpointed' twice: 100 there is not 100 events done."""
    url, answers = ready_server
    answers += [
        (200, {"checkpointed": 100, "replayed": 20}),  # 80 events done, 20 of them read twice
        (503, {"checkpointed": 110, "replayed": 20}),  # stalled meanwhile: still read
        (200, {"checkpointed": 120, "replayed": 20}),  # all 100 done
    ]
    wait_consumed([_worker(url, tmp_path)], 100, timeout=30, interval=0.01)
    assert answers == [(200, {"checkpointed": 120, "replayed": 20})]  # it read until the last answer


def test_a_phase_counts_the_ready_reads_a_held_worker_left_unanswered(ready_server: Any, tmp_path: Path) -> None:
    """Review finding 6: a /ready read unanswered within its timeout (the worker's event loop held by a batch) is
    asked again, and counted with the longest time unanswered, for the results: not swallowed."""
    url, answers = ready_server
    answers += [(0, {}), (200, {"checkpointed": 100})]
    worker = _worker(url, tmp_path)
    worker.stats_timeout = 0.5
    wait_consumed([worker], 100, timeout=30, interval=0.01)
    assert worker.ready_timeouts >= 1 and worker.longest_unanswered >= 0.5
    assert worker.unanswered_since is None  # answered since


def test_a_phase_waits_until_its_sightings_are_processed_once(ready_server: Any, tmp_path: Path) -> None:
    """Sightings read again after a seek-back count in 'sightings_processed' twice (``replayed_sightings``)."""
    url, answers = ready_server
    answers += [
        (200, {"sightings": 50, "sightings_processed": 60, "replayed_sightings": 30}),  # 30 done, 30 read twice
        (503, {"sightings": 50, "sightings_processed": 75, "replayed_sightings": 30}),  # stalled meanwhile
        (200, {"sightings": 50, "sightings_processed": 80, "replayed_sightings": 30}),  # all 50 done
    ]
    wait_idle([_worker(url, tmp_path)], timeout=30, interval=0.01)
    assert answers == [(200, {"sightings": 50, "sightings_processed": 80, "replayed_sightings": 30})]


def test_other_http_errors_are_not_taken_for_counters(ready_server: Any, tmp_path: Path) -> None:
    url, answers = ready_server
    answers.append((500, {"error": "boom"}))
    with pytest.raises(Exception, match="500"):
        _worker(url, tmp_path).stats()


def test_a_process_cpu_seconds_are_its_user_and_system_time_of_all_threads() -> None:
    """What ``bench ready`` reads from ``/proc/PID/stat``, against the kernel's ``getrusage`` of this process."""

    def used() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
        return usage.ru_utime + usage.ru_stime

    def burn() -> None:
        deadline = used() + 0.2
        while used() < deadline:
            pass

    worker = threading.Thread(target=burn)  # CPU time of another thread counts
    before = used()
    worker.start()
    worker.join()
    read = process_cpu_seconds(os.getpid())
    after = used()
    tick = 1 / os.sysconf("SC_CLK_TCK")  # /proc counts whole clock ticks, user and system each cut down to one
    assert before + 0.2 - 2 * tick <= read <= after + tick
    assert process_cpu_seconds() == pytest.approx(process_cpu_seconds(os.getpid()), abs=tick)


def test_checkouts_name_a_checkout_with_its_own_virtualenv(tmp_path: Path) -> None:
    python = tmp_path / "old" / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.touch()
    assert parse_checkouts(f"old={tmp_path / 'old'}") == [Checkout("old", str(python))]
    with pytest.raises(SystemExit, match="make install there"):
        parse_checkouts(f"new={tmp_path / 'new'}")  # no .venv: not installed
    with pytest.raises(SystemExit, match="LABEL=DIR"):
        parse_checkouts(str(tmp_path / "old"))
