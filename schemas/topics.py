"""Every Kafka topic synthwatch reads or writes, declared once: its setting, default name, key and value.

Why one place: the topic names were spread over settings.py, the worker, the publisher and four deployment files
(deploy/k8s/kafka-topics.yaml, deploy/k8s/configmap.yaml, deploy/compose.yaml, deploy/kafka/acls.sh); a test
(tests/floor/test_topics.py) checks each of those against these declarations.

Partitions: every topic has ``SYNTHWATCH_PARTITIONS`` partitions (``Settings.partitions``). The two input topics
are consumed by one agent and must be co-partitioned (one region's lab detections and seizures on the same
partition number), and the detector state of a region or substance is written to the changelog partition its
records arrived on, so the changelogs have the same count too. Where a key goes is :func:`default_partition`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, Literal

from synthwatch.schemas.events import BorderSeizure, LabDetection
from synthwatch.schemas.records import Alert, Reject


@dataclass(slots=True)
class Sighting:
    """A substance seen in a region on a day (the first report of that day), as forwarded by region.

    The value model of the sightings topic: the region stage sends, keyed by substance, a JSON array of these
    (one message per substance and batch, in event-time order); the novelty stage reads them back.
    """

    event_id: str
    kind: str
    occurred_at: datetime
    day: int
    country: str
    region: str
    key: str
    name: str
    inchikey: str | None
    family: str | None
    controlled: bool | None
    catalogued: bool
    method: str | None = None
    sample_type: str | None = None
    late_by_hours: float | None = None  # a late report's sighting: its alerts say so
    identified_by: str | None = None  # how the report's substance was identified (ResolvedSubstance.resolved_by)
    reporter: str | None = None  # the lab or agency whose report this is
    smiles: str | None = None  # the structure as the report gave it: what a new substance is compared by
    # The name key (``name:...``) this report's name had until it tied the name to this structure
    # (ResolvedSubstance.formerly): the novelty stage raises an ``identified`` alert, not a second new substance.
    formerly: str | None = None
    formerly_regions: list[str] | None = None  # the regions that name was reported from, by name only
    formerly_since: str | None = None  # the day (ISO date) that name was first reported by name only

    def to_dict(self) -> dict[str, Any]:
        """The wire form on the sightings topic (fields are flat: no deep copy as ``asdict`` makes)."""
        data = {name: getattr(self, name) for name in _SIGHTING_FIELDS}
        data["occurred_at"] = self.occurred_at.isoformat()
        if self.formerly is None:  # nearly every sighting: its record stays as a worker before these fields wrote it
            del data["formerly"], data["formerly_regions"], data["formerly_since"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Sighting:
        """Read a sightings record; fields this version does not know are ignored (a newer producer during a
        rolling upgrade must not make it refuse the record, with every sighting in it)."""
        if not data.keys() <= _SIGHTING_NAMES:
            data = {name: value for name, value in data.items() if name in _SIGHTING_NAMES}
        return cls(**{**data, "occurred_at": datetime.fromisoformat(data["occurred_at"])})

    @property
    def reported_by(self) -> list[str]:
        return [self.reporter] if self.reporter else []


_SIGHTING_FIELDS = tuple(f.name for f in fields(Sighting))
_SIGHTING_NAMES = frozenset(_SIGHTING_FIELDS)


@dataclass(frozen=True)
class Topic:
    """A topic whose name is a setting (``SYNTHWATCH_<SETTING>``)."""

    setting: str  # the Settings field holding its name
    default: str  # the name when the setting is not set
    key: str  # what a record's key is (UTF-8 text)
    value: Any  # the value's model: a record is its JSON
    description: str
    cleanup_policy: Literal["delete", "compact"] = "delete"

    def name(self, settings: Any) -> str:
        """The topic's name under ``settings`` (a :class:`synthwatch.settings.Settings`)."""
        return str(getattr(settings, self.setting))


@dataclass(frozen=True)
class Changelog:
    """The changelog topic of one of the worker's Faust tables: ``{app_id}-{table}-changelog``, compacted."""

    table: str  # the Faust table's name
    key: str
    value: str
    description: str
    cleanup_policy: Literal["delete", "compact"] = "compact"

    def name(self, settings: Any) -> str:
        """The topic's name under ``settings``: Faust names it after the application id."""
        return f"{settings.app_id}-{self.table}-changelog"


LAB_DETECTIONS = Topic(
    setting="topic_lab_detections",
    default="synthwatch.lab-detections",
    key="region",
    value=LabDetection,
    description="Lab detections from the labs' publishers and the HTTP gateway.",
)
BORDER_SEIZURES = Topic(
    setting="topic_border_seizures",
    default="synthwatch.border-seizures",
    key="region",
    value=BorderSeizure,
    description="Customs and police seizures (co-partitioned with lab detections).",
)
REJECTS = Topic(
    setting="topic_rejects",
    default="synthwatch.rejects",
    key="event id or source",
    value=Reject,
    description="Refused input with its reason, from the publishers and the worker.",
)
ALERTS = Topic(
    setting="topic_alerts",
    default="synthwatch.alerts",
    key="alert id",
    value=Alert,
    description="Alerts the worker raised; stored in ClickHouse and delivered to liaison officers.",
)
SIGHTINGS = Topic(
    setting="topic_sightings",
    default="synthwatch.sightings",
    key="substance",
    value=list[Sighting],
    description="Internal: region stage -> substance stage (one record per region, substance, day).",
)

#: The topics named by settings, in the order of ``Settings.all_topics`` (inputs first).
TOPICS: tuple[Topic, ...] = (LAB_DETECTIONS, BORDER_SEIZURES, REJECTS, ALERTS, SIGHTINGS)
INPUT_TOPICS: tuple[Topic, Topic] = (LAB_DETECTIONS, BORDER_SEIZURES)

REGION_STATE = Changelog(
    table="detector-regions",
    key="JSON string: R:<region> or S:<series> (R+:/S+: for a delta), or the seal that ends a write",
    value="the region stage's record of a region or series (JSON)",
    description="Faust table changelog: detector state per region.",
)
SUBSTANCE_STATE = Changelog(
    table="detector-substances",
    key="JSON string: the substance key, or the seal that ends a write",
    value="the novelty stage's record of a substance (JSON)",
    description="Faust table changelog: detector state per substance.",
)

#: The worker's Faust tables, whose changelogs Faust creates unless a deployment declares them.
CHANGELOGS: tuple[Changelog, ...] = (REGION_STATE, SUBSTANCE_STATE)


def default_partition(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner (Java, aiokafka, kafka-python) gives ``key``.

    The worker writes a region's detector state to the partition its events arrive on, and the publishers key
    events by region: both must agree with the clients' murmur2.
    """
    # Imported here: kafka-python's package import takes ~70 ms, and settings.py imports this module.
    from kafka.partitioner.default import murmur2

    return (murmur2(key) & 0x7FFFFFFF) % partitions
