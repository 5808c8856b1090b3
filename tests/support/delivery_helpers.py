"""Real receivers for delivery tests: an aiohttp webhook server and an aiosmtpd SMTP server on free ports.

The webhook receiver verifies every request as a real receiver would (signature under the officer's
own secret, timestamp, replayed delivery id) and can be scripted to fail first (``statuses``) or to hang
(``delay_s``). Every test officer has its own secret (:func:`secret_for`), and loopback receivers are
allowed explicitly (:data:`LOOPBACK`): the default policy refuses them.
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

from synthwatch.schemas import Alert, AlertSubstance
from synthwatch.stack.broker import free_port
from synthwatch.stream_apps.delivery.webhook import WebhookRejected, verify
from synthwatch.stream_apps.detect.corrections import CitedAlert

SECRET = "test-secret-Bamako"
LOOPBACK = ("127.0.0.0/8",)
"""What tests allow webhooks to reach on purpose (their receivers listen on 127.0.0.1)."""


def secret_for(officer_id: str) -> str:
    """Each test officer's own webhook secret (a receiver looks it up by the officer id in the body)."""
    return f"{SECRET}-{officer_id}"


def hook(url: str, officer_id: str, **extra: Any) -> str:
    """A YAML flow mapping for a webhook channel with the officer's own secret."""
    fields = "".join(f", {k}: {v}" for k, v in extra.items())
    return f"{{type: webhook, url: '{url}', secret: '{secret_for(officer_id)}'{fields}}}"


def officer_of(body: bytes) -> str:
    """The (unverified) officer id a request claims: only to pick the secret it must be signed with."""
    import json

    try:
        data = json.loads(body)
    except ValueError:
        return ""
    return str(data.get("officer_id", "")) if isinstance(data, dict) else ""


def check_request(headers: dict[str, str], body: bytes, seen: set[str], tolerance_s: float = 300) -> int:
    """What a real receiver answers: 200, or the status :func:`verify` refuses it with."""
    try:
        verify(secret_for(officer_of(body)), headers, body, now=time.time(), tolerance_s=tolerance_s, seen=seen)
    except WebhookRejected as error:
        return error.status
    return 200


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
        """The alert id (or digest id) in the body: what one officer must get once."""
        data = self.json()
        return str(data.get("alert_id") or data.get("digest_id") or "")

    def json(self) -> Any:
        import json

        return json.loads(self.body)


