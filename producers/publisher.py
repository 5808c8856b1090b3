"""Publishing events to Kafka with kafka-python: validate, key by region, count only what was acked.

Guarantees a caller can rely on:
- an invalid record never stops the run and is never dropped silently: it is sent to the rejects
  topic with its reason;
- a record whose ``event_id`` already appeared in this run is counted as a duplicate, not re-sent, when
  its text is the same; with another text it is rejected as a changed report (a correction needs a new id);
- ``sent`` counts only records the broker acknowledged; anything else is listed in ``failed``;
- when the broker has lost the idempotent producer's state (a restarted broker, an in-memory one
  above all), the producer is re-created and every record it had not acknowledged is sent again: a
  re-sent record the broker did keep is a duplicate that the worker drops by ``event_id``.
Events are keyed by region so that one region's events stay in order on one partition.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

from kafka import KafkaProducer
from kafka import errors as kafka_errors

from synthwatch.errors import SynthwatchError
from synthwatch.kafka_clients import KafkaConnectError, kafka_python_config, tls_preflight
from synthwatch.producers.readers import InputRecord
from synthwatch.schemas import BorderSeizure, LabDetection, Reject, WireError, parse_event_object
from synthwatch.schemas.envelope import Organisation, envelope_headers, load_org_keys, parse_key
from synthwatch.schemas.records import RejectStage
from synthwatch.schemas.reject_reasons import FUTURE_EVENT_CLASS, reject_reason
from synthwatch.schemas.topics import default_partition
from synthwatch.schemas.wire import (
    RecordLimits,
    changed_content_reason,
    check_event_time,
    check_extras,
    check_size,
    parse_limited,
)
from synthwatch.schemas.worker_keys import WorkerKeyError, WorkerSigner, existing_worker_keys
from synthwatch.settings import Settings
from synthwatch.stream_apps.detect.corrections import ReportKey, report_key

log = logging.getLogger("synthwatch.publisher")

#: Producer settings measured to keep kafka-python near aiokafka's throughput (see docs/performance.md).
PRODUCER_DEFAULTS: dict[str, Any] = {
    "acks": "all",
    "linger_ms": 50,
    "batch_size": 1024 * 1024,
    "max_request_size": 8 * 1024 * 1024,
    "retries": 10,
    "retry_backoff_ms": 200,
    "request_timeout_ms": 15_000,
    "delivery_timeout_ms": 60_000,
    "enable_idempotence": True,  # with it, 5 requests in flight keep a region's order across retries
    "max_in_flight_requests_per_connection": 5,
}

#: Errors that mean "the broker no longer knows this producer's id or sequence numbers": kafka-python's
#: idempotent producer then fails every later record too, while a fresh producer (new id) succeeds.
PRODUCER_STATE_ERRORS: tuple[type[Exception], ...] = (
    kafka_errors.UnknownProducerIdError,
    kafka_errors.OutOfOrderSequenceNumberError,
    kafka_errors.InvalidProducerEpochError,
)

#: Fresh producers per ``publish_records`` call at most; records still failing after that are reported.
MAX_PRODUCER_RENEWALS = 5


@dataclass
class Pending:
    """One send not yet known to be done, with what it carries so it can be sent again."""

    future: Any
    what: str  # "event" or "reject"
    label: str  # the event id or source, for the failure report
    topic: str
    key: bytes | None
    value: bytes
    partition: int | None
    headers: list[tuple[str, bytes]] | None = None


#: Sources listed per reason in a summary, and distinct reasons whose sources are kept (bounded memory).
MAX_SOURCES_PER_REASON = 20
MAX_REASONS_KEPT = 1000
OTHER_REASONS = "(further distinct reasons, counted together)"


@dataclass
class PublishSummary:
    """What happened to every input record: read == sent + rejected + duplicates + failed."""

    read: int = 0
    sent: int = 0
    rejected: int = 0
    duplicates: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    reject_reasons: dict[str, int] = field(default_factory=dict)
    #: Full reason -> where it happened (``file:line``): the first ``MAX_SOURCES_PER_REASON`` of them.
    reject_sources: dict[str, list[str]] = field(default_factory=dict)
    #: Full reason -> how many records were refused for it (reject_sources keeps only the first few).
    reject_counts: dict[str, int] = field(default_factory=dict)

    def note_reject(self, reason: str, source: str) -> None:
        """Count a refused record under its full reason, keeping where it was (for the summary).

        Reasons quote values, so a bad file can have a million distinct ones: past ``MAX_REASONS_KEPT``
        the rest are counted together (memory stays bounded; ``synthwatch rejects`` has every one)."""
        if reason not in self.reject_counts and len(self.reject_counts) >= MAX_REASONS_KEPT:
            reason = OTHER_REASONS
        self.reject_counts[reason] = self.reject_counts.get(reason, 0) + 1
        sources = self.reject_sources.setdefault(reason, [])
        if len(sources) < MAX_SOURCES_PER_REASON:
            sources.append(source)

    @property
    def balanced(self) -> bool:
        return self.read == self.sent + self.rejected + self.duplicates + len(self.failed)


class SigningError(SynthwatchError, ValueError):
    """The publisher was asked to sign as an organisation but has no usable key for it."""


class Signing(NamedTuple):
    """Whom the publisher signs events as, with which key, and that organisation's bindings when they are known
    (from the keys file): then a record the worker would refuse (another lab id, agency or country) is refused
    here, with the worker's reason, instead of being sent."""

    org_id: str
    key: bytes
    organisation: Organisation | None = None


