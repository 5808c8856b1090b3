"""End-to-end delivery latency: a lab report of a never-seen nitazene in Bamako -> the officer's webhook.

Starts ``synthwatch up`` as a child process (its own broker and embedded ClickHouse in a temporary
directory) with a subscriptions file naming one French-speaking Bamako officer on a local webhook, then
publishes ``runs`` lab reports one at a time, each a new structure (isotonitazene with a longer alkoxy
chain, so every report is a ``new_substance`` alert), and measures publish -> webhook received. Prints
p50/p99 against the 5 s target. A benchmark that prints numbers, never a timed test.

The worker delivers only once ``attach_delivery`` is wired into ``create_app`` for
``SYNTHWATCH_SUBSCRIPTIONS_FILE``; without it no webhook ever arrives and the run stops with that hint.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .settings import Settings

ISOTONITAZENE = "CCN(CC)CCn1c(Cc2ccc(OC(C)C)cc2)nc2cc([N+](=O)[O-])ccc21"
OFFICER_ID = "ml-bko-bench"
TARGET_S = 5.0


def nitazene_variants(count: int, first_chain: int = 5) -> list[tuple[str, str]]:
    """``count`` new nitazenes: isotonitazene's isopropoxy replaced by n-alkoxy chains of 5, 6, ... carbons.

    The catalogue stops at butonitazene (4 carbons), so each is a structure the network has never seen.
    """
    out = []
    for carbons in range(first_chain, first_chain + count):
        smiles = ISOTONITAZENE.replace("OC(C)C", "O" + "C" * carbons)
        out.append((f"C{carbons}-alkoxy nitazene", smiles))
    return out


def bench_subscriptions(url: str) -> str:
    """One Bamako customs officer, in French, on a webhook, for opioids in Mali."""
    return (
        "officers:\n"
        f"  - id: {OFFICER_ID}\n"
        "    name: Kadiatou Diallo\n"
        "    organisation: Douanes maliennes (benchmark)\n"
        "    language: fr\n"
        "    timezone: Africa/Bamako\n"
        "    routes:\n"
        "      - name: opioides-bamako\n"
        "        regions: [ML-BKO]\n"
        "        families: [nitazene, fentanyl, other_opioid]\n"
        "        min_severity: warning\n"
        f'        channel: {{type: webhook, url: "{url}"}}\n'
    )


def lab_report(event_id: str, name: str, smiles: str, now: datetime | None = None) -> dict[str, Any]:
    """A Bamako lab's confirmed detection, timestamped now (a report a day late would be flagged late)."""
    return {
        "event_id": event_id,
        "kind": "lab_detection",
        "occurred_at": (now or datetime.now(UTC)).isoformat(),
        "country": "ML",
        "region": "ML-BKO",
        "substance": {"name": name, "smiles": smiles},
        "lab_id": "LNS-ML-BKO",
        "sample_id": event_id,
        "sample_type": "seized_material",
        "method": "LC-HRMS",
    }


def _carries(event_id: str, payload: dict[str, Any]) -> bool:
    """Is this webhook payload the alert raised by report ``event_id``?"""
    return event_id in payload.get("alert", {}).get("evidence_event_ids", [])


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, ``q`` in [0, 100]."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


class LatencyReceiver:
    """A webhook receiver in a thread: verifies each request and notes when it arrived (perf_counter)."""

    def __init__(self, secret: str, host: str = "127.0.0.1") -> None:
        self.secret = secret
        self.received: list[tuple[float, dict[str, Any], dict[str, str]]] = []
        self.arrived_wall: dict[str, float] = {}  # idempotency key -> time.time() at arrival
        self.rejected: list[str] = []
        self._seen: set[str] = set()
        self._changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                from synthwatch.stream_apps.channels import WebhookRejected, verify_webhook

                arrived, wall = time.perf_counter(), time.time()
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k: v for k, v in self.headers.items()}
                try:
                    verify_webhook(receiver.secret, headers, body, time.time(), seen_ids=receiver._seen)
                    status = 200
                except WebhookRejected as error:
                    status = error.status
                    receiver.rejected.append(error.reason)
                self.send_response(status)
                self.end_headers()
                if status == 200:
                    with receiver._changed:
                        receiver.received.append((arrived, json.loads(body), headers))
                        receiver.arrived_wall[headers.get("Idempotency-Key", "")] = wall
                        receiver._changed.notify_all()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.url = f"http://{host}:{self.server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self.server.serve_forever, name="bench-webhook", daemon=True)

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float
    ) -> tuple[float, dict[str, Any]] | None:
        """The first accepted payload matching ``predicate``: (arrival perf_counter, payload), or None."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for arrived, payload, _ in self.received:
                    if predicate(payload):
                        return arrived, payload
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._changed.wait(left)

    def __enter__(self) -> LatencyReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def stack_env(settings: Settings) -> dict[str, str]:
    """Environment of the child ``synthwatch up``: this run's settings, nothing inherited from SYNTHWATCH_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNTHWATCH_")}
    env["SYNTHWATCH_DATA_DIR"] = str(settings.data_dir)
    env["SYNTHWATCH_WEB_PORT"] = str(settings.web_port)
    if settings.subscriptions_file is not None:
        env["SYNTHWATCH_SUBSCRIPTIONS_FILE"] = str(settings.subscriptions_file)
    if settings.webhook_secret is not None:
        env["SYNTHWATCH_WEBHOOK_SECRET"] = settings.webhook_secret
    return env