@dataclass
class WebhookReceiver:
    """``async with WebhookReceiver(statuses={"flaky": [503]}) as hooks: hooks.url("flaky")``."""

    statuses: dict[str, list[int]] = field(default_factory=dict)  # scripted answers per path, then verification
    delay_s: dict[str, float] = field(default_factory=dict)
    #: Requests to these paths wait, once arrived, until their event is set (a receiver that has not answered yet).
    gates: dict[str, asyncio.Event] = field(default_factory=dict)
    tolerance_s: float = 300
    requests: list[Received] = field(default_factory=list)  # answered requests
    arrivals: list[str] = field(default_factory=list)  # the path of every request as it arrives, answered or not
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

    async def until(self, name: str, arrived: int, answered: int = 0, timeout_s: float = 60.0) -> None:
        """Wait until ``arrived`` requests have come to ``name`` and ``answered`` of them have been answered: what a
        test waits for, instead of sleeping for a time that a loaded machine may not keep to."""
        deadline = time.monotonic() + timeout_s
        while self.arrivals.count(name) < arrived or len(self.on(name)) < answered:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{name}: {self.arrivals.count(name)} requests arrived, {len(self.on(name))} answered in "
                    f"{timeout_s:g} s; expected {arrived} and {answered}"
                )
            await asyncio.sleep(0.005)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        body = await request.read()
        headers = dict(request.headers)
        self.arrivals.append(name)
        if self.delay_s.get(name):
            await asyncio.sleep(self.delay_s[name])
        if name in self.gates:
            await self.gates[name].wait()
        scripted = self.statuses.get(name)
        if scripted:
            status, text = scripted.pop(0), "scripted failure"
        else:
            status = check_request(headers, body, self.seen, self.tolerance_s)
            text = "ok" if status == 200 else "refused"
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
    """A real aiosmtpd server on a free loopback port.

    ``tls_dir`` given: STARTTLS required, and AUTH LOGIN (only after STARTTLS); with ``implicit_tls`` too:
    SMTPS (TLS from the first byte). ``plain_auth``: no TLS at all and AUTH offered in clear, as a badly
    configured relay would; ``auth_attempts`` counts the logins the server saw.
    """

    def __init__(
        self,
        tls_dir: Path | None = None,
        username: str = "officer-bot",
        password: str = "s3cret",
        *,
        implicit_tls: bool = False,
        plain_auth: bool = False,
    ) -> None:
        self.inbox = _Inbox()
        self.port = free_port("127.0.0.1")
        self.username, self.password = username, password
        self.client_context: ssl.SSLContext | None = None
        self.auth_attempts = 0
        kwargs: dict[str, Any] = {}
        if tls_dir is not None:
            cert, key = self_signed_certificate(tls_dir)
            server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            server_context.load_cert_chain(cert, key)
            self.client_context = ssl.create_default_context(cafile=str(cert))
            kwargs = {"authenticator": self._authenticate, "auth_require_tls": True}
            if implicit_tls:  # aiosmtpd counts only STARTTLS as TLS for auth_require_tls; here all of it is
                kwargs |= {"ssl_context": server_context, "auth_require_tls": False}
            else:
                kwargs |= {"tls_context": server_context, "require_starttls": True}
        elif plain_auth:
            kwargs = {"authenticator": self._authenticate, "auth_require_tls": False}
        self.controller = Controller(self.inbox, hostname="127.0.0.1", port=self.port, **kwargs)

    def _authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        self.auth_attempts += 1
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
webhook_allowed_networks: [127.0.0.0/8]
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
        channel: {hook(url, "ml-bko-douanes")}
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

    Verifies like a real receiver; ``override`` answers every request with that status instead (an outage),
    ``refuse`` answers 503 for the alert ids it holds (one alert's delivery keeps failing).
    """

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.override: int | None = None
        self.refuse: set[str] = set()
        self.requests: list[tuple[str, int]] = []  # (alert id claimed in the body, status answered)
        self.seen: set[str] = set()
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = dict(self.headers.items())
                with receiver._lock:
                    status = receiver.override
                    if status is None and _alert_of(body) in receiver.refuse:
                        status = 503
                    if status is None:
                        status = check_request(headers, body, receiver.seen)
                    receiver.requests.append((_alert_of(body), status))
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


def _alert_of(body: bytes) -> str:
    import json

    try:
        return str(json.loads(body).get("alert_id", ""))
    except (ValueError, AttributeError):
        return ""


def run_delivery_worker(data_dir: str, bootstrap: str, topic: str, subscriptions: str, app_id: str) -> None:
    """A worker with only the delivery agent (own embedded ClickHouse in ``data_dir``), as the real one wires it.

    Run as ``python -m tests.support.delivery_helpers DATA_DIR BOOTSTRAP TOPIC SUBSCRIPTIONS APP_ID``.
    """

    from synthwatch.settings import Settings
    from synthwatch.stack.service_worker import ServiceWorker
    from synthwatch.stream_apps.delivery.service import DeliveryService, RetryPolicy, attach_delivery
    from synthwatch.stream_apps.runtime.batches import channel_batches
    from synthwatch.stream_apps.runtime.transport import App
    from synthwatch.stream_apps.storage.clickhouse import connect, migrate

    settings = Settings(
        data_dir=Path(data_dir),
        topic_alerts=topic,
        subscriptions_file=Path(subscriptions),
        app_id=app_id,
        broker_session_timeout=3.0,
    )
    client = connect(settings)
    migrate(client)
    app = App(  # the worker's app class: its consumer's commits and fetches, not Faust's defaults
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
    service = DeliveryService.from_settings(settings, client, policy=policy)
    attach_delivery(app, alerts, service, batches=lambda stream: channel_batches(stream, 50))
    # the worker class of `synthwatch worker`: its loop closes without mode's idle second after a stop
    ServiceWorker(app, loglevel="warning", quiet=True, redirect_stdouts=False).execute_from_commandline()


if __name__ == "__main__":
    import sys

    run_delivery_worker(*sys.argv[1:6])


def cited(alert: Alert) -> CitedAlert:
    """What a correction notice cites of ``alert`` (as storage reads it back from the alerts table)."""
    return CitedAlert(
        alert.alert_id,
        alert.alert_type,
        alert.severity,
        alert.country,
        alert.region,
        alert.substance,
        alert.window_start,
        alert.window_end,
        alert.triggered_at,
        tuple(alert.evidence_event_ids),
        alert.detected_at,
    )
