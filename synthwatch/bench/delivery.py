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

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from synthwatch.bench.workload import percentile
from synthwatch.settings import Settings
from synthwatch.stack.process import StackProcess

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


BENCH_SECRET_ENV = "SYNTHWATCH_BENCH_WEBHOOK_SECRET"


def bench_subscriptions(url: str, secret_env: str = BENCH_SECRET_ENV) -> str:
    """One Bamako customs officer, in French, on a webhook (a loopback receiver, allowed on purpose)."""
    return (
        "webhook_allowed_networks: [127.0.0.0/8]\n"
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
        f'        channel: {{type: webhook, url: "{url}", secret_env: {secret_env}}}\n'
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


class LatencyReceiver:
    """A webhook receiver in a thread: verifies each request and notes when it arrived (perf_counter)."""

    def __init__(self, secret: str, host: str = "127.0.0.1") -> None:
        self.secret = secret
        self.received: list[tuple[float, dict[str, Any], dict[str, str]]] = []
        self.arrived_wall: dict[str, float] = {}  # alert id (from the verified body) -> time.time() at arrival
        self.rejected: list[str] = []
        self._seen: set[str] = set()
        self._changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                from synthwatch.stream_apps.delivery.webhook import WebhookRejected, verify

                arrived, wall = time.perf_counter(), time.time()
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k: v for k, v in self.headers.items()}
                try:
                    verified = verify(receiver.secret, headers, body, now=time.time(), seen=receiver._seen)
                    status = 200
                except WebhookRejected as error:
                    status = error.status
                    receiver.rejected.append(error.reason)
                self.send_response(status)
                self.end_headers()
                if status == 200:
                    with receiver._changed:
                        receiver.received.append((arrived, json.loads(body), headers))
                        receiver.arrived_wall[str(verified.payload.get("alert_id", ""))] = wall
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


def stack_env(settings: Settings, secrets: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of the child ``synthwatch up``: this run's settings (and webhook ``secrets`` by variable
    name), nothing inherited from SYNTHWATCH_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNTHWATCH_")}
    env["SYNTHWATCH_DATA_DIR"] = str(settings.data_dir)
    env["SYNTHWATCH_WEB_PORT"] = str(settings.web_port)
    if settings.subscriptions_file is not None:
        env["SYNTHWATCH_SUBSCRIPTIONS_FILE"] = str(settings.subscriptions_file)
    env.update(secrets or {})
    return env


def bench_delivery(console: Console, runs: int = 20, timeout_s: float = 30.0, keep: bool = False) -> dict[str, Any]:
    """Publish ``runs`` new-nitazene lab reports in Bamako; time each until the officer's webhook gets it."""
    from synthwatch.producers.publisher import Publisher
    from synthwatch.producers.readers import InputRecord
    from synthwatch.stream_apps.storage.query import QueryError, run_query

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
        settings = Settings(data_dir=data_dir, subscriptions_file=subscriptions, web_port=0)
        log_path = data_dir / "up.log"
        up = StackProcess(
            [sys.executable, "-m", "synthwatch.cli.main", "up"],
            log_path,
            # 21 new nitazenes from one lab within minutes: a flood by the immediate budget's measure (10 a day per
            # reporter, docs/security.md#immediate-budget); the bench times immediate delivery, so no budget here
            env=stack_env(settings, {BENCH_SECRET_ENV: secret, "SYNTHWATCH_DELIVERY_IMMEDIATE_BUDGET": "0"}),
            settings=settings,
            what="`synthwatch up`",
        )
        with up:
            info = up.wait_ready(timeout=120)
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
        keys = Counter(str(payload.get("delivery_id", "")) for _, payload, _ in receiver.received)
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


# --- one hung receiver among healthy ones (issue 12, item 6) ----------------------------------------------------


def _hung_subscriptions(urls: dict[str, str], secret_envs: dict[str, str], timeout_s: dict[str, float]) -> str:
    """One officer per receiver, every alert to everyone, each with its own secret; loopback allowed on purpose."""
    lines = ["webhook_allowed_networks: [127.0.0.0/8]", "officers:"]
    for officer, url in urls.items():
        channel = f'type: webhook, url: "{url}", secret_env: {secret_envs[officer]}, timeout_s: {timeout_s[officer]:g}'
        lines += [
            f"  - id: {officer}",
            f"    name: {officer}",
            "    language: fr",
            f"    routes: [{{channel: {{{channel}}}}}]",
        ]
    return "\n".join(lines) + "\n"


def _bench_alert(alert_id: str) -> Any:
    from synthwatch.schemas import Alert, AlertSubstance

    now = datetime.now(UTC)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    return Alert(
        alert_id=alert_id,
        alert_type="new_substance",
        severity="critical",
        country="ML",
        region="ML-BKO",
        substance=AlertSubstance(name="C5-alkoxy nitazene", key=f"bench-{alert_id}", family="nitazene"),
        window_start=day,
        window_end=day + timedelta(days=1),
        triggered_at=now,
        detected_at=now,
        evidence_event_ids=[alert_id],
        summary="benchmark alert",
        identification_methods=["LC-HRMS"],
        sample_types=["seized_material"],
    )


