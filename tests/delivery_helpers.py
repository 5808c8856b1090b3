"""Real receivers for delivery tests: an aiohttp webhook server and an aiosmtpd SMTP server on free ports.

The webhook receiver verifies every request as a real receiver would (signature, timestamp, replayed
idempotency key) and can be scripted to fail first (``statuses``) or to hang (``delay_s``).
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import ssl
import subprocess
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from aiohttp import web
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from synthwatch.broker import free_port
from synthwatch.schemas import Alert, AlertSubstance
from synthwatch.stream_apps.channels import IDEMPOTENCY_HEADER, WebhookRejected, verify_webhook

SECRET = "test-secret-Bamako"


def make_alert(**changes: Any) -> Alert:
    """A valid alert: a never-seen nitazene in Bamako (critical); ``changes`` override any field."""
    now = datetime.now(UTC)
    data: dict[str, Any] = {
        "alert_id": "a" * 24,
        "alert_type": "new_substance",
        "severity": "critical",
        "country": "ML",
        "region": "ML-BKO",
        "substance": AlertSubstance(
            name="Pentyloxynitazene",
            key="QWERTYUIOPASDF",
            inchikey="QWERTYUIOPASDF-UHFFFAOYSA-N",
            family="nitazene",
            controlled=None,
        ),
        "window_start": now.replace(hour=0, minute=0, second=0, microsecond=0),
        "window_end": now.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1),
        "triggered_at": now,
        "detected_at": now,
        "evidence_event_ids": ["lab-1"],
        "summary": "Never seen by the network: Pentyloxynitazene.",
        "identification_methods": ["LC-HRMS"],
        "sample_types": ["seized_material"],
    }
    data.update(changes)
    return Alert(**data)


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int
    at: float  # time.monotonic()

    @property
    def key(self) -> str:
        return self.headers.get(IDEMPOTENCY_HEADER, "")

    def json(self) -> Any:
        import json

        return json.loads(self.body)


@dataclass
class WebhookReceiver:
    """``async with WebhookReceiver(SECRET, statuses={"flaky": [503]}) as hooks: hooks.url("flaky")``."""

    secret: str = SECRET
    statuses: dict[str, list[int]] = field(default_factory=dict)  # scripted answers per path, then verification
    delay_s: dict[str, float] = field(default_factory=dict)
    tolerance_s: float = 300
    requests: list[Received] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    port: int = 0
    _runner: web.AppRunner | None = None

    def url(self, name: str = "hook") -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def on(self, name: str) -> list[Received]:
        return [r for r in self.requests if r.path == name]

    def accepted(self, name: str | None = None) -> list[Received]:
        return [r for r in self.requests if 200 <= r.status < 300 and (name is None or r.path == name)]

    def per_key(self, name: str) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for r in self.accepted(name):
            counts[r.key] += 1
        return dict(counts)

    async def _handle(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        body = await request.read()
        headers = dict(request.headers)
        if self.delay_s.get(name):
            await asyncio.sleep(self.delay_s[name])
        scripted = self.statuses.get(name)
        if scripted:
            status, text = scripted.pop(0), "scripted failure"
        else:
            try:
                verify_webhook(self.secret, headers, body, time.time(), self.tolerance_s, seen_ids=self.seen)
                status, text = 200, "ok"
            except WebhookRejected as error:
                status, text = error.status, error.reason
        self.requests.append(Received(name, headers, body, status, time.monotonic()))
        return web.Response(status=status, text=text)

    async def __aenter__(self) -> WebhookReceiver:
        app = web.Application()
        app.router.add_post("/{name}", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)  # do not wait long for a scripted hang
        await self._runner.setup()
        self.port = free_port("127.0.0.1")
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


class _Inbox:
    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], EmailMessage]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = email.message_from_bytes(envelope.original_content, policy=email.policy.default)
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), message))  # type: ignore[arg-type]
        return "250 2.0.0 queued as test"


class SmtpServer:
    """A real aiosmtpd server on a free loopback port; with ``tls_dir``: STARTTLS required, and AUTH LOGIN."""

    def __init__(self, tls_dir: Path | None = None, username: str = "officer-bot", password: str = "s3cret") -> None:
        self.inbox = _Inbox()
        self.port = free_port("127.0.0.1")
        self.username, self.password = username, password
        self.client_context: ssl.SSLContext | None = None
        kwargs: dict[str, Any] = {}
        if tls_dir is not None:
            cert, key = self_signed_certificate(tls_dir)
            server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            server_context.load_cert_chain(cert, key)
            self.client_context = ssl.create_default_context(cafile=str(cert))
            kwargs = {
                "tls_context": server_context,
                "require_starttls": True,
                "authenticator": self._authenticate,
                "auth_require_tls": True,
            }
        self.controller = Controller(self.inbox, hostname="127.0.0.1", port=self.port, **kwargs)

    def _authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        ok = isinstance(data, LoginPassword) and (data.login, data.password) == (
            self.username.encode(),
            self.password.encode(),
        )
        return AuthResult(success=ok, handled=False)  # handled=True would mean "I already answered"

    @property
    def messages(self) -> list[tuple[str, list[str], EmailMessage]]:
        return self.inbox.messages

    def __enter__(self) -> SmtpServer:
        self.controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.controller.stop()


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A throw-away certificate for 127.0.0.1 (openssl CLI: the venv has no cryptography package)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def subscriptions_yaml(hooks: WebhookReceiver | None = None, smtp_to: str = "j.martin@ofast.example.fr") -> str:
    """A small file: a French Bamako officer on a webhook, an English Paris officer by e-mail."""
    url = hooks.url("bamako") if hooks else "http://127.0.0.1:9/bamako"
    return f"""
