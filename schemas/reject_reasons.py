"""Reject reasons reduced to a short, bounded class: a label value for the worker's and the publisher's metrics.

Why here: both count rejects per reason class (stream_apps/runtime/metrics.py, producers/metrics.py), and the
classes come from the wire contract (its field names, schemas/events.py) and the signature checks
(schemas/envelope.py); the full sentence stays in ClickHouse's ``rejects`` table.
"""

from __future__ import annotations

import re
from functools import lru_cache

from synthwatch.schemas.envelope import auth_reason_class

#: A report refused for a far-future event time (``schemas.wire.check_event_time``): its reason starts with the
#: first and holds the second (``occurred_at: <time> is 3.0 days after the report was received (<time>), ...``).
FUTURE_EVENT_FIELD = "occurred_at: "
FUTURE_EVENT_MARK = " after the report was "
FUTURE_EVENT_CLASS = "future_occurred_at"

_FIELD = re.compile(r"^([A-Za-z_][\w.\[\]]*):(?:\s|$)")


def reject_reason(reason: str) -> str:
    """A short, bounded class of a reject reason, fit for a label (``invalid_json``, ``empty_message``, ...).

    Wire errors read ``field: message; field: message``: the class is ``invalid_<first field>``.
    """
    text = reason.strip()
    auth = auth_reason_class(text)
    if auth is not None:
        return auth
    lowered = text.lower()
    # Before the field rule: not a malformed occurred_at but a wrong date (the publisher's summary keeps the class).
    future = text.startswith(FUTURE_EVENT_FIELD) and FUTURE_EVENT_MARK in text.split(";")[0]
    if future or text.startswith(FUTURE_EVENT_CLASS + ":"):
        return FUTURE_EVENT_CLASS
    if lowered.startswith("empty message"):
        return "empty_message"
    if lowered.startswith("not a reject record"):
        return "not_a_reject_record"
    if lowered.startswith("not a sightings record"):
        return "not_a_sightings_record"
    if "invalid json" in lowered.split(";")[0]:
        return "invalid_json"
    if lowered.startswith("record too large"):
        return "too_large"
    if lowered.startswith("extra_fields:"):
        return "too_many_extra_fields"
    if lowered.startswith("csv "):
        return "unreadable_csv"
    first = lowered.split(";")[0]
    if "with different content" in first or lowered.startswith("changed content"):
        return "changed_content"
    if "is not utf-8" in first:
        return "not_utf8"
    match = _FIELD.match(text)
    if match:
        field = re.sub(r"\[\d+\]|\.\d+", "", match.group(1)).replace(".", "_").lower()
        # Field names come from the input (an unknown key inside ``quantity``, a path in a nested
        # extra): only the contract's own fields become label values, the rest share one.
        return f"invalid_{field}" if field in _wire_fields() else "invalid_other_field"
    return "other"


@lru_cache(maxsize=1)
def _wire_fields() -> frozenset[str]:
    """Every field path of the wire contract, flattened as label values spell them (``quantity_value``)."""
    from pydantic import BaseModel

    from synthwatch.schemas.events import BorderSeizure, LabDetection

    found: set[str] = {"kind"}

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, info in model.model_fields.items():
            found.add(prefix + name)
            for candidate in (info.annotation, *getattr(info.annotation, "__args__", ())):
                if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                    walk(candidate, f"{prefix}{name}_")

    walk(LabDetection, "")
    walk(BorderSeizure, "")
    return frozenset(found)


#: Every label value :func:`reject_reason` can return; a test checks the set stays bounded.
def reject_reason_classes() -> frozenset[str]:
    """The fixed set of reject reason label values (why: Prometheus series must not grow with input)."""
    fixed = {"too_late", "empty_message", "not_a_reject_record", "invalid_json", "too_large", "invalid_other_field"}
    fixed.add("not_a_sightings_record")
    fixed |= {"too_many_extra_fields", "unreadable_csv", "changed_content", "not_utf8", FUTURE_EVENT_CLASS}
    return frozenset(fixed | {f"invalid_{f}" for f in _wire_fields()} | {"other"})
