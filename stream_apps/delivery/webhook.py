"""Webhooks: signing, verification and sending, in one place (docs/security.md, "Webhooks and delivery").

A webhook is a JSON POST signed with HMAC-SHA256 under the subscriber's own secret (scheme ``v1``, see
:func:`sign`; a secret has at least :data:`MIN_SECRET_LENGTH` characters). What is signed is
``timestamp.delivery_id.event.body``, so none of the four can be changed or moved to another request; the
body repeats ``delivery_id`` and ``kind`` (= event), and carries ``alert_id`` (or ``digest_id``) and
``officer_id``, so a receiver de-duplicates on signed ids. :func:`verify` is what a receiver runs:
signature, a timestamp inside the tolerance window (a captured request cannot be replayed later), ids in
the body equal to the signed ones, and a delivery id not accepted before (a replay inside the window). A
409 from the receiver therefore means "already have it" and counts as delivered: our earlier attempt
arrived but its answer was lost. The delivery id is derived from (alert, officer, channel), so our own
retries reuse it.

Connections go only to public addresses or to networks the administrator allowed
(:class:`~.targets.TargetPolicy`, checked on every address DNS returns: :class:`GuardedResolver`).
The sender returns a :class:`~.results.SendResult` instead of raising.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import socket
import time
from collections.abc import Callable, Iterable, Mapping, MutableSet
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from synthwatch.errors import SynthwatchError
from synthwatch.stream_apps.delivery.results import SendResult
from synthwatch.stream_apps.delivery.targets import TargetPolicy, in_clear

MIN_SECRET_LENGTH = 16
"""Shortest webhook secret accepted (characters); ``openssl rand -hex 32`` gives 64."""

SIGNATURE_HEADER = "Synthwatch-Signature"
DELIVERY_HEADER = "Synthwatch-Delivery-Id"
EVENT_HEADER = "Synthwatch-Event"
IDEMPOTENCY_HEADER = "Idempotency-Key"  # = the delivery id, for HTTP middleware; not signed on its own
USER_AGENT = "synthwatch-delivery/2"
SIGNATURE_VERSION = "v1"
DEFAULT_TOLERANCE_S = 300.0

_DELIVERY_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_EVENT = re.compile(r"^[a-z_]{1,32}$")


def delivery_id(*parts: str) -> str:
    """The id of one delivery, e.g. (alert, officer, channel): the same on every retry, unique per officer."""
    return "d_" + hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]


def _signed_bytes(timestamp: int, delivery: str, event: str, body: bytes) -> bytes:
    if not _DELIVERY_ID.match(delivery):
        raise ValueError(f"delivery id {delivery!r} must match {_DELIVERY_ID.pattern}")
    if not _EVENT.match(event):
        raise ValueError(f"event {event!r} must match {_EVENT.pattern}")
    return f"{timestamp}.{delivery}.{event}.".encode() + body


def sign(secret: str, body: bytes, *, delivery_id: str, event: str, timestamp: int) -> str:
    """The ``Synthwatch-Signature`` value: ``t=<unix seconds>,v1=<hex>``.

    ``v1`` = hex HMAC-SHA256(secret, ``"<t>.<delivery_id>.<event>."`` + body). No part can contain a
    dot (ids are ``[A-Za-z0-9_-]``, events ``[a-z_]``, t digits), so the signed string is unambiguous.
    A later scheme adds ``v2=...`` beside ``v1``; receivers ignore versions they do not know.
    """
    mac = hmac.new(secret.encode(), _signed_bytes(timestamp, delivery_id, event, body), hashlib.sha256)
    return f"t={timestamp},{SIGNATURE_VERSION}={mac.hexdigest()}"


def webhook_headers(secret: str, body: bytes, delivery: str, event: str, now: float) -> dict[str, str]:
    """Headers of one POST: signed now (each retry is signed again, with its own timestamp)."""
    return {
        "Content-Type": "application/json; charset=utf-8",
        "User-Agent": USER_AGENT,
        SIGNATURE_HEADER: sign(secret, body, delivery_id=delivery, event=event, timestamp=int(now)),
        DELIVERY_HEADER: delivery,
        EVENT_HEADER: event,
        IDEMPOTENCY_HEADER: delivery,
    }


class WebhookRejected(SynthwatchError):
    """A request the receiver must refuse; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True, slots=True)