officers:
  - id: ml-bko-douanes
    name: Kadiatou Diallo
    organisation: Douanes maliennes
    language: fr
    routes:
      - name: opioides-mali
        countries: [ML]
        families: [nitazene, fentanyl, other_opioid]
        min_severity: warning
        channel: {{type: webhook, url: "{url}"}}
  - id: fr-paris-ofast
    name: Julien Martin
    language: en
    routes:
      - name: all-opioids
        families: [nitazene, fentanyl]
        channel: {{type: email, to: "{smtp_to}"}}
"""


class ThreadedReceiver:
    """A webhook receiver in a thread, for tests whose main thread blocks (child processes, Kafka).

    Verifies like a real receiver; ``override`` answers every request with that status instead (an outage).
    """

    def __init__(self, secret: str = SECRET) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.secret = secret
        self.override: int | None = None
        self.requests: list[tuple[str, int]] = []  # (idempotency key, status answered)
        self.seen: set[str] = set()
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = dict(self.headers.items())
                with receiver._lock:
                    status = receiver.override
                    if status is None:
                        try:
                            verify_webhook(receiver.secret, headers, body, time.time(), seen_ids=receiver.seen)
                            status = 200
                        except WebhookRejected as error:
                            status = error.status
                    receiver.requests.append((headers.get(IDEMPOTENCY_HEADER, ""), status))
                self.send_response(status)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def snapshot(self) -> list[tuple[str, int]]:
        with self._lock:
            return list(self.requests)

    def accepted(self) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for key, status in self.snapshot():
            if status == 200:
                counts[key] += 1
        return dict(counts)

    def __enter__(self) -> ThreadedReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def run_delivery_worker(data_dir: str, bootstrap: str, topic: str, subscriptions: str, app_id: str) -> None:
    """A worker with only the delivery agent (own embedded ClickHouse in ``data_dir``), as the real one wires it.

    Run as ``python -m tests.delivery_helpers DATA_DIR BOOTSTRAP TOPIC SUBSCRIPTIONS APP_ID``.
    """
    import faust

    from synthwatch.clickhouse import connect, migrate
    from synthwatch.settings import Settings
    from synthwatch.stream_apps.delivery import DeliveryService, RetryPolicy, attach_delivery

    settings = Settings(
        data_dir=Path(data_dir),
        topic_alerts=topic,
        subscriptions_file=Path(subscriptions),
        webhook_secret=SECRET,
        app_id=app_id,
        broker_session_timeout=3.0,
    )
    client = connect(settings)
    migrate(client)
    app = faust.App(
        app_id,
        broker=f"kafka://{bootstrap}",
        store="memory://",
        datadir=str(settings.data_dir / "faust"),
        web_enabled=False,
        topic_partitions=settings.partitions,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=settings.broker_session_timeout,
        broker_heartbeat_interval=0.5,
        broker_commit_interval=0.5,
        stream_wait_empty=False,
    )
    alerts = app.topic(topic, key_serializer="raw", value_serializer="raw")
    policy = RetryPolicy(max_attempts=1000, base_delay_s=0.2, max_delay_s=0.5, jitter=0.0)
    attach_delivery(app, alerts, DeliveryService.from_settings(settings, client, policy=policy), batch=50, within=0.1)
    faust.Worker(app, loglevel="warning", quiet=True, redirect_stdouts=False).execute_from_commandline()


if __name__ == "__main__":
    import sys

    run_delivery_worker(*sys.argv[1:6])