def signing_key(settings: Settings) -> Signing | None:
    """The organisation and key the publisher signs events with: ``SYNTHWATCH_ORG_ID`` with ``SYNTHWATCH_ORG_KEY``,
    or with its first key in ``SYNTHWATCH_ORG_KEYS_FILE``; None when no organisation is set."""
    org_id = settings.org_id
    if not org_id:
        return None
    if settings.org_key is not None:
        return Signing(org_id, parse_key(settings.org_key.get_secret_value(), "SYNTHWATCH_ORG_KEY"))
    if settings.org_keys_file is None:
        raise SigningError(f"SYNTHWATCH_ORG_ID={org_id!r} needs SYNTHWATCH_ORG_KEY (hex) or SYNTHWATCH_ORG_KEYS_FILE")
    org = load_org_keys(settings.org_keys_file).get(org_id)
    if org is None:
        raise SigningError(f"organisation {org_id!r} is not in {settings.org_keys_file}")
    return Signing(org_id, org.keys[0], org)


class Publisher:
    """A kafka-python producer bound to synthwatch's topics; signs events when an organisation is set."""

    def __init__(
        self, settings: Settings, bootstrap_servers: str, stage: RejectStage = "publish", **overrides: Any
    ) -> None:
        self.settings = settings
        self.stage: RejectStage = stage
        self._config: dict[str, Any] = {
            "bootstrap_servers": bootstrap_servers.split(","),
            "client_id": "synthwatch-publisher",
            **kafka_python_config(settings),
            **PRODUCER_DEFAULTS,
            **overrides,
        }
        self.signer = signing_key(settings)
        # Only holders of the worker key may write rejects (the worker refuses the others'): an operator's
        # publisher (the embedded stack's, compose's) has it; labs' publishers do not send rejects at all.
        try:
            keys = existing_worker_keys(settings) if settings.publisher_send_rejects else None
        except WorkerKeyError as error:
            raise SigningError(f"{error}, or SYNTHWATCH_PUBLISHER_SEND_REJECTS=false") from error
        self.reject_signer = WorkerSigner(keys) if keys else None
        if settings.publisher_send_rejects and keys is None:
            log.warning(
                "no worker key here (SYNTHWATCH_WORKER_KEY, SYNTHWATCH_WORKER_KEY_FILE or DATA_DIR/worker-key): "
                "rejects are sent unsigned and the worker will refuse them; set the key, or "
                "SYNTHWATCH_PUBLISHER_SEND_REJECTS=false to list them in the summary only"
            )
        tls_preflight(settings, bootstrap_servers)
        try:
            self.producer = KafkaProducer(**self._config)
        except kafka_errors.KafkaError as error:
            raise KafkaConnectError.of(settings, bootstrap_servers, error) from error
        # Sends not yet known to be done. Swept in chunks: per-future callbacks cost more than the
        # send itself at 50,000 messages/s.
        self._pending: list[Pending] = []
        self._failed: list[tuple[str, str]] = []
        self._acked: dict[str, int] = {"event": 0, "reject": 0}
        self.acked_per_topic: dict[str, int] = {}  # events acknowledged per topic in the last publish_records
        self._partitions: dict[tuple[str, bytes], int] = {}
        self.renewals = 0  # fresh producers in the current publish_records call
        self.limits: RecordLimits = settings.record_limits()
        #: Rejects sent to Kafka per ``publish_records`` call at most (None: all); the rest are counted only.
        self.max_rejects_sent: int | None = None
        self.rejects_sent = 0
        self.rejects_unsent = 0  # refused in the last call beyond ``max_rejects_sent``: counted, not sent

    def partition_for(self, topic: str, key: bytes) -> int:
        """Kafka's default partition for ``key`` (murmur2, as Java and aiokafka clients compute it).

        Cached per (topic, key): keys are regions, a few hundred at most, and kafka-python's
        pure-Python murmur2 on every send was a quarter of the publisher's time.
        """
        cached = self._partitions.get((topic, key))
        if cached is None:
            partitions = sorted(self.producer.partitions_for(topic))
            cached = self._partitions[(topic, key)] = partitions[default_partition(key, len(partitions))]
        return cached

    def _sweep(self, wait: bool = False) -> None:
        """Count finished sends; with ``wait`` (after flush) every send must have finished.

        Sends that failed because the broker lost the producer's state are sent again on a fresh
        producer (at most ``MAX_PRODUCER_RENEWALS`` times per call); other failures are reported.
        """
        while True:
            still: list[Pending] = []
            again = False
            for item in self._pending:
                future = item.future
                if not future.is_done and not wait:
                    still.append(item)
                elif future.succeeded():
                    self._acked[item.what] += 1
                    if item.what == "event":
                        self.acked_per_topic[item.topic] = self.acked_per_topic.get(item.topic, 0) + 1
                elif self._renewable(future.exception) and self.renewals < MAX_PRODUCER_RENEWALS:
                    still.append(item)
                    again = True
                else:
                    error = future.exception or "not acknowledged by the broker"
                    self._failed.append((f"{item.what} {item.label}", f"{type(error).__name__}: {error}"))
            self._pending = still
            if not again:
                return
            self._renew()
            if not wait:
                return
            self.producer.flush()

    def _renewable(self, error: object) -> bool:
        """Whether a fresh producer would succeed where this one failed.

        Yes for the producer-state errors, and whenever this producer is in a fatal state (after a
        broker restart kafka-python may also fail with a plain ``KafkaError`` from InitProducerId):
        then it fails every record, while a new producer asks the broker for a new id.
        """
        if isinstance(error, PRODUCER_STATE_ERRORS):
            return True
        manager = getattr(self.producer, "_transaction_manager", None)
        return bool(manager is not None and manager.has_fatal_error())

    def _renew(self) -> None:
        """Replace the producer (a new producer id) and send everything not acknowledged again, in order.

        What the old producer still holds is sent again too: it would fail the same way. A record it
        did deliver meanwhile arrives twice and is dropped downstream by ``event_id``; it is counted once.
        """
        self.renewals += 1
        time.sleep(min(8.0, 0.5 * 2**self.renewals))  # a restarting broker may not answer InitProducerId yet
        resend, self._pending = self._pending, []
        log.warning("the broker lost this producer's state; re-sending %d records on a fresh producer", len(resend))
        old = self.producer
        self.producer = KafkaProducer(**self._config)
        with contextlib.suppress(Exception):
            old.close(timeout=0)
        for item in resend:
            self._send(item.topic, item.key, item.value, item.partition, item.what, item.label, item.headers)

    def _send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes,
        partition: int | None,
        what: str,
        label: str,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        try:
            future = self.producer.send(topic, key=key, value=value, partition=partition, headers=headers)
        except kafka_errors.KafkaError as error:  # e.g. MessageSizeTooLargeError, raised before sending
            self._failed.append((f"{what} {label}", f"{type(error).__name__}: {error}"))
            return
        self._pending.append(Pending(future, what, label, topic, key, value, partition, headers))

    def send_raw(self, topic: str, key: bytes | None, value: bytes, what: str, label: str) -> None:
        """Queue one message; its acknowledgement or failure is counted under ``what``.

        Events carry the organisation's signed envelope (schemas/envelope.py) when it signs.
        """
        partition = None if key is None else self.partition_for(topic, key)
        headers = None
        if self.signer is not None and what == "event":
            headers = envelope_headers(self.signer.org_id, self.signer.key, topic, key, value)
        elif self.reject_signer is not None and what == "reject":
            headers = self.reject_signer.headers(topic, key, value)
        self._send(topic, key, value, partition, what, label, headers)
        if len(self._pending) >= 20_000:
            self._sweep()

    def send_reject(self, reject: Reject) -> None:
        """Send a refused record to the rejects topic (counted only when rejects are off or over the cap)."""
        if not self.settings.publisher_send_rejects:
            self._acked["reject"] += 1  # counted and listed in the summary; the ACLs keep labs off that topic
            return
        if self.max_rejects_sent is not None and self.rejects_sent >= self.max_rejects_sent:
            self.rejects_unsent += 1
            self._acked["reject"] += 1  # refused and counted; one bad request cannot fill the rejects table
            return
        self.rejects_sent += 1
        key = (reject.event_id or reject.source).encode()
        self.send_raw(self.settings.topic_rejects, key, reject.model_dump_json().encode(), "reject", reject.source)

    def publish_records(
        self, records: Iterable[InputRecord], progress: Callable[[int], None] | None = None
    ) -> PublishSummary:
        """Validate and send every record; returns once every message is acked or has failed."""
        self.flush()
        self._sweep(wait=True)
        self._failed, self._acked = [], {"event": 0, "reject": 0}
        self.acked_per_topic = {}
        self.renewals = 0
        self.rejects_sent = self.rejects_unsent = 0
        summary = PublishSummary()
        # (claimed reporter, event id) -> hash of its text in this run: event ids are unique per reporter only, as
        # the worker judges them (report_key); another lab's (or agency's) report under an id is its own report.
        seen: dict[ReportKey, int] = {}
        reasons = summary.reject_reasons

        def refuse(record: InputRecord, reason: str, label: str, event_id: str | None) -> None:
            """Count the refusal under ``label`` (a fixed metric label) and send it to the rejects topic."""
            reasons[label] = reasons.get(label, 0) + 1
            summary.note_reject(reason, record.source)
            reject = Reject.of(record.raw, source=record.source, reason=reason, stage=self.stage, event_id=event_id)
            self.send_reject(reject)
            self._refused(record, reason, event_id)

        for record in records:
            summary.read += 1
            try:
                event = self._judge(record)
            except WireError as error:
                label = error.reason.split(":", 1)[0] if ":" in error.reason else error.reason
                if reject_reason(error.reason) == FUTURE_EVENT_CLASS:  # not a malformed occurred_at: a wrong date
                    label = FUTURE_EVENT_CLASS
                full = error.reason if record.hint is None else f"{error.reason} ({record.hint})"
                refuse(record, full, label, error.event_id)
            else:
                key = report_key(event)
                earlier = seen.get(key)
                if earlier is not None:
                    if earlier == hash(record.raw):
                        summary.duplicates += 1
                        self._duplicate(record, event.event_id)
                    else:  # the same id with another text in one run: a changed report, never a silent duplicate
                        reason = changed_content_reason(event.event_id, earlier_in="earlier in this file")
                        refuse(record, reason, "changed content", event.event_id)
                    continue
                seen[key] = hash(record.raw)
                value = (
                    record.raw.encode("utf-8", errors="surrogateescape")
                    if record.obj is None
                    else (event.model_dump_json(exclude_none=True).encode())
                )
                self.send_raw(
                    self.settings.topic_for_kind(event.kind),
                    event.region.encode(),
                    value,
                    "event",
                    event.event_id,
                )
            if progress is not None and summary.read % 1000 == 0:
                progress(1000)
        self.flush()
        self._sweep(wait=True)
        summary.failed = list(self._failed)
        summary.sent = self._acked["event"]
        summary.rejected = self._acked["reject"]  # a reject that never reached Kafka is in `failed`
        return summary

    def _refused(self, record: InputRecord, reason: str, event_id: str | None) -> None:
        """Called once per record the publisher refused (a subclass keeps a verdict per record)."""

    def _duplicate(self, record: InputRecord, event_id: str) -> None:
        """Called once per record not sent because the same text came earlier in this call."""

    def _judge(self, record: InputRecord) -> LabDetection | BorderSeizure:
        """The record's event, or WireError: unreadable, too large, not an event, too many unknown fields."""
        if record.problem is not None:
            raise WireError(record.problem)
        if record.obj is None:
            event = parse_limited(record.raw, self.limits)
        else:
            check_size(record.raw, self.limits)
            event = parse_event_object(record.obj)
            check_extras(event, self.limits)
        # Sent now: its Kafka timestamp, the receipt time the worker bounds event times by, is about this.
        check_event_time(event, datetime.now(UTC), self.limits)
        refused = self._binding_refusal(event)
        if refused is not None:
            raise WireError(refused, event.event_id)
        return event

    def _binding_refusal(self, event: LabDetection | BorderSeizure) -> str | None:
        """The worker's reason to refuse the signed event (EnvelopeVerifier.permits), when the signing organisation's
        bindings are known: told to the sender now, not found later in the rejects table."""
        org = None if self.signer is None else self.signer.organisation
        if org is None:
            return None
        if isinstance(event, LabDetection):
            return org.refusal(event.lab_id, None, event.country)
        return org.refusal(None, event.agency, event.country)

    def flush(self, timeout: float | None = None) -> None:
        self.producer.flush(timeout=timeout)

    def close(self) -> None:
        self.producer.close()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