class VerifiedWebhook:
    """A request :func:`verify` accepted: its signed ids and the parsed body."""

    delivery_id: str
    event: str
    timestamp: int
    payload: dict[str, Any]


def _parse_signature(value: str) -> tuple[int | None, list[str]]:
    timestamp: int | None = None
    macs: list[str] = []
    for item in value.split(","):
        name, _, text = item.strip().partition("=")
        if name == "t" and text.isdigit():
            timestamp = int(text)
        elif name == SIGNATURE_VERSION:
            macs.append(text)
    return timestamp, macs


def verify(
    secrets: str | Iterable[str],
    headers: Mapping[str, str],
    body: bytes,
    *,
    now: float,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    seen: MutableSet[str] | None = None,
) -> VerifiedWebhook:
    """Check a received webhook as a receiver must; returns it verified, or raises :class:`WebhookRejected`.

    ``secrets``: the subscriber's secret (several while rotating: any may match). 401: signature
    missing or wrong (body, timestamp, delivery id or event changed, or another subscriber's secret);
    400: timestamp more than ``tolerance_s`` from ``now`` (a captured request replayed later), or a body
    whose ``delivery_id``/``kind`` differ from the signed ones; 409: delivery id already in ``seen``
    (a replay inside the window, or our retry after a lost answer). Keep ``seen`` at least as long
    as the tolerance window; longer (days) also absorbs our retries. The id is added only on success.
    """
    keys = [secrets] if isinstance(secrets, str) else list(secrets)
    lower = {k.lower(): v for k, v in headers.items()}
    timestamp, macs = _parse_signature(lower.get(SIGNATURE_HEADER.lower(), ""))
    delivery = lower.get(DELIVERY_HEADER.lower(), "")
    event = lower.get(EVENT_HEADER.lower(), "")
    if timestamp is None or not macs:
        raise WebhookRejected(401, f"missing or malformed {SIGNATURE_HEADER} (expected t=...,v1=...)")
    if not _DELIVERY_ID.match(delivery) or not _EVENT.match(event):
        raise WebhookRejected(401, f"missing or malformed {DELIVERY_HEADER} or {EVENT_HEADER}")
    signed = _signed_bytes(timestamp, delivery, event, body)
    expected = [hmac.new(k.encode(), signed, hashlib.sha256).hexdigest() for k in keys if k]
    if not any(hmac.compare_digest(e, m) for e in expected for m in macs):
        raise WebhookRejected(401, "signature does not match (body, timestamp, delivery id, event or secret)")
    if abs(now - timestamp) > tolerance_s:
        raise WebhookRejected(
            400, f"timestamp {timestamp} is {now - timestamp:.0f} s from now (tolerance {tolerance_s:g} s)"
        )
    try:
        payload = json.loads(body)
    except ValueError:
        raise WebhookRejected(400, "body is not JSON") from None
    if not isinstance(payload, dict) or payload.get("delivery_id") != delivery or payload.get("kind") != event:
        raise WebhookRejected(400, "body's delivery_id/kind differ from the signed ones")
    if seen is not None:
        if delivery in seen:
            raise WebhookRejected(409, f"delivery {delivery} already received")
        seen.add(delivery)
    return VerifiedWebhook(delivery, event, timestamp, payload)


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


class TargetRefused(SynthwatchError, OSError):
    """A webhook host resolved to an address the :class:`TargetPolicy` refuses."""


