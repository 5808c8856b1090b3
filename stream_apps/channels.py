"""Sending one message on one channel, and telling a retryable failure from a permanent one.

Webhook: a JSON POST signed with HMAC-SHA256 over ``timestamp + "." + body``; the receiver checks the
signature, refuses a timestamp outside its tolerance (a captured request cannot be replayed later) and
refuses an ``Idempotency-Key`` (the alert id) it has already accepted for the same officer: one endpoint
may serve several officers (:func:`verify_webhook` does all three). A 409 from the receiver therefore means
"already have it" and counts as delivered: our earlier attempt arrived but its answer was lost.

E-mail: smtplib in its own small thread pool (a hung SMTP server must not starve the threads ClickHouse
calls run in), STARTTLS and login when configured, a plain-text and an HTML part, and a Message-ID
derived from (alert, officer, channel) so a resend after a crash can be recognised by mail systems.

Every sender returns a :class:`SendResult` instead of raising: the delivery service decides on retries.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import smtplib
import ssl
import time
from collections.abc import Callable, Mapping, MutableSet, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from email.utils import formatdate
from functools import partial

import aiohttp

from synthwatch.settings import Settings

from .messages import Message

SIGNATURE_HEADER = "X-Synthwatch-Signature"
TIMESTAMP_HEADER = "X-Synthwatch-Timestamp"
EVENT_HEADER = "X-Synthwatch-Event"
IDEMPOTENCY_HEADER = "Idempotency-Key"
USER_AGENT = "synthwatch-delivery/1"


@dataclass(frozen=True, slots=True)
class SendResult:
    """What one attempt achieved; ``code`` is the HTTP status or SMTP reply code, when one came."""

    ok: bool
    code: int | None
    reason: str
    retryable: bool = False


# --- webhook ------------------------------------------------------------------------------------------------


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """``sha256=<hex HMAC-SHA256(secret, timestamp + "." + body)>``: the timestamp is signed with the body."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return f"sha256={mac.hexdigest()}"


def webhook_headers(secret: str, body: bytes, idempotency_key: str, event: str, now: float) -> dict[str, str]:
    timestamp = str(int(now))
    return {
        "Content-Type": "application/json; charset=utf-8",
        "User-Agent": USER_AGENT,
        TIMESTAMP_HEADER: timestamp,
        SIGNATURE_HEADER: sign(secret, timestamp, body),
        IDEMPOTENCY_HEADER: idempotency_key,
        EVENT_HEADER: event,
    }


class WebhookRejected(Exception):
    """A request the receiver must refuse; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def verify_webhook(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    now: float,
    tolerance_s: float = 300,
    seen_ids: MutableSet[str] | None = None,
) -> str:
    """Check a received webhook; returns its idempotency key, or raises :class:`WebhookRejected`.

    401: missing or wrong signature (or body changed); 400: timestamp missing or more than
    ``tolerance_s`` from ``now`` (a replay of a captured request); 409: already accepted. ``seen_ids``
    holds ``<officer_id>/<key>`` (the officer read from the signed body): the key is the alert id, and
    one endpoint may serve several officers, each of whom must get the alert. Keep ``seen_ids`` for at
    least the tolerance window (longer also absorbs our retries after a lost answer).
    """
    lower = {k.lower(): v for k, v in headers.items()}
    signature = lower.get(SIGNATURE_HEADER.lower(), "")
    timestamp = lower.get(TIMESTAMP_HEADER.lower(), "")
    key = lower.get(IDEMPOTENCY_HEADER.lower(), "")
    if not signature or not timestamp:
        raise WebhookRejected(401, f"missing {SIGNATURE_HEADER} or {TIMESTAMP_HEADER}")
    if not hmac.compare_digest(sign(secret, timestamp, body), signature):
        raise WebhookRejected(401, "signature does not match the body and timestamp")
    try:
        sent_at = int(timestamp)
    except ValueError:
        raise WebhookRejected(400, f"{TIMESTAMP_HEADER} is not a Unix time") from None
    if abs(now - sent_at) > tolerance_s:
        raise WebhookRejected(
            400, f"timestamp {sent_at} is {now - sent_at:.0f} s from now (tolerance {tolerance_s:g} s)"
        )
    if not key:
        raise WebhookRejected(400, f"missing {IDEMPOTENCY_HEADER}")
    if seen_ids is not None:
        scoped = f"{_officer_of(body)}/{key}"
        if scoped in seen_ids:
            raise WebhookRejected(409, f"{IDEMPOTENCY_HEADER} {key} already received")
        seen_ids.add(scoped)
    return key


def _officer_of(body: bytes) -> str:
    """The ``officer_id`` of a synthwatch payload ('' for any other body); trusted once the signature is."""
    try:
        data = json.loads(body)
    except ValueError:
        return ""
    return str(data.get("officer_id") or "") if isinstance(data, dict) else ""


def classify_http(status: int, body: str = "") -> SendResult:
    """2xx delivered; 409 already delivered; 408/425/429/5xx worth retrying; anything else is permanent."""
    detail = f"HTTP {status}" + (f": {body.strip()[:200]}" if body.strip() else "")
    if 200 <= status < 300:
        return SendResult(True, status, f"HTTP {status}")
    if status == 409:
        return SendResult(True, status, f"receiver already had it ({detail})")
    if status in (408, 425, 429) or status >= 500:
        return SendResult(False, status, detail, retryable=True)
    if 300 <= status < 400:
        return SendResult(False, status, f"{detail} (redirects are not followed: fix the URL)")
    return SendResult(False, status, detail)


class WebhookSender:
    """POSTs signed JSON with one pooled aiohttp session (created in the running loop, on first use)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._session: aiohttp.ClientSession | None = None

    async def post(
        self, url: str, body: bytes, *, secret: str, idempotency_key: str, event: str, timeout_s: float
    ) -> SendResult:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64, limit_per_host=8))
        headers = webhook_headers(secret, body, idempotency_key, event, self.clock())
        try:
            async with self._session.post(
                url, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout_s), allow_redirects=False
            ) as response:
                text = await response.text(errors="replace")
                return classify_http(response.status, text)
        except TimeoutError:
            return SendResult(False, None, f"no answer within {timeout_s:g} s", retryable=True)
        except aiohttp.InvalidURL as error:
            return SendResult(False, None, f"invalid URL: {error}")
        except (aiohttp.ClientError, OSError) as error:
            return SendResult(False, None, f"{type(error).__name__}: {error}", retryable=True)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


