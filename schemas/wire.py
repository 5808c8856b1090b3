"""Decoding raw bytes into events, with reasons a person can act on when it fails.

The publisher and the worker both call :func:`parse_event`, so a record is judged the same way at
the edge and in the stream (the worker re-validates what other producers may have sent).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError

from synthwatch.errors import SynthwatchError
from synthwatch.schemas.events import CHECKED_EVENT_ADAPTER, EVENT_ADAPTER, BorderSeizure, LabDetection, fast_event_ok
from synthwatch.schemas.reject_reasons import FUTURE_EVENT_FIELD, FUTURE_EVENT_MARK
from synthwatch.schemas.text import FORBIDDEN_PATTERN, first_forbidden


class WireError(SynthwatchError, ValueError):
    """A record that does not meet the wire contract; ``reason`` says why in one line."""

    def __init__(self, reason: str, event_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.event_id = event_id


def _location(loc: tuple[int | str, ...]) -> str:
    # Drop the discriminator tag pydantic inserts ("lab_detection.region" -> "region").
    parts = [str(p) for p in loc if p not in ("lab_detection", "border_seizure")]
    return ".".join(parts)


def describe_validation_error(error: ValidationError) -> str:
    """One line per problem, joined: ``field: message``; readable in a reject table."""
    problems = []
    for item in error.errors(include_url=False):
        message = str(item["msg"]).removeprefix("Value error, ")
        where = _location(tuple(item["loc"]))
        if item["type"] == "missing":
            message = "required field is missing"
        elif item["type"] == "json_invalid":
            message = f"invalid JSON: {item['ctx'].get('error', message) if item.get('ctx') else message}"
        elif item["type"] == "union_tag_invalid":
            message = "unknown kind; expected 'lab_detection' or 'border_seizure'"
            where = "kind"
        elif item["type"] == "string_pattern_mismatch" and (item.get("ctx") or {}).get("pattern") == FORBIDDEN_PATTERN:
            found = first_forbidden(str(item.get("input", "")))
            message = f"contains {found}: text fields are one line of printable text (no control characters)"
        elif item["type"] == "union_tag_not_found":
            message = "required field is missing (one of 'lab_detection', 'border_seizure')"
            where = "kind"
        problems.append(f"{where}: {message}" if where else message)
    return "; ".join(problems)


def _peek_event_id(raw: bytes | str | dict[str, Any]) -> str | None:
    """Best-effort event id of a refused record, so a reject can be traced to its source."""
    try:
        obj = raw if isinstance(raw, dict) else json.loads(raw)
    except (ValueError, TypeError, RecursionError):
        return None
    event_id = obj.get("event_id") if isinstance(obj, dict) else None
    return event_id[:500] if isinstance(event_id, str) and event_id.strip() else None


def parse_event(raw: bytes | str) -> LabDetection | BorderSeizure:
    """Validate one JSON record; raise :class:`WireError` with a reason when it is not an event.

    The fast models decide nearly every record inside pydantic-core; what they refuse is judged again
    by the checked models, which accept what only needs normalising and word the refusal.
    """
    return _parse(raw, _FAST_JSON, CHECKED_EVENT_ADAPTER.validate_json)


# The fast models' own validator, called directly: the TypeAdapter's ``validate_json`` only forwards to it with
# the same (default) arguments, ~0.3 µs a record of Python around ~6 µs of validation (issue 16, the reader).
_FAST_JSON: Callable[[bytes | str], LabDetection | BorderSeizure] = EVENT_ADAPTER.validator.validate_json


def parse_event_object(obj: dict[str, Any]) -> LabDetection | BorderSeizure:
    """Validate an already decoded record (CSV rows, simulator output)."""
    return _parse(obj, EVENT_ADAPTER.validate_python, CHECKED_EVENT_ADAPTER.validate_python)


def _parse(raw: Any, fast: Callable[[Any], Any], checked: Callable[[Any], Any]) -> LabDetection | BorderSeizure:
    """The fast models first; the checked ones for what they refuse (see :func:`parse_event`)."""
    try:
        event = fast(raw)
    except ValidationError:
        pass
    else:
        if fast_event_ok(event):
            return event
    try:
        result = checked(raw)
    except ValidationError as error:
        raise WireError(describe_validation_error(error), _peek_event_id(raw)) from None
    return public_event(result)


def public_event(checked: LabDetection | BorderSeizure) -> LabDetection | BorderSeizure:
    """The public model of an event the checked models accepted (values already normalised).

    Only the fields the report set are passed on, so defaults and ``model_fields_set`` come out as a
    direct parse would give them.
    """
    return EVENT_ADAPTER.validate_python(checked.model_dump(exclude_unset=True))


def event_to_json(event: LabDetection | BorderSeizure) -> bytes:
    """Canonical wire bytes of an event (extra fields included, unset optionals left out)."""
    return event.model_dump_json(exclude_none=True).encode()


@dataclass(frozen=True, slots=True)
class RecordLimits:
    """How big a record, and how much unknown content in it, the pipeline takes (``Settings`` sets them).

    Why: one 50 MB event made the publisher crash (Kafka refuses messages over ~1 MB), and unknown
    fields are stored verbatim in every row: a record may not smuggle megabytes or thousands of keys.
    """

    max_bytes: int = 900 * 1024
    max_extra_fields: int = 64
    max_extra_bytes: int = 64 * 1024
    #: How far an event time may lie after the time its report was received (clock and offset slips), in hours.
    max_future_hours: float = 24.0
    #: When every record judged under these limits was received, for a file's lines (``ingest-history``: a line
    #: records no receipt); None elsewhere: a record's own receipt (its Kafka timestamp, the send time) bounds it.
    received_at: datetime | None = None
    #: ``max_future_hours`` as a timedelta, built once: every report is compared with it.
    future_allowed: timedelta = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "future_allowed", timedelta(hours=self.max_future_hours))


DEFAULT_LIMITS = RecordLimits()


def byte_size(raw: bytes | str, limit: int) -> int:
    """Bytes of a record as Kafka carries it (UTF-8); a str is encoded only when it could reach ``limit``."""
    if isinstance(raw, bytes):
        return len(raw)
    return len(raw) if len(raw) * 4 <= limit else len(raw.encode("utf-8", errors="surrogateescape"))


def check_size(raw: bytes | str, limits: RecordLimits = DEFAULT_LIMITS) -> None:
    """Refuse a record over ``limits.max_bytes`` before validating it (a 50 MB event crashed the publisher)."""
    size = byte_size(raw, limits.max_bytes)
    if size > limits.max_bytes:
        raise WireError(
            f"record too large: {size:,} bytes, at most {limits.max_bytes:,} (SYNTHWATCH_MAX_RECORD_BYTES); "
            "send big attachments elsewhere and a reference in the report",
            _peek_event_id(raw) if size <= 16 * limits.max_bytes else None,
        )


def parse_limited(raw: bytes | str, limits: RecordLimits = DEFAULT_LIMITS) -> LabDetection | BorderSeizure:
    """:func:`parse_event` within the record caps: what the publisher, the worker and the backtest apply."""
    if type(raw) is not str or len(raw) * 4 > limits.max_bytes:  # a shorter str cannot be over (see byte_size)
        check_size(raw, limits)
    event = _parse(raw, _FAST_JSON, CHECKED_EVENT_ADAPTER.validate_json)  # parse_event, one call less
    if event.__pydantic_extra__ or event.substance.__pydantic_extra__:  # what check_extras would count
        check_extras(event, limits)
    return event


def check_event_time(
    event: LabDetection | BorderSeizure, received_at: datetime | None, limits: RecordLimits = DEFAULT_LIMITS
) -> None:
    """Refuse an event that occurred more than ``limits.max_future_hours`` after its report was received.

    Why: the detectors keep watermarks (the resolver's latest event time, each region's newest report per
    kind); one report dated 2099 moved them for good, so every name was forgotten and every later honest report
    of its region counted as late. A sample cannot be taken after its report arrived: such a date is an error.
    ``received_at`` is a time recorded with the report by the pipeline, never a clock at processing, so a
    replay, a backtest and the state rebuild judge it the same: the Kafka record's timestamp (the worker), the
    send time (the publisher), a row's ``ingested_at`` (the rebuild). None: nothing to bound by. The report's
    own ``reported_at`` is not a reference: a source's wrong clock must not cost it its reports.
    """
    if received_at is None:
        return
    ahead = event.occurred_at - received_at
    if ahead <= limits.future_allowed:  # ~0.5 µs: every report but a wrong one returns here
        return
    hours = ahead.total_seconds() / 3600
    raise WireError(
        f"{FUTURE_EVENT_FIELD}{event.occurred_at.isoformat()} is {_hours_text(hours)}{FUTURE_EVENT_MARK}received "
        f"({received_at.isoformat(timespec='seconds')}): at most {limits.max_future_hours:g} h is allowed "
        "(SYNTHWATCH_MAX_FUTURE_HOURS); a sample or seizure cannot postdate its report, check the date (year, "
        "time zone offset) and send the report again",
        event.event_id,
    )


def latest_event_time(limits: RecordLimits) -> datetime | None:
    """The latest event time :func:`check_event_time` takes under ``limits.received_at`` (None: no bound)."""
    return None if limits.received_at is None else limits.received_at + limits.future_allowed


def _hours_text(hours: float) -> str:
    return f"{hours:,.1f} h" if hours < 72 else f"{hours / 24:,.1f} days"


def _count_keys(value: Any) -> int:
    if isinstance(value, dict):
        return len(value) + sum(_count_keys(v) for v in value.values())
    if isinstance(value, list):
        return sum(_count_keys(v) for v in value)
    return 0


def check_extras(event: LabDetection | BorderSeizure, limits: RecordLimits = DEFAULT_LIMITS) -> None:
    """Refuse an event whose unknown fields (at every level) are too many or too big."""
    extras = event.extra_fields
    if not extras:
        return
    count = _count_keys(extras) - (1 if "substance" in extras else 0)  # the "substance" wrapper is not a field
    if count > limits.max_extra_fields:
        raise WireError(
            f"extra_fields: {count} unknown fields, at most {limits.max_extra_fields} "
            "(SYNTHWATCH_MAX_EXTRA_FIELDS); agree new fields with the synthwatch team",
            event.event_id,
        )
    size = len(json.dumps(extras, ensure_ascii=False, default=str).encode())
    if size > limits.max_extra_bytes:
        raise WireError(
            f"extra_fields: {size:,} bytes of unknown fields, at most {limits.max_extra_bytes:,} "
            "(SYNTHWATCH_MAX_EXTRA_BYTES)",
            event.event_id,
        )


def content_digest(event: LabDetection | BorderSeizure) -> str:
    """A digest of what an event says (its canonical JSON), to tell a re-send from a changed report.

    Field order and spelling do not matter (the event is parsed and normalised first, unknown fields are
    sorted), so the same report sent again by another tool has the same digest. A report with ``corrects`` is
    digested as when that was an unknown field (sorted keys), so one stored before it was declared re-sends
    as a duplicate, not as a changed report.
    """
    if event.model_extra or event.substance.model_extra or event.corrects is not None:
        text = json.dumps(event.model_dump(mode="json", exclude_none=True), sort_keys=True, ensure_ascii=False)
        data = text.encode()
    else:
        data = event.model_dump_json(exclude_none=True).encode()
    return hashlib.sha256(data).hexdigest()[:32]


def changed_content_reason(event_id: str, earlier_in: str = "already stored") -> str:
    """Why a re-sent ``event_id`` with other content is refused, and what to send instead (docs/detection.md)."""
    shown = event_id if len(event_id) <= 80 else event_id[:80] + "..."
    return (
        f"event_id {shown!r} is {earlier_in} with different content: a report is never overwritten; "
        "send the corrected report with a new event_id and `corrects` set to the old one"
    )