class GuardedResolver(AbstractResolver):
    """DNS for webhooks: every address of a name must pass the policy, else no connection at all.

    aiohttp connects to exactly the addresses the resolver returned, so a name cannot resolve to a
    public address for a check and to a private one for the connection (DNS rebinding).
    """

    def __init__(self, policy: TargetPolicy, inner: AbstractResolver | None = None, *, plain: bool = False) -> None:
        self.policy = policy
        self.inner = inner or DefaultResolver()
        self.plain = plain  # for http:// URLs: public addresses refused too (TargetPolicy.refusal)

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self.inner.resolve(host, port, family)
        for item in found:
            reason = self.policy.refusal(host, str(item["host"]), plain=self.plain)
            if reason is not None:
                raise TargetRefused(reason)
        return found

    async def close(self) -> None:
        await self.inner.close()


def _refused_by(error: BaseException) -> TargetRefused | None:
    """The TargetRefused inside an aiohttp connection error, if that is what it was."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, TargetRefused):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


#: Bytes of a refusing receiver's answer read for the delivery record (which keeps 200 characters of it).
ANSWER_BYTES = 1024


async def _answer_text(response: aiohttp.ClientResponse) -> str:
    """The start of a refusal's body, as UTF-8, for the record; never more than :data:`ANSWER_BYTES`.

    The receiver is not ours: ``response.text()`` read the whole body into memory, waited for a body that never
    ended until the attempt's timeout (a 2xx followed by an endless body was recorded as "no answer"), and decoded it
    with the charset the receiver named, on the event loop: ``charset=punycode`` decodes in quadratic time, so
    one answer held every agent of the worker for seconds.
    """
    chunks: list[bytes] = []
    size = 0
    try:
        while size < ANSWER_BYTES and (chunk := await response.content.read(ANSWER_BYTES - size)):
            chunks.append(chunk)
            size += len(chunk)
    except (TimeoutError, aiohttp.ClientError):
        pass  # the status has arrived: it is the answer, whatever became of the body
    return b"".join(chunks).decode("utf-8", errors="replace")


class WebhookSender:
    """POSTs signed JSON with one pooled aiohttp session (created in the running loop, on first use)."""

    def __init__(self, clock: Callable[[], float] = time.time, policy: TargetPolicy | None = None) -> None:
        self.clock = clock
        self.policy = policy or TargetPolicy()
        self._sessions: dict[bool, aiohttp.ClientSession] = {}  # plain (http://) or not: each its own resolver

    async def post(
        self, url: str, body: bytes, *, secret: str, delivery_id: str, event: str, timeout_s: float
    ) -> SendResult:
        plain = in_clear(url)
        # IP literals skip the resolver: judged here
        refused = self.policy.literal_refusal(urlsplit(url).hostname or "", plain=plain)
        if refused is not None:
            return SendResult(False, None, refused)
        session = self._sessions.get(plain)
        if session is None or session.closed:
            # no connection limits here: the delivery service limits attempts per endpoint and in total
            resolver = GuardedResolver(self.policy, plain=plain)
            connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, resolver=resolver)
            session = self._sessions[plain] = aiohttp.ClientSession(connector=connector, trust_env=False)
        headers = webhook_headers(secret, body, delivery_id, event, self.clock())
        try:
            async with session.post(
                url, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout_s), allow_redirects=False
            ) as response:
                delivered = classify_http(response.status)
                if delivered.ok:
                    return delivered  # the status is the answer: its body is never read
                return classify_http(response.status, await _answer_text(response))
        except TimeoutError:
            return SendResult(False, None, f"no answer within {timeout_s:g} s", retryable=True)
        except aiohttp.InvalidURL as error:
            return SendResult(False, None, f"invalid URL: {error}")
        except (aiohttp.ClientError, OSError) as error:
            target = _refused_by(error)
            if target is not None:
                return SendResult(False, None, str(target))
            return SendResult(False, None, f"{type(error).__name__}: {error}", retryable=True)

    async def close(self) -> None:
        sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            await session.close()
