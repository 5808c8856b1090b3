"""Wire models of synthwatch: input events, alerts and rejects, and their JSON Schema export."""

from synthwatch.schemas.events import EVENT_ADAPTER, BorderSeizure, Event, LabDetection, Quantity, SubstanceReport
from synthwatch.schemas.records import Alert, AlertSubstance, Reject
from synthwatch.schemas.wire import WireError, event_to_json, parse_event, parse_event_object

__all__ = [
    "EVENT_ADAPTER",
    "Alert",
    "AlertSubstance",
    "BorderSeizure",
    "Event",
    "LabDetection",
    "Quantity",
    "Reject",
    "SubstanceReport",
    "WireError",
    "event_to_json",
    "parse_event",
    "parse_event_object",
]