# --- e-mail -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SmtpConfig:
    """The SMTP server (from settings); ``ssl_context`` lets tests and private CAs verify STARTTLS."""

    host: str
    port: int = 587
    starttls: bool = True
    username: str | None = None
    password: str | None = None
    sender: str = "synthwatch@localhost"
    ssl_context: ssl.SSLContext | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> SmtpConfig | None:
        if not settings.smtp_host:
            return None
        return cls(
            host=settings.smtp_host,
            port=settings.smtp_port,
            starttls=settings.smtp_starttls,
            username=settings.smtp_username,
            password=settings.smtp_password,
            sender=settings.smtp_sender,
        )


def build_email(
    message: Message, *, sender: str, to: Sequence[str], message_id: str, headers: Mapping[str, str] | None = None
) -> EmailMessage:
    """A multipart/alternative e-mail: the plain text first, the HTML as the preferred alternative."""
    email = EmailMessage()
    email["Subject"] = message.subject
    email["From"] = sender
    email["To"] = ", ".join(to)
    email["Date"] = formatdate(usegmt=True)
    domain = sender.rsplit("@", 1)[-1] or "synthwatch.invalid"
    email["Message-ID"] = f"<{message_id}@{domain}>"
    email["Auto-Submitted"] = "auto-generated"  # RFC 3834: no vacation replies to a robot
    for name, value in (headers or {}).items():
        email[name] = value
    email.set_content(message.text)
    email.add_alternative(message.html, subtype="html")
    email["Content-Language"] = message.language  # after the parts: making them moves Content-* headers down
    return email


def message_id(*parts: str) -> str:
    """Same (alert, officer, channel) -> same Message-ID, so a resend after a crash is recognisable."""
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]


class SmtpSender:
    """Sends through smtplib in a dedicated thread pool; one connection per message (alerts are rare)."""

    def __init__(self, config: SmtpConfig, max_connections: int = 4) -> None:
        self.config = config
        self._executor = ThreadPoolExecutor(max_workers=max_connections, thread_name_prefix="synthwatch-smtp")

    async def send(self, email: EmailMessage, timeout_s: float) -> SendResult:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, partial(self._send, email, timeout_s))

    def _send(self, email: EmailMessage, timeout_s: float) -> SendResult:
        c = self.config
        recipients = [a.strip() for a in str(email["To"]).split(",") if a.strip()]
        try:
            with smtplib.SMTP(c.host, c.port, timeout=timeout_s) as smtp:
                smtp.ehlo()
                if c.starttls:
                    smtp.starttls(context=c.ssl_context or ssl.create_default_context())
                    smtp.ehlo()
                if c.username:
                    smtp.login(c.username, c.password or "")
                code, reply = smtp.mail(c.sender)
                if code != 250:
                    raise smtplib.SMTPSenderRefused(code, reply, c.sender)
                refused = {}
                for address in recipients:
                    code, reply = smtp.rcpt(address)
                    if code not in (250, 251):
                        refused[address] = (code, reply)
                if len(refused) == len(recipients):
                    smtp.rset()
                    raise smtplib.SMTPRecipientsRefused(refused)
                code, reply = smtp.data(email.as_bytes(policy=SMTP_POLICY))
                if code != 250:
                    raise smtplib.SMTPDataError(code, reply)
        except smtplib.SMTPRecipientsRefused as error:
            codes = [code for code, _ in error.recipients.values()]
            worst = max(codes)
            listed = "; ".join(f"{a}: {code} {r.decode(errors='replace')}" for a, (code, r) in error.recipients.items())
            return SendResult(
                False, worst, f"recipients refused: {listed}", retryable=all(400 <= x < 500 for x in codes)
            )
        except smtplib.SMTPResponseException as error:
            raw = error.smtp_error
            said = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
            permanent = not 400 <= error.smtp_code < 500
            return SendResult(False, error.smtp_code, f"SMTP {error.smtp_code}: {said}", retryable=not permanent)
        except smtplib.SMTPNotSupportedError as error:
            return SendResult(False, None, f"server does not support it: {error} (check SYNTHWATCH_SMTP_STARTTLS)")
        except ssl.SSLError as error:
            return SendResult(False, None, f"TLS failed: {error}")
        except (smtplib.SMTPException, OSError) as error:
            return SendResult(False, None, f"{type(error).__name__}: {error}", retryable=True)
        text = reply.decode(errors="replace")
        if refused:
            listed = "; ".join(f"{a}: {code}" for a, (code, _) in refused.items())
            return SendResult(True, code, f"SMTP {code}: {text}; refused: {listed}")
        return SendResult(True, code, f"SMTP {code}: {text}")

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