class ReceiverProcess:
    """Healthy receivers (one per officer) and the hung one, in a child process: their HTTP parsing and
    verification must not compete with the delivery service for this process's interpreter lock.

    The child verifies every request with the officer's own secret and prints ``officer alert_id wall``
    per accepted delivery; :meth:`arrivals` collects them.
    """

    def __init__(self, secrets_by_officer: dict[str, str], hang_s: float) -> None:
        config = json.dumps({"secrets": secrets_by_officer, "hang_s": hang_s})
        self.process = subprocess.Popen(
            [sys.executable, "-m", "synthwatch.bench.delivery", "receivers"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(config + "\n")
        self.process.stdin.flush()
        started = json.loads(self.process.stdout.readline())
        self.urls: dict[str, str] = started["urls"]
        self.hung_url: str = started["hung"]
        self.arrived: dict[tuple[str, str], float] = {}
        self.hung_requests = 0
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, name="bench-receivers", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            kind, *rest = line.split()
            with self._lock:
                if kind == "A":
                    self.arrived[(rest[0], rest[1])] = float(rest[2])
                elif kind == "H":
                    self.hung_requests += 1

    def count(self, officer: str) -> int:
        with self._lock:
            return sum(1 for o, _ in self.arrived if o == officer)

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()  # the child stops when its stdin closes
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self._reader.join(5)


def _serve_receivers() -> None:
    """The child of :class:`ReceiverProcess` (``python -m synthwatch.bench.delivery receivers``)."""
    from synthwatch.stream_apps.delivery.webhook import WebhookRejected, verify

    config = json.loads(sys.stdin.readline())
    secrets_by_officer: dict[str, str] = config["secrets"]
    out = threading.Lock()
    seen: set[str] = set()

    def emit(text: str) -> None:
        with out:
            sys.stdout.write(text + "\n")
            sys.stdout.flush()

    class Healthy(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as a real receiver behind a proxy would

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            officer = self.path.strip("/")
            try:
                verified = verify(
                    secrets_by_officer[officer], dict(self.headers.items()), body, now=time.time(), seen=seen
                )
                status = 200
            except (WebhookRejected, KeyError):
                status = 401
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()
            if status == 200:
                emit(f"A {officer} {verified.payload['alert_id']} {time.time():.6f}")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    stop = threading.Event()

    class Hung(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            emit("H")
            stop.wait(float(config["hang_s"]))
            with contextlib.suppress(OSError):
                self.send_response(200)
                self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    # one server per officer: an endpoint (and its limit) is a server, as each agency runs its own
    servers = {officer: ThreadingHTTPServer(("127.0.0.1", 0), Healthy) for officer in secrets_by_officer}
    hung = ThreadingHTTPServer(("127.0.0.1", 0), Hung)
    for server in (*servers.values(), hung):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    urls = {officer: f"http://127.0.0.1:{server.server_address[1]}/{officer}" for officer, server in servers.items()}
    emit(json.dumps({"urls": urls, "hung": f"http://127.0.0.1:{hung.server_address[1]}/hook"}))
    sys.stdin.read()  # until the parent closes our stdin
    stop.set()
    for server in (*servers.values(), hung):
        server.shutdown()


async def _burst(
    service: Any, alerts: list[Any], batch: int, receivers: ReceiverProcess, officers: list[str], patience_s: float
) -> tuple[float, dict[str, float]]:
    """Submit ``alerts`` in batches at once; wait until every healthy officer has them all; stop the service.

    Returns (seconds until the healthy ones were done, submit wall time of each alert id).
    """
    import asyncio

    submitted: dict[str, float] = {}
    started = time.perf_counter()
    for first in range(0, len(alerts), batch):
        chunk = alerts[first : first + batch]
        now = time.time()
        submitted.update((a.alert_id, now) for a in chunk)
        await service.submit(chunk)
    deadline = time.monotonic() + patience_s
    while any(receivers.count(o) < len(alerts) for o in officers):
        if time.monotonic() > deadline:
            raise RuntimeError("the healthy receivers did not get every alert in time")
        await asyncio.sleep(0.01)
    took = time.perf_counter() - started
    await service.close()  # the hung officer's deliveries are cancelled, not given up
    return took, submitted


def bench_hung_receiver(
    console: Console,
    healthy: int = 4,
    alerts: int = 300,
    hang_s: float = 30.0,
    timeout_s: float = 10.0,
    batch: int = 100,
    with_unlimited: bool = True,
) -> dict[str, Any]:
    """Healthy officers' delivery latency (submit -> their webhook) with one officer's receiver hung.

    Every officer subscribes to every alert; ``alerts`` critical alerts are submitted in batches of
    ``batch`` (as the agent takes them), all at once: the burst of the issue (256 slots, the 256th alert
    65 s late). Scenarios, in one process on real local HTTP servers and the embedded ClickHouse:
    no hung receiver (the baseline); one hung with the default per-endpoint limit and breaker; and, with
    ``with_unlimited``, one hung with no per-endpoint limit and no breaker (what the limits prevent).
    """
    import asyncio

    from synthwatch.stream_apps.delivery.endpoints import EndpointLimits
    from synthwatch.stream_apps.delivery.service import DeliveryService
    from synthwatch.stream_apps.delivery.subscriptions import parse_subscriptions
    from synthwatch.stream_apps.storage.clickhouse import connect, migrate
    from synthwatch.stream_apps.storage.deliveries import DeliveryStore

    data_dir = Path(tempfile.mkdtemp(prefix="synthwatch-bench-hung-"))
    client = connect(Settings(data_dir=data_dir))
    migrate(client)
    officers = [f"healthy-{i + 1}" for i in range(healthy)]
    secret_envs = {o: f"SYNTHWATCH_BENCH_SECRET_{o.upper().replace('-', '_')}" for o in [*officers, "hung"]}
    secrets_ = {o: secrets.token_hex(16) for o in secret_envs}
    saved = {v: os.environ.get(v) for v in secret_envs.values()}
    os.environ.update({secret_envs[o]: s for o, s in secrets_.items()})
    scenarios: list[tuple[str, bool, EndpointLimits]] = [
        ("no hung receiver", False, EndpointLimits()),
        ("1 hung, per-endpoint limit + breaker", True, EndpointLimits()),
    ]
    if with_unlimited:
        scenarios.append(
            ("1 hung, no limit, no breaker", True, EndpointLimits(concurrency=256, failures_to_open=10**9))
        )
    results: dict[str, Any] = {}
    try:
        for run, (label, hung, limits) in enumerate(scenarios):
            receivers = ReceiverProcess({o: secrets_[o] for o in officers}, hang_s)
            try:
                urls = dict(receivers.urls) | ({"hung": receivers.hung_url} if hung else {})
                timeouts = {o: timeout_s for o in urls}
                subscriptions = parse_subscriptions(_hung_subscriptions(urls, secret_envs, timeouts), "bench")
                service = DeliveryService(subscriptions, DeliveryStore(client), endpoint_limits=limits)
                batch_alerts = [_bench_alert(f"run{run}-{i:06d}") for i in range(alerts)]
                patience = max(600.0, hang_s * 10)
                took, submitted = asyncio.run(_burst(service, batch_alerts, batch, receivers, officers, patience))
            finally:
                receivers.close()
            latencies = [at - submitted[alert_id] for (_, alert_id), at in receivers.arrived.items()]
            deferred = client.query(
                "SELECT count() FROM deliveries WHERE status = 'deferred' AND alert_id LIKE %(p)s",
                parameters={"p": f"run{run}-%"},
            ).result_rows[0][0]
            results[label] = {
                "deliveries": len(latencies),
                "p50_s": percentile(latencies, 50),
                "p99_s": percentile(latencies, 99),
                "max_s": max(latencies, default=float("nan")),
                "all_healthy_done_s": took,
                "hung_requests": receivers.hung_requests,
                "deferred_rows": int(deferred),
            }
    finally:
        for variable, value in saved.items():
            if value is None:
                os.environ.pop(variable, None)
            else:
                os.environ[variable] = value
        client.close()
        shutil.rmtree(data_dir, ignore_errors=True)

    table = Table(
        title=f"{healthy} healthy receivers + 1 answering after {hang_s:g} s (timeout {timeout_s:g} s); "
        f"{alerts} alerts to everyone in batches of {batch}: healthy officers' latency"
    )
    for column in (
        "scenario",
        "deliveries",
        "p50 (s)",
        "p99 (s)",
        "max (s)",
        "all healthy done (s)",
        "hung hit",
        "deferred",
    ):
        table.add_column(column, justify="left" if column == "scenario" else "right")
    for label, r in results.items():
        table.add_row(
            label,
            str(r["deliveries"]),
            f"{r['p50_s']:.3f}",
            f"{r['p99_s']:.3f}",
            f"{r['max_s']:.3f}",
            f"{r['all_healthy_done_s']:.2f}",
            str(r["hung_requests"]),
            str(r["deferred_rows"]),
        )
    console.print(table)
    base = results["no hung receiver"]["p99_s"]
    guarded = results["1 hung, per-endpoint limit + breaker"]["p99_s"]
    verdict = "[green]under[/]" if guarded < 2.0 else "[red]NOT under[/]"
    console.print(
        f"with one receiver hung, healthy p99 {guarded:.3f} s is {verdict} the 2 s bar; "
        f"{guarded / base:.2f}x the p99 without a hung receiver ({base:.3f} s)"
    )
    if "1 hung, no limit, no breaker" in results:
        unlimited = results["1 hung, no limit, no breaker"]["p99_s"]
        console.print(f"without the per-endpoint limit and breaker: p99 {unlimited:.3f} s ({unlimited / base:.1f}x)")
    return results


if __name__ == "__main__" and sys.argv[1:] == ["receivers"]:
    _serve_receivers()
