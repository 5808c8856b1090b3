"""The HTTP intake gateway: labs and customs without a Kafka client POST their reports over HTTPS.

One route, ``POST /v1/reports``, takes NDJSON, a JSON array (or one object) or CSV, authenticated by a
bearer token of the organisation (producers/gateway_tokens.py). Each record gets a verdict: accepted
(acknowledged by Kafka), rejected with the reason (also a changed record under an ``event_id`` seen earlier
in the request), duplicate (the same ``event_id`` and content earlier in the request, or already accepted
by this gateway), or failed (not acknowledged: send it again); the answer counts them all and lists those
not accepted (capped). A request holds at most SYNTHWATCH_GATEWAY_MAX_RECORDS records. The records are
validated by the wire contract and produced by the same :class:`~synthwatch.producers.publisher.Publisher`
as ``synthwatch publish``: refused records go to the rejects topic with their reason, and when the gateway
holds the organisation keys file every record carries the organisation's signed envelope, which the worker
checks as it checks any publisher's.

A token is bound to the lab ids / agencies of its organisation: a record claiming another lab or agency is
rejected (``auth: not_permitted``) and never produced. FastAPI (on Starlette, served by uvicorn) parses the
HTTP; its OpenAPI description is served, to token holders, at ``GET /v1/openapi.json`` and printed by
``synthwatch gateway --openapi``. The threat model is in docs/security.md#http-intake-gateway.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations, which name locals.
import asyncio
import codecs
import io
import json
import logging
import math
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.middleware.trustedhost import TrustedHostMiddleware

from synthwatch.errors import SynthwatchError
from synthwatch.producers.gateway_tokens import GatewayToken, TokenStore
from synthwatch.producers.publisher import Publisher, Signing
from synthwatch.producers.readers import InputRecord, read_csv, read_ndjson
from synthwatch.schemas import BorderSeizure, LabDetection
from synthwatch.schemas.envelope import Organisation
from synthwatch.schemas.records import MAX_REASON_CHARS
from synthwatch.settings import Settings

log = logging.getLogger("synthwatch.producers.gateway")

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]")

#: Content types accepted, by the reader they select.
CONTENT_TYPES: dict[str, Literal["ndjson", "json", "csv"]] = {
    "application/x-ndjson": "ndjson",
    "application/ndjson": "ndjson",
    "application/jsonl": "ndjson",
    "application/json": "json",
    "text/csv": "csv",
}

#: ``event_id`` -> content hash of records this gateway accepted, to answer "duplicate" across requests.
RECENT_IDS = 200_000

Verdict = Literal["accepted", "rejected", "duplicate", "failed"]


# --- the response (its models are the OpenAPI description) -------------------------------------------------


class RecordVerdict(BaseModel):
    """What happened to one record of the request."""

    position: int = Field(
        description="Line of the NDJSON or CSV body (the CSV header is line 1), or element "
        "number of a JSON array (from 1)."
    )
    event_id: str | None = Field(default=None, description="The record's event_id, when one could be read.")
    verdict: Verdict = Field(
        description="accepted: acknowledged by Kafka; rejected: refused with `reason` (fix and re-send); "
        "duplicate: its event_id came earlier in this request or was already accepted here; failed: not "
        "acknowledged by Kafka, send it again."
    )
    reason: str | None = None


class IntakeResult(BaseModel):
    """Counts of every record (received = accepted + rejected + duplicates + failed) and the records not accepted.

    Accepted records are not listed: a record whose position is not in ``records`` was accepted, unless
    ``unlisted`` is above 0: the list is capped, and which of the others were not accepted is not said; fix the
    listed ones and send the whole request again (records this gateway already accepted come back as
    duplicates, not published twice).
    """

    request_id: str = Field(description="Quote it to the operators; rejects carry it in their source.")
    org_id: str
    received: int
    accepted: int
    rejected: int
    duplicates: int
    failed: int
    records: list[RecordVerdict] = Field(
        description="The records not accepted (rejected, duplicate, failed), in request order, the first "
        "SYNTHWATCH_GATEWAY_MAX_LISTED_VERDICTS of them."
    )
    unlisted: int = Field(
        default=0,
        description="Records not accepted beyond the listed ones (counted above); when above 0, fix the listed ones "
        "and send the whole request again: records already accepted by this gateway come back as duplicates.",
    )
    rejects_unrecorded: int = Field(
        default=0,
        description="Rejected records not sent to the operators' rejects topic (over "
        "SYNTHWATCH_GATEWAY_MAX_REJECTS_SENT in one request); the others are there, under this request_id.",
    )


class TokenInfo(BaseModel):
    """Who a token publishes as (no secret)."""

    token_id: str
    org_id: str
    lab_ids: list[str]
    agencies: list[str]


class Problem(BaseModel):
    detail: str


# --- rate limiting ---------------------------------------------------------------------------------------


class RateLimiter:
    """A token bucket per key: ``burst`` units at once (requests, or records), then ``per_minute`` sustained.

    Pure logic with an injectable clock, so its arithmetic is unit-tested without sleeping.
    """

    def __init__(self, per_minute: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)
        self._lock = threading.Lock()

    def take(self, key: str, cost: float = 1.0) -> float:
        """0 when ``cost`` units may go on (and are taken), else the seconds to wait until they may."""
        return self._charge(key, cost, take=True)

    def wait(self, key: str, cost: float = 1.0) -> float:
        """What :meth:`take` would answer, taking nothing."""
        return self._charge(key, cost, take=False)

    def charge(self, key: str, cost: float, floor: float = 0.0) -> None:
        """Take ``cost`` units whatever the bucket holds, leaving at least ``floor`` (work already done, paid for:
        records read and then refused). A negative ``floor`` lets the debt delay the key's next units."""
        with self._lock:
            now = self.clock()
            tokens, at = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            self._buckets[key] = (min(tokens, max(max(floor, -self.burst), tokens - cost)), now)

    def _charge(self, key: str, cost: float, take: bool) -> float:
        with self._lock:
            now = self.clock()
            tokens, at = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            if tokens >= cost:
                if take:
                    self._buckets[key] = (tokens - cost, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (min(cost, self.burst) - tokens) / self.rate


# --- publishing with a verdict per record ------------------------------------------------------------------


class SigningKeyMissing(SynthwatchError, RuntimeError):
    """Signed reports are required but the gateway holds no key for the token's organisation."""


@dataclass
class _Pending:
    position: int
    event_id: str | None = None
    verdict: Verdict | None = None
    reason: str | None = None
    digest: str | None = None


@dataclass
class RequestVerdicts:
    """The verdict of every record of one request, and how many rejects were counted but not sent."""

    records: list[_Pending]
    rejects_unrecorded: int = 0


def _position(source: str) -> int:
    tail = source.rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else 0


class GatewayPublisher(Publisher):
    """The CLI's publisher, with the token's binding checked per record and a verdict kept per record.

    One Kafka producer for every organisation; requests are published one at a time (a lock) because the
    signing organisation is set per request.
    """

    def __init__(
        self,
        settings: Settings,
        bootstrap_servers: str,
        org_keys: dict[str, Organisation] | None = None,
        **overrides: Any,
    ) -> None:
        gateway_settings = settings.model_copy(update={"org_id": None, "org_key": None})
        super().__init__(gateway_settings, bootstrap_servers, **overrides)
        self.org_keys = org_keys
        self.sign_required = settings.signed_reports_required
        self._lock = threading.Lock()
        self._token: GatewayToken | None = None
        self._records: dict[str, _Pending] = {}
        self.max_rejects_sent = settings.gateway_max_rejects_sent
        self._recent: OrderedDict[tuple[str, str], str] = OrderedDict()

    def signer_for(self, org_id: str) -> Signing | None:
        """The organisation and newest key the gateway signs ``org_id``'s records with, or None (unsigned)."""
        org = (self.org_keys or {}).get(org_id)
        if org is not None:
            return Signing(org.org_id, org.keys[0], org)
        if self.sign_required or self.org_keys is not None:
            raise SigningKeyMissing(
                f"organisation {org_id!r} has no key in the organisation keys file (SYNTHWATCH_ORG_KEYS_FILE), so "
                "the worker would refuse its records: the operator must add it there and restart the gateway"
            )
        return None

    def publish_request(self, token: GatewayToken, records: Iterable[InputRecord]) -> RequestVerdicts:
        """Validate, check the binding, produce; returns one verdict per record in request order."""
        with self._lock:
            self.signer = self.signer_for(token.org_id)
            self._token, self._records = token, {}
            summary = self.publish_records(self._skip_known(token, records))
            failed = {label.removeprefix("event "): problem for label, problem in summary.failed}
            for pending in self._records.values():
                if pending.verdict is not None:
                    continue
                problem = failed.get(pending.event_id or "")
                if problem is not None:
                    pending.verdict, pending.reason = "failed", f"not acknowledged by Kafka ({problem}); send it again"
                    continue
                pending.verdict = "accepted"
                if pending.event_id is not None and pending.digest is not None:
                    self._remember((token.org_id, pending.event_id), pending.digest)
            if self.rejects_unsent:
                log.warning(
                    "token %s org %s: %d refused records over SYNTHWATCH_GATEWAY_MAX_REJECTS_SENT=%d were counted, "
                    "not sent to the rejects topic",
                    token.token_id, token.org_id, self.rejects_unsent, self.max_rejects_sent,
                )  # fmt: skip
            return RequestVerdicts(list(self._records.values()), self.rejects_unsent)

    def _remember(self, key: tuple[str, str], digest: str) -> None:
        self._recent[key] = digest
        self._recent.move_to_end(key)
        while len(self._recent) > RECENT_IDS:
            self._recent.popitem(last=False)

    def _skip_known(self, token: GatewayToken, records: Iterable[InputRecord]) -> Iterator[InputRecord]:
        """Records on to the publisher, except exact re-sends of what this gateway already accepted."""
        import hashlib

        for record in records:
            if isinstance(record, CsvRow):  # its object, built one record at a time
                record = record.object_of()
            pending = self._records[record.source] = _Pending(_position(record.source))
            pending.digest = hashlib.sha256(record.raw.encode("utf-8", errors="surrogateescape")).hexdigest()
            event_id = _cheap_event_id(record)
            if event_id is not None and self._recent.get((token.org_id, event_id)) == pending.digest:
                pending.event_id, pending.verdict = event_id, "duplicate"
                pending.reason = "already accepted by this gateway (same event_id and content)"
                continue
            yield record

    def _judge(self, record: InputRecord) -> LabDetection | BorderSeizure:
        """The publisher's judgement (a refusal raises WireError), noting the record's event id for its verdict."""
        event = super()._judge(record)
        self._records[record.source].event_id = event.event_id
        return event

    def _binding_refusal(self, event: LabDetection | BorderSeizure) -> str | None:
        """The token's binding first (its reason names the token), then the organisation's, as the publisher's."""
        assert self._token is not None
        refused = self._token.permits(
            event.lab_id if isinstance(event, LabDetection) else None,
            event.agency if isinstance(event, BorderSeizure) else None,
        )
        return refused if refused is not None else super()._binding_refusal(event)

    def _refused(self, record: InputRecord, reason: str, event_id: str | None) -> None:
        """The verdict is the publisher's decision: what went to the rejects topic is what the lab is told."""
        pending = self._records[record.source]
        pending.event_id, pending.verdict, pending.reason = event_id, "rejected", reason

    def _duplicate(self, record: InputRecord, event_id: str) -> None:
        pending = self._records[record.source]
        pending.event_id, pending.verdict = event_id, "duplicate"
        pending.reason = "the same event_id and content came earlier in this request"


def _cheap_event_id(record: InputRecord) -> str | None:
    obj = record.obj
    if obj is None and record.problem is None:
        try:
            obj = json.loads(record.raw)
        except (ValueError, RecursionError):
            return None
    value = obj.get("event_id") if isinstance(obj, dict) else None
    return value if isinstance(value, str) else None


# --- reading a request body ----------------------------------------------------------------------------------


class BodyError(SynthwatchError, ValueError):
    """The body as a whole cannot be read (not one record can be judged)."""

    #: Records read before the body was found unreadable (they cost the reading, and are charged for it).
    read: int = 0


class TooManyRecords(BodyError):
    """The body holds more records than one request may (SYNTHWATCH_GATEWAY_MAX_RECORDS): refused whole."""


def read_body(
    body: bytearray, codec: str, kind: Literal["ndjson", "json", "csv"], name: str, settings: Settings
) -> list[InputRecord]:
    """:func:`records_of` the body decoded by ``codec`` (see :func:`body_codec`); ``body`` is emptied.

    Run off the event loop: decoding alone holds it for up to 0.5 s with some codecs (8 MiB of utf-7: 0.50 s,
    utf-32: 0.28 s), during which no other request is even authenticated."""
    text = body.decode(codec, errors="surrogateescape" if codec == "utf-8" else "replace")
    body.clear()  # the bytes are not held while the records are read
    return records_of(text, kind, name, settings)


#: A CSV batch split into requests: each part needs the header row, else its first row is read as the header.
_EACH_CSV_PART = ", each beginning with the CSV header row"


def records_of(text: str, kind: Literal["ndjson", "json", "csv"], name: str, settings: Settings) -> list[InputRecord]:
    """The records of a request body, each with a ``name:position`` source (the same readers as the CLI).

    Read lazily and stopped at the first record over ``settings.gateway_max_records`` (TooManyRecords): the
    body cap bounds bytes, not records, and a body of one-byte records cost gigabytes once every record was
    built; now at most the cap's records are ever held, and nothing is published before the count is known.
    """
    limit = settings.gateway_max_records
    records: list[InputRecord] = []
    try:
        for record in _read_body(text, kind, name, settings):
            if len(records) >= limit:
                raise TooManyRecords(
                    f"the body holds more than {limit:,} records, at most {limit:,} per request "
                    "(SYNTHWATCH_GATEWAY_MAX_RECORDS): split the batch into requests of at most "
                    f"{limit:,} records{_EACH_CSV_PART if kind == 'csv' else ''}; nothing of this request was published"
                )
            records.append(record)
    except BodyError as error:
        error.read = len(records) + isinstance(error, TooManyRecords)
        raise
    return records


@dataclass(slots=True, frozen=True)
class CsvRow(InputRecord):
    """A CSV row held as its JSON text until it is judged, when its object is built again (:meth:`object_of`).

    Held as objects, 4,191 rows of 1,000 filled cells (an 8 MiB body) were 156 MiB until published; as text
    52 MiB. The object is the text's: a row's object holds strings and objects only, so JSON gives it back."""

    def object_of(self) -> InputRecord:
        return InputRecord(self.source, self.raw, json.loads(self.raw), self.problem, self.hint)


def _read_body(
    text: str, kind: Literal["ndjson", "json", "csv"], name: str, settings: Settings
) -> Iterator[InputRecord]:
    if kind == "ndjson":
        yield from read_ndjson(io.StringIO(text), name)
        return
    if kind == "csv":
        stream = io.StringIO(text, newline="")
        for row in read_csv(stream, name, settings.max_csv_header_depth, settings.max_csv_field_bytes):
            yield row if row.obj is None else CsvRow(row.source, row.raw, None, row.problem, row.hint)
        return
    for number, item in enumerate(_json_items(text, settings.max_record_bytes), start=1):
        raw = json.dumps(item, ensure_ascii=False)
        if isinstance(item, dict):  # its text only, parsed again when judged: a record's objects are not held
            yield InputRecord(source=f"{name}:{number}", raw=raw)
        else:
            problem = f"not a report: element {number} is a JSON {type(item).__name__}, not an object"
            yield InputRecord(source=f"{name}:{number}", raw=raw, problem=problem)


_DECODER = json.JSONDecoder()
#: JSON's white space, skipped by the regex engine: a Python loop took 0.51 CPU s over a body of 8 MiB of spaces
#: (no record read, so none charged).
_SPACE = re.compile(r"[ \t\n\r]*")


def _json_items(text: str, max_chars: int) -> Iterator[Any]:
    """The elements of a JSON array one at a time (or one value), so a huge array is never built whole.

    An element is decoded from a window of the text grown as needed up to ``max_chars`` (the record size
    limit): one decoded 8 MiB element of ``{}`` was ~190 MiB of objects, and so were 10,000 elements of ~840
    bytes kept as objects until published. An element not complete within the window makes the body
    unreadable (nothing published): it is over the record size limit or not JSON."""

    element = 0  # the array element being read, from 1 (0: the body is one value)

    def unreadable(why: str, inside: bool = False) -> BodyError:
        where = f", in element {element:,} of the array" if inside and element else ""
        return BodyError(
            f"the body is not JSON ({why[:200]}{where}); send a JSON array of reports; nothing of this request "
            "was published"
        )

    def value_at(at: int) -> tuple[Any, int]:
        width = min(4096, max_chars + 1)
        while True:
            window = text[at : at + width]
            whole = at + width >= len(text)
            try:
                item, end = _DECODER.raw_decode(window)
                if whole or end < len(window):  # a number at the window's end may go on past it
                    return item, at + end
            except (ValueError, RecursionError) as error:
                if whole:
                    why = f"{error.msg}: character {at + error.pos}" if isinstance(error, json.JSONDecodeError) else ""
                    raise unreadable(why or str(error), inside=True) from None
            if width > max_chars:  # over the record limit, or not JSON: it is not decoded further to know which
                what = f"element {element:,} of the array" if element else "the body's value"
                raise BodyError(
                    f"{what} (from character {at:,}) is not complete within {max_chars:,} characters, the largest a "
                    "report may be (SYNTHWATCH_MAX_RECORD_BYTES), or is not JSON: nothing of this request was "
                    f"published; shorten or fix {'that element (or leave it out)' if element else 'that report'} and "
                    "send the request again"
                )
            width = min(width * 4, max_chars + 1)

    def skip(at: int) -> int:
        found = _SPACE.match(text, at)
        return at if found is None else found.end()

    at = skip(1 if text.startswith("\ufeff") else 0)  # a BOM, as the NDJSON and CSV readers drop it
    if not text.startswith("[", at):
        item, at = value_at(at)
        if skip(at) != len(text):
            raise unreadable(f"extra data at character {skip(at)}")
        yield item
        return
    at = skip(at + 1)
    if text.startswith("]", at):
        at = skip(at + 1)
    else:
        while True:
            element += 1
            item, at = value_at(skip(at))
            yield item
            at = skip(at)
            if text.startswith(",", at):
                at += 1
                continue
            if text.startswith("]", at):
                at = skip(at + 1)
                break
            raise unreadable(f"expecting ',' or ']' at character {at}")
    if at != len(text):
        raise unreadable(f"extra data at character {at}")


def _charset(content_type: str) -> str:
    for part in content_type.split(";")[1:]:
        key, _, value = part.partition("=")
        if key.strip().lower() == "charset":
            return value.strip().strip('"').lower() or "utf-8"
    return "utf-8"


#: Text codecs Python knows that are no character set of a body: ``punycode`` decodes in quadratic time in
#: pure Python (1.28 M bytes took 14.5 CPU s, an 8 MiB body ~10 CPU min, on the event loop: every request
#: of every organisation waited), ``idna`` and ``undefined`` refuse "replace" (a 500), and the escape codecs
#: turn ``\u0022`` in the body into quotes. Non-text codecs (zlib, base64) are refused by their CodecInfo.
NOT_CHARSETS = frozenset({"punycode", "idna", "undefined", "unicode-escape", "raw-unicode-escape"})


def body_codec(charset: str) -> str | None:
    """The codec a body's ``charset`` names, or None when it is unknown or no character set (415)."""
    try:
        info = codecs.lookup(charset)
    except LookupError:
        return None
    if not info._is_text_encoding or info.name in NOT_CHARSETS:
        return None
    return info.name


def intake_result(request_id: str, org_id: str, outcome: RequestVerdicts, max_listed: int) -> IntakeResult:
    """The response: complete counts, and the first ``max_listed`` records not accepted (bounded size)."""
    counts = dict.fromkeys(("accepted", "rejected", "duplicate", "failed"), 0)
    listed: list[RecordVerdict] = []
    for pending in outcome.records:
        verdict = pending.verdict or "failed"
        counts[verdict] += 1
        if verdict != "accepted" and len(listed) < max_listed:
            reason = pending.reason
            if reason is not None and len(reason) > MAX_REASON_CHARS:
                reason = reason[:MAX_REASON_CHARS] + "... [reason cut]"
            event_id = pending.event_id[:500] if pending.event_id else pending.event_id
            listed.append(RecordVerdict(position=pending.position, event_id=event_id, verdict=verdict, reason=reason))
    return IntakeResult(
        request_id=request_id,
        org_id=org_id,
        received=len(outcome.records),
        accepted=counts["accepted"],
        rejected=counts["rejected"],
        duplicates=counts["duplicate"],
        failed=counts["failed"],
        records=listed,
        unlisted=len(outcome.records) - counts["accepted"] - len(listed),
        rejects_unrecorded=outcome.rejects_unrecorded,
    )


# --- the application ---------------------------------------------------------------------------------------------

#: Requests decoded, read and published at once: two, so one is read while the other is published (the
#: publisher is serial). With no bound, 16 concurrent maximal requests peaked at 499 MiB (336 one at a time,
#: 374 two at a time); one at a time, the 16 took 29.8 s instead of 24.5 (24.0 two at a time).
PARSING_AT_ONCE = 2
#: Requests of one token between authentication and answer at most (uploading, waiting in line, read): the
#: server takes 64 connections at once, and a token whose bodies came slowly held them all after ~54 s of its
#: request rate (10 at once, then one a second): every other organisation got 503. Its further ones get 429.
IN_FLIGHT_PER_TOKEN = 8

PublishFn = Callable[[GatewayToken, list[InputRecord]], RequestVerdicts]


def create_app(settings: Settings, store: TokenStore, publish: PublishFn) -> FastAPI:
    """The gateway's ASGI application (no server: ``serve`` runs it, tests may mount it elsewhere)."""
    app = FastAPI(
        title="synthwatch intake gateway",
        version="1",
        description="Publish lab detections and border seizures over HTTPS with an organisation's bearer token. "
        "Every record gets a verdict; the counts add up. See docs/security.md#http-intake-gateway.",
        openapi_url=None,  # served below to token holders only: no endpoint without authentication
        docs_url=None,
        redoc_url=None,
    )
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=[*LOOPBACK_HOSTS, *settings.gateway_allowed_hosts])
    limiter = RateLimiter(settings.gateway_rate_per_minute, settings.gateway_rate_burst)
    # Failed authentications are paced per peer address: a client looping on a wrong token is slowed.
    failures = RateLimiter(settings.gateway_rate_per_minute, settings.gateway_rate_burst)
    # Records are paced too: a request may hold up to gateway_max_records of them, so requests alone bound nothing.
    per_record = RateLimiter(
        settings.gateway_rate_records_per_minute, max(settings.gateway_rate_records_burst, settings.gateway_max_records)
    )
    # A body waiting for its turn is only its bytes; decoded and read it is ~10-15 MiB more (records, their
    # dicts): at most PARSING_AT_ONCE requests hold that at once, one per token (a token's next request
    # waits for its previous one), the others waiting in arrival order. See docs/security.md.
    reading = asyncio.Semaphore(PARSING_AT_ONCE)
    turns: dict[str, asyncio.Lock] = {}  # per token id: tokens are the store's, a bounded set
    # Records are charged when read, published or not: a body refused after reading (413 over the record cap,
    # 400, 429 over the bucket) cost a read of up to the cap's records (~0.2-1.2 CPU s and a turn among the
    # PARSING_AT_ONCE) and was free, so a token could have one read a second for ever. A 413 or 400 is charged
    # the records read; a 429 after reading empties the bucket and the token's next body is read only once
    # the bucket holds that request's records (needs, per token id), so a token re-sending it as told by
    # Retry-After is read once, when it can be published.
    needs: dict[str, int] = {}
    bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer swg_...` (synthwatch tokens create)")

    def too_many(wait: float, what: str) -> HTTPException:
        return HTTPException(
            429, f"too many requests {what}; retry after {math.ceil(wait)} s", {"Retry-After": str(math.ceil(wait))}
        )

    def authenticated(
        request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
    ) -> GatewayToken:
        store.reload_if_changed()
        token = store.authenticate(credentials.credentials) if credentials is not None else None
        if token is None:
            peer = request.client.host if request.client is not None else "unknown"
            wait = failures.take(f"peer:{peer}")
            if wait:
                raise too_many(wait, "with a wrong token from this address")
            log.warning(
                "refused a request from %s: %s",
                peer,
                "no bearer token" if credentials is None else "unknown or revoked token",
            )
            raise HTTPException(
                401,
                "a valid bearer token is required (Authorization: Bearer swg_...); ask the operators for one "
                "(`synthwatch tokens create`)",
                {"WWW-Authenticate": 'Bearer realm="synthwatch"'},
            )
        wait = limiter.take(f"token:{token.token_id}")
        if wait:
            raise too_many(wait, f"for token {token.token_id}")
        return token

    Token = Annotated[GatewayToken, Depends(authenticated)]
    errors: dict[int | str, dict[str, Any]] = {
        code: {"model": Problem, "description": text}
        for code, text in [
            (
                400,
                "unreadable body (not JSON, or a JSON element longer than SYNTHWATCH_MAX_RECORD_BYTES "
                f"({settings.max_record_bytes:,} here): the detail names the element; nothing of the body is "
                "published), or Host not allowed",
            ),
            (401, "no, unknown or revoked token"),
            (403, "the organisation cannot be signed for"),
            (
                413,
                f"body over SYNTHWATCH_GATEWAY_MAX_BODY_BYTES ({settings.gateway_max_body_bytes:,} bytes here), or "
                f"more records than SYNTHWATCH_GATEWAY_MAX_RECORDS ({settings.gateway_max_records:,} here): split "
                "the batch into smaller requests; nothing of a refused body is published",
            ),
            (
                415,
                "Content-Type not NDJSON, JSON or CSV, or a charset that is unknown or no character set "
                "(punycode, idna, zlib...)",
            ),
            (
                429,
                f"request or record rate limit of the token ({settings.gateway_rate_records_per_minute:,.0f} records a "
                f"minute here), or more than {IN_FLIGHT_PER_TOKEN} of its requests in flight: nothing was published; "
                "send the same request again after Retry-After seconds",
            ),
        ]
    }

    in_flight: dict[str, int] = {}  # per token id: its requests between authentication and answer

    async def read_and_publish(request: Request, token: GatewayToken) -> JSONResponse:
        content_type = request.headers.get("content-type", "")
        kind = CONTENT_TYPES.get(content_type.split(";")[0].strip().lower())
        if kind is None:
            raise HTTPException(
                415, "send Content-Type application/x-ndjson, application/json or text/csv (charset=utf-8)"
            )
        charset = _charset(content_type)
        codec = body_codec(charset)
        if codec is None:
            raise HTTPException(415, f"charset {charset[:40]!r} is unknown or no character set; send UTF-8") from None
        limit = settings.gateway_max_body_bytes
        too_big = (
            f"at most {limit:,} (SYNTHWATCH_GATEWAY_MAX_BODY_BYTES): split the batch into requests of at most "
            f"{limit:,} bytes and {settings.gateway_max_records:,} records{_EACH_CSV_PART if kind == 'csv' else ''}; "
            "nothing of this request was published"
        )
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise HTTPException(413, f"the body has {int(declared):,} bytes, {too_big}")
        key = f"token:{token.token_id}"

        def refuse_unread() -> None:
            """429 when the token's bucket cannot cover what it needs read next (one record, or the records of
            its request refused for the rate after reading): before its body is read, and again at its turn."""
            need = needs.get(token.token_id, 1)
            owed = per_record.wait(key, need)
            if owed:
                raise too_many(
                    owed,
                    f"for token {token.token_id}: its record rate ({settings.gateway_rate_records_per_minute:,.0f} "
                    f"a minute) is used up{'' if need == 1 else f' for the {need:,} records it last sent'}; "
                    "nothing was read or published",
                )

        refuse_unread()
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise HTTPException(413, f"the body is over {limit:,} bytes, {too_big}")
        request_id = uuid.uuid4().hex[:12]
        async with turns.setdefault(token.token_id, asyncio.Lock()), reading:
            refuse_unread()  # the token's requests ahead of this one may have used its bucket meanwhile
            try:
                records = await run_in_threadpool(
                    read_body, body, codec, kind, f"gateway/{token.org_id}/{request_id}", settings
                )
            except BodyError as error:
                per_record.charge(key, error.read, floor=-per_record.burst)
                raise HTTPException(413 if isinstance(error, TooManyRecords) else 400, str(error)) from None
            wait = per_record.take(key, len(records))
            if wait:
                needs[token.token_id] = len(records)
                per_record.charge(key, len(records))
                raise too_many(
                    per_record.wait(key, len(records)),
                    f"for token {token.token_id}: its {len(records):,} records are over its record rate "
                    f"({settings.gateway_rate_records_per_minute:,.0f} a minute); nothing was published",
                )
            needs.pop(token.token_id, None)
            try:
                outcome = await run_in_threadpool(publish, token, records)
            except SigningKeyMissing as error:
                raise HTTPException(403, str(error)) from None
            del records
        result = intake_result(request_id, token.org_id, outcome, settings.gateway_max_listed_verdicts)
        log.info(
            "request %s token %s org %s: %d received, %d accepted, %d rejected, %d duplicates, %d failed",
            request_id, token.token_id, token.org_id, result.received, result.accepted, result.rejected,
            result.duplicates, result.failed,
        )  # fmt: skip
        status = 503 if result.failed else 200
        headers = {"Retry-After": "5"} if result.failed else None
        return JSONResponse(result.model_dump(), status_code=status, headers=headers)

    @app.post(
        "/v1/reports",
        response_model=IntakeResult,
        responses={**errors, 503: {"model": IntakeResult, "description": "some records were not acknowledged"}},
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/x-ndjson": {"schema": {"type": "string"}, "example": '{"kind": "lab_detection"}'},
                    "application/json": {"schema": {"type": "array", "items": {"type": "object"}}},
                    "text/csv": {"schema": {"type": "string"}, "example": "kind,event_id,substance.name\n"},
                },
            }
        },
        summary="Publish reports",
    )
    async def post_reports(request: Request, token: Token) -> JSONResponse:
        """Validate and publish the body's reports (at most SYNTHWATCH_GATEWAY_MAX_RECORDS, else 413: split the
        batch); the answer counts every record and lists the records not accepted with their verdict and reason
        (the wire contract is in schemas/json)."""
        held = in_flight.get(token.token_id, 0)
        if held >= IN_FLIGHT_PER_TOKEN:
            raise HTTPException(
                429,
                f"too many requests at once for token {token.token_id}: at most {IN_FLIGHT_PER_TOKEN} in flight; "
                "send the next when one is answered",
                {"Retry-After": "5"},
            )
        in_flight[token.token_id] = held + 1
        try:
            return await read_and_publish(request, token)
        finally:
            in_flight[token.token_id] -= 1
            if not in_flight[token.token_id]:
                del in_flight[token.token_id]

    @app.get("/v1/whoami", response_model=TokenInfo, responses=errors, summary="Who this token publishes as")
    def whoami(token: Token) -> TokenInfo:
        """The organisation, lab ids and agencies of the token: a LIMS's connection check."""
        return TokenInfo(
            token_id=token.token_id, org_id=token.org_id, lab_ids=list(token.lab_ids), agencies=list(token.agencies)
        )

    @app.get("/v1/openapi.json", include_in_schema=False)
    def openapi(token: Token) -> JSONResponse:
        return JSONResponse(app.openapi())

    return app


def openapi_document(settings: Settings) -> dict[str, Any]:
    """The OpenAPI description without a server, Kafka or tokens (``synthwatch gateway --openapi``)."""
    app = create_app(
        settings, TokenStore(settings.resolved_gateway_tokens_file), lambda token, records: RequestVerdicts([])
    )
    return app.openapi()


class GatewayConfigError(SynthwatchError, ValueError):
    """The gateway cannot start with these settings; the message says which to change."""


def check_listen_address(settings: Settings) -> None:
    """Refuse to put bearer tokens on a network in clear: a non-loopback address needs TLS (or a TLS proxy)."""
    tls = settings.gateway_ssl_certfile is not None and settings.gateway_ssl_keyfile is not None
    if (settings.gateway_ssl_certfile is None) != (settings.gateway_ssl_keyfile is None):
        raise GatewayConfigError("TLS needs both SYNTHWATCH_GATEWAY_SSL_CERTFILE and SYNTHWATCH_GATEWAY_SSL_KEYFILE")
    if settings.gateway_host not in LOOPBACK_HOSTS and not tls and not settings.gateway_behind_tls_proxy:
        raise GatewayConfigError(
            f"SYNTHWATCH_GATEWAY_HOST={settings.gateway_host} is not a loopback address and the gateway has no TLS "
            "certificate: bearer tokens would cross the network in clear. Set SYNTHWATCH_GATEWAY_SSL_CERTFILE and "
            "SYNTHWATCH_GATEWAY_SSL_KEYFILE, or SYNTHWATCH_GATEWAY_BEHIND_TLS_PROXY=true when a reverse proxy "
            "terminates TLS in front of it"
        )


def serve(settings: Settings, bootstrap_servers: str, announce: Callable[[str], None]) -> None:
    """Run the gateway until SIGINT/SIGTERM; ``announce`` gets its URL once it listens (port 0: the one chosen)."""
    import socket

    import uvicorn

    from synthwatch.schemas.envelope import load_org_keys

    check_listen_address(settings)
    store = TokenStore.open(settings.resolved_gateway_tokens_file)
    org_keys = load_org_keys(settings.org_keys_file) if settings.org_keys_file is not None else None
    publisher = GatewayPublisher(settings, bootstrap_servers, org_keys)
    app = create_app(settings, store, publisher.publish_request)
    family = socket.AF_INET6 if ":" in settings.gateway_host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((settings.gateway_host.strip("[]"), settings.gateway_port))
    sock.listen(128)
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        access_log=False,  # our own line per request names the token id, never the token
        log_level="warning",
        ssl_certfile=settings.gateway_ssl_certfile,
        ssl_keyfile=settings.gateway_ssl_keyfile,
        server_header=False,
        proxy_headers=settings.gateway_behind_tls_proxy,
        limit_concurrency=64,
        timeout_keep_alive=5,
    )
    server = uvicorn.Server(config)
    scheme = "https" if settings.gateway_ssl_certfile else "http"
    host = f"[{settings.gateway_host.strip('[]')}]" if family == socket.AF_INET6 else settings.gateway_host
    announce(f"gateway listening on {scheme}://{host}:{port} (tokens: {store.path}, {len(store.tokens)} stored)")
    try:
        server.run(sockets=[sock])
    finally:
        publisher.close()
        sock.close()