def _wait_ready(settings: Settings, process: subprocess.Popen[bytes], log_path: Path, timeout: float) -> Any:
    from .runtime import read_stack

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"`synthwatch up` exited with code {process.returncode}:\n{tail}")
        info = read_stack(settings)
        if info is not None and info.pid == process.pid and info.ready_seconds is not None:
            return info
        time.sleep(0.1)
    raise RuntimeError(f"`synthwatch up` was not ready after {timeout:.0f} s (log: {log_path})")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def bench_delivery(console: Console, runs: int = 20, timeout_s: float = 30.0, keep: bool = False) -> dict[str, Any]:
    """Publish ``runs`` new-nitazene lab reports in Bamako; time each until the officer's webhook gets it."""
    from synthwatch.producers.publisher import Publisher
    from synthwatch.producers.readers import InputRecord

    from .query import QueryError, run_query

    data_dir = Path(tempfile.mkdtemp(prefix="synthwatch-bench-delivery-"))
    secret = secrets.token_hex(16)
    prefix = f"bench-{uuid.uuid4().hex[:6]}"
    latencies: list[float] = []
    delivery_part: list[float] = []  # alert raised (detected_at) -> webhook: the delivery stage alone
    languages: Counter[str] = Counter()
    missed: list[str] = []
    with LatencyReceiver(secret) as receiver:
        subscriptions = data_dir / "subscriptions.yaml"
        subscriptions.write_text(bench_subscriptions(receiver.url), encoding="utf-8")
        settings = Settings(data_dir=data_dir, subscriptions_file=subscriptions, webhook_secret=secret, web_port=0)
        log_path = data_dir / "up.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "synthwatch.cli", "up"],
                env=stack_env(settings),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            info = _wait_ready(settings, process, log_path, timeout=120)
            console.print(f"Stack ready in {info.ready_seconds:.1f} s; webhook receiver at {receiver.url}")
            # one unmeasured report first: consumer fetch sessions, RDKit and template caches warm up
            variants = nitazene_variants(runs + 1)
            with Publisher(settings, info.bootstrap_servers) as publisher:
                for i, (name, smiles) in enumerate(variants):
                    event_id = f"{prefix}-{i}"
                    record = InputRecord(source=f"bench:{i}", raw=json.dumps(lab_report(event_id, name, smiles)))
                    started = time.perf_counter()
                    summary = publisher.publish_records([record])
                    if summary.sent != 1:
                        raise RuntimeError(f"the broker did not take report {event_id}: {summary}")
                    got = receiver.wait_for(partial(_carries, event_id), timeout_s)
                    if got is None:
                        if i == 0:
                            raise RuntimeError(
                                f"no webhook within {timeout_s:.0f} s of the first report: is attach_delivery wired "
                                f"into create_app for SYNTHWATCH_SUBSCRIPTIONS_FILE? (worker log: {log_path})"
                            )
                        missed.append(event_id)
                        continue
                    arrived, payload = got
                    languages[str(payload.get("language"))] += 1
                    if i > 0:
                        latencies.append(arrived - started)
                        raised = datetime.fromisoformat(payload["alert"]["detected_at"]).timestamp()
                        delivery_part.append(receiver.arrived_wall[payload["alert_id"]] - raised)
            try:
                delivered_rows = int(
                    run_query(
                        settings,
                        "SELECT count() FROM deliveries WHERE officer_id = %(o)s AND status = 'delivered'",
                        {"o": OFFICER_ID},
                    ).rows[0][0]
                )
            except QueryError as error:
                console.print(f"[yellow]could not read deliveries: {error}[/]")
                delivered_rows = -1
        finally:
            _stop(process)
        keys = Counter(h.get("Idempotency-Key", "") for _, _, h in receiver.received)
        duplicates = sum(n - 1 for n in keys.values() if n > 1)
        rejected = list(receiver.rejected)
    if not keep:
        shutil.rmtree(data_dir, ignore_errors=True)

    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    table = Table(title=f"publish -> webhook, new nitazene in ML-BKO, {runs} runs (after 1 warm-up)")
    columns = ("delivered", "missed", "p50 (s)", "p99 (s)", "max (s)", "raised->webhook p50 (s)", "language")
    for column in (*columns, "duplicates", "rejected"):
        table.add_column(column, justify="right")
    table.add_row(
        f"{len(latencies)}/{runs}",
        str(len(missed)),
        f"{p50:.3f}",
        f"{p99:.3f}",
        f"{max(latencies, default=float('nan')):.3f}",
        f"{percentile(delivery_part, 50):.3f}",
        ", ".join(f"{k}: {n}" for k, n in languages.items()),
        str(duplicates),
        str(len(rejected)),
    )
    console.print(table)
    verdict = "[green]within[/]" if latencies and p99 < TARGET_S and not missed else "[red]NOT within[/]"
    console.print(f"p99 {p99:.3f} s is {verdict} the {TARGET_S:g} s target; deliveries recorded: {delivered_rows}")
    return {
        "runs": runs,
        "delivered": len(latencies),
        "missed": missed,
        "p50_s": p50,
        "p99_s": p99,
        "max_s": max(latencies, default=float("nan")),
        "delivery_stage_p50_s": percentile(delivery_part, 50),
        "languages": dict(languages),
        "duplicates": duplicates,
        "rejected": rejected,
        "deliveries_recorded": delivered_rows,
        "data_dir": str(data_dir) if keep else None,
    }
