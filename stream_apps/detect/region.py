"""The detector core shared by the Faust agents and the offline backtest (no I/O here).

Two stages, because their state is keyed differently:

- :class:`RegionDetector`, keyed by region (one region's state on one partition, in event order):
  lateness (a late report is flagged, not dropped), duplicates, the region's weekday rhythm, spike
  series per region × substance and region × family, and one :class:`Sighting` per region,
  substance and day for the next stage.
- :class:`~synthwatch.stream_apps.detect.novelty.NoveltyDetector`, keyed by substance: new substances,
  first appearances in a region, spread.

:class:`Detector` chains them in one process (backtest, tests); the worker chains them through a
Kafka topic keyed by substance.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Collection, Container, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone, tzinfo
from functools import lru_cache
from typing import Any, get_args

from synthwatch.schemas import Alert, BorderSeizure, LabDetection
from synthwatch.schemas.events import EventKind
from synthwatch.schemas.topics import Sighting
from synthwatch.stream_apps.detect.alerting import FAMILY_LABELS, Subject, build_alert, day_of, day_start, region_label
from synthwatch.stream_apps.detect.config import DetectionConfig
from synthwatch.stream_apps.detect.identity import ResolvedSubstance
from synthwatch.stream_apps.detect.intake import EnrichedEvent
from synthwatch.stream_apps.detect.novelty import NoveltyDetector
from synthwatch.stream_apps.detect.replay import Position, apply_once, marks_of
from synthwatch.stream_apps.detect.spikes import SeriesState, SpikeFinding, SpikeModel, intern_day

Fetch = Callable[[str], dict[str, Any] | None]

#: How far (days) the slowest kind's watermark may hold a region's pruning back behind the newest kind's (see
#: :meth:`RegionDetector._settled_day`).
KIND_SKEW_DAYS = 14
#: The kinds whose watermarks hold a region's pruning back: every kind of event.
KINDS: tuple[str, ...] = get_args(EventKind)


# The subject of each substance object seen lately, by the object's id: the object is held in the value, so its
# id cannot be reused while the entry stands. The resolver returns one object per distinct answer, so this
# finds nearly every report's subject without hashing the substance's nine fields (see _subject_by_value).
_SUBJECTS: dict[int, tuple[ResolvedSubstance, Subject]] = {}


def subject_of(substance: ResolvedSubstance) -> Subject:
    """The alert subject of a resolved substance (cached: the resolver returns few distinct ones)."""
    known = _SUBJECTS.get(id(substance))
    if known is not None and known[0] is substance:
        return known[1]
    subject = _subject_by_value(substance)
    if len(_SUBJECTS) >= 4096:
        _SUBJECTS.clear()
    _SUBJECTS[id(substance)] = (substance, subject)
    return subject


@lru_cache(maxsize=65536)
def _subject_by_value(substance: ResolvedSubstance) -> Subject:
    """The subject of an equal substance met before: one Subject object per distinct answer."""
    return Subject(
        key=substance.key,
        name=substance.display_name,
        inchikey=substance.inchikey,
        family=substance.family,
        controlled=substance.controlled,
        catalogued=substance.catalogued,
        identified_by=substance.resolved_by,
        formerly=substance.formerly,
        formerly_regions=substance.formerly_regions,
        formerly_since=substance.formerly_since,
    )


_ZONES: dict[tzinfo, tzinfo] = {}  # one object per UTC offset, a datetime.timezone (see Observation.fields_from)


def _zone_for(zone: tzinfo) -> tzinfo:
    """The object :meth:`Observation.fields_from` gives every time of ``zone``'s offset: a ``datetime.timezone`` of that
    offset (``timezone.utc`` for UTC, the one ``alerting.EPOCH`` has), or ``zone`` itself if it has no fixed offset.

    Why a ``timezone`` rather than the first parsed time's own (pydantic-core's ``TzInfo``): the detectors compare
    times and take day numbers (``day_of``: a difference from the epoch) all the time, and each asks both times'
    tzinfo for its offset unless the two are one object; a ``timezone`` answers in C, ``TzInfo`` through a Python
    call: ``day_of`` 0.29 against 0.065 µs, ``<`` of two offsets 0.23 against 0.02 µs. The same offset, so the same
    instants, written the same way (``isoformat``, the alerts' JSON)."""
    same = _ZONES.get(zone)
    if same is None:
        offset = zone.utcoffset(None)
        same = _ZONES[zone] = timezone(offset) if offset is not None else zone
    return same


#: An :class:`Observation`'s fields in order (``Observation(*fields)`` builds it).
ObservationFields = tuple[
    str, str, datetime, int, str, str, Subject, float | None, str | None, str | None, str | None, str | None
]


@dataclass(slots=True)
class Observation:
    """What the detectors need of one valid event (compact, already resolved)."""

    event_id: str
    kind: str
    occurred_at: datetime
    day: int
    country: str
    region: str
    subject: Subject
    grams: float | None
    method: str | None
    sample_type: str | None
    reporter: str | None = None  # the lab (lab_id) or agency whose report this is: alerts name it
    smiles: str | None = None  # the structure as reported: a new substance's neighbours are found by it

    # Written out, not left to @dataclass: compiled, the generated __init__ stays interpreted (one per report, in the
    # backtest's detection process). The same arguments, in the same order, with the same defaults.
    def __init__(
        self,
        event_id: str,
        kind: str,
        occurred_at: datetime,
        day: int,
        country: str,
        region: str,
        subject: Subject,
        grams: float | None,
        method: str | None,
        sample_type: str | None,
        reporter: str | None = None,
        smiles: str | None = None,
    ) -> None:
        self.event_id = event_id
        self.kind = kind
        self.occurred_at = occurred_at
        self.day = day
        self.country = country
        self.region = region
        self.subject = subject
        self.grams = grams
        self.method = method
        self.sample_type = sample_type
        self.reporter = reporter
        self.smiles = smiles

    @classmethod
    def of(cls, item: EnrichedEvent) -> Observation:
        return cls(*cls.fields_of(item))

    @staticmethod
    def fields_of(item: EnrichedEvent) -> ObservationFields:
        """The fields of :meth:`of`, in order, as a plain tuple: what the backtest sends its detection process
        (a tuple pickles in a third of the time of the dataclass)."""
        quantity = item.quantity
        return Observation.fields_from(item.event, item.substance, quantity.grams if quantity is not None else None)

    @staticmethod
    def fields_from(
        event: LabDetection | BorderSeizure, substance: ResolvedSubstance, grams: float | None
    ) -> ObservationFields:
        """:meth:`fields_of` from what an :class:`EnrichedEvent` would hold: the backtest's reader makes none."""
        moment = event.occurred_at
        lab = event if isinstance(event, LabDetection) else None
        # The few distinct codes, names, spellings and UTC offsets as one object each: the detection process
        # gets each once per block (pickle keeps one copy of an object), its state holds one copy, and two
        # times with the same offset object compare without asking it for the offset (others ask a datetime.timezone,
        # in C: see _zone_for). Fixed offsets: a time given another object of the same offset is the same instant,
        # written the same way.
        zone = moment.tzinfo
        if zone is not None:
            same = _zone_for(zone)
            if same is not zone:
                moment = moment.replace(tzinfo=same)
        shared = sys.intern
        smiles = event.substance.smiles
        method: str | None
        sample_type: str | None
        reporter: str | None
        if lab is not None:
            method, sample_type, reporter = shared(lab.method), shared(lab.sample_type), shared(lab.lab_id)
        else:
            agency = getattr(event, "agency", None)
            method = sample_type = None
            reporter = shared(agency) if agency is not None else None
        return (  # positional: built for every report
            event.event_id,
            shared(event.kind),
            moment,
            intern_day(day_of(moment)),
            shared(event.country),
            shared(event.region),
            subject_of(substance),
            grams,
            method,
            sample_type,
            reporter,
            shared(smiles) if smiles is not None else None,
        )

    @staticmethod
    def all_from(block: list[ObservationFields]) -> list[Observation]:
        """``Observation(*fields)`` of each of ``block`` (what :meth:`fields_from` gave, unpickled in the backtest's
        detection process), each day number as :func:`~.spikes.intern_day`'s object. Here, compiled, rather than in
        the backtest's interpreted loop: there each observation was a generic call with twelve arguments unpacked,
        and a second for its day (~4 % of the detection process)."""
        return [
            Observation(f[0], f[1], f[2], intern_day(f[3]), f[4], f[5], f[6], f[7], f[8], f[9], f[10], f[11])
            for f in block
        ]

    def sighting(self, late_by_hours: float | None = None) -> Sighting:
        """What the novelty stage needs of this report (``late_by_hours`` for a late one)."""
        s = self.subject
        # Positional, in the order of Sighting's fields (tests/detect/test_backtest_speedups.py checks it against the
        # keywords): compiled, keywords built a dict per sighting for the dataclass's __init__ (~1 % of the backtest's
        # detection process).
        return Sighting(
            self.event_id,
            self.kind,
            self.occurred_at,
            self.day,
            self.country,
            self.region,
            s.key,
            s.name,
            s.inchikey,
            s.family,
            s.controlled,
            s.catalogued,
            self.method,
            self.sample_type,
            late_by_hours,
            s.identified_by,
            self.reporter,
            self.smiles if s.identified_by == "structure" else None,
            s.formerly,
            list(s.formerly_regions) if s.formerly is not None else None,
            s.formerly_since,
        )


def report_id(obs: Observation) -> str:
    """The claimed reporter and event id of ``obs`` as one string (``lab:ID``/``agency:NAME``, a unit
    separator, the event id): what the region's recent ids hold. Event ids are unique per reporter only, so
    another reporter's report with the same id is not a duplicate. No field may hold the separator (schemas
    refuse control characters), so the string names one pair; an id noted before reporters were part of it
    is a plain event id (no separator): see :meth:`RegionDetector._seen_before`."""
    tag = "lab:" if obs.kind == "lab_detection" else "agency:"
    return f"{tag}{obs.reporter or ''}\x1f{obs.event_id}"


@dataclass(slots=True)
class RegionState:
    """Per-region bookkeeping: event-time watermarks, recent ids (duplicates: :func:`report_id`, reporter
    and event id), daily totals (rhythm).

    Watermarks are per kind: labs and seizures come on two topics whose interleaving is arbitrary
    (a replay may deliver a month of lab reports before the seizures), but each is in order.

    Written to a changelog as a full record plus a delta of the ids added since (see
    :meth:`changelog_record`), so a batch does not rewrite days of ids it did not touch.
    """

    watermarks: dict[str, datetime] = field(default_factory=dict)
    recent: dict[int, set[str]] = field(default_factory=dict)
    forwarded: dict[int, set[str]] = field(default_factory=dict)
    totals: dict[int, int] = field(default_factory=dict)
    first_day: int | None = None  # the region's first report (the rhythm needs four weeks of it)
    pruned_day: int | None = (
        None  # pruning runs once per day (persisted: a restored state prunes when the live one would)
    )
    today: int | None = None  # not persisted: the day of the newest watermark, kept as they move
    # Not persisted: the day pruning follows, that of the slowest kind's watermark (see RegionDetector._settled_day).
    settled: int | None = None
    # Weekday factors per day, learnt when first asked for (see :meth:`RegionDetector.rhythm`); persisted, so a
    # restored state uses the factors the live one learnt even when a lagging topic changed old totals since.
    rhythm: dict[int, list[float]] = field(default_factory=dict)
    # Changelog bookkeeping (no effect on detection): what changed since the full record ``gen``.
    gen: int = 0
    full_due: bool = True  # no full record of this state written yet (new, or restored)
    added_recent: dict[int, list[str]] = field(default_factory=dict)
    added_forwarded: dict[int, list[str]] = field(default_factory=dict)
    added: int = 0
    added_rhythm: list[int] = field(default_factory=list)
    cut: int | None = None  # ids of days before this were pruned after the full record
    rhythm_cut: int | None = None  # factors of days before this were pruned after the full record
    # Per input partition, the offset of the last event this region judged (see :mod:`.replay`).
    applied: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The full record (id sets as lists in set order: they are read back into sets)."""
        totals = self.totals
        return {
            "g": self.gen,
            "w": {kind: moment.isoformat() for kind, moment in self.watermarks.items()},
            "r": {str(d): list(ids) for d, ids in self.recent.items()},
            "f": {str(d): list(keys) for d, keys in self.forwarded.items()},
            "t": [list(totals), list(totals.values())],
            "d": self.first_day,
            "p": self.pruned_day,
            "h": {str(d): factors for d, factors in self.rhythm.items()},
            "a": dict(self.applied),
        }

    def delta_dict(self) -> dict[str, Any]:
        """What changed since the full record ``gen``: new ids and keys; totals and watermarks whole."""
        totals = self.totals
        return {
            "g": self.gen,
            "w": {kind: moment.isoformat() for kind, moment in self.watermarks.items()},
            "r": {str(d): ids[:] for d, ids in self.added_recent.items()},
            "f": {str(d): keys[:] for d, keys in self.added_forwarded.items()},
            "t": [list(totals), list(totals.values())],
            "d": self.first_day,
            "p": self.pruned_day,
            "h": {str(d): self.rhythm[d] for d in self.added_rhythm if d in self.rhythm},
            "o": self.cut,
            "ho": self.rhythm_cut,
            "a": dict(self.applied),
        }

    def changelog_record(self, delta_limit: int = 256) -> tuple[bool, dict[str, Any]]:
        """(full?, record) to write now: the delta, or a new full record once the delta is large."""
        if not self.full_due and self.added + len(self.added_rhythm) <= delta_limit:
            return False, self.delta_dict()
        self.gen += 1
        self.full_due = False
        self.added_recent.clear()
        self.added_forwarded.clear()
        self.added_rhythm.clear()
        self.added = 0
        self.cut = self.rhythm_cut = None
        return True, self.to_dict()

    def note_added(self, day: int, report: str, forwarded_key: str | None) -> None:
        """Remember a :func:`report_id` (and a forwarded substance) added since the full record."""
        ids = self.added_recent.get(day)
        if ids is None:
            ids = self.added_recent[day] = []
        ids.append(report)
        if forwarded_key is not None:
            keys = self.added_forwarded.get(day)
            if keys is None:
                keys = self.added_forwarded[day] = []
            keys.append(forwarded_key)
        self.added += 1

    @classmethod
    def from_records(cls, full: dict[str, Any], delta: dict[str, Any] | None = None) -> RegionState:
        """The state the live one had when ``full`` and then ``delta`` (if of the same ``gen``) were written.

        A record of the previous format (no ``g``; totals as a dict) is read as a full record without delta.
        """
        if "g" not in full:
            full = {**full, "g": 0, "t": [[int(d) for d in full.get("t", {})], list(full.get("t", {}).values())]}
            delta = None
        recent = {int(d): set(ids) for d, ids in full.get("r", {}).items()}
        forwarded = {int(d): set(keys) for d, keys in full.get("f", {}).items()}
        rhythm = {int(d): list(factors) for d, factors in full.get("h", {}).items()}
        watermarks, totals, first_day = full.get("w") or {}, full.get("t") or [[], []], full.get("d")
        pruned_day, marks = full.get("p"), marks_of(full)
        if delta is not None and delta["g"] == full.get("g"):
            cut, rhythm_cut = delta["o"], delta["ho"]
            if cut is not None:
                recent = {d: ids for d, ids in recent.items() if d >= cut}
                forwarded = {d: keys for d, keys in forwarded.items() if d >= cut}
            if rhythm_cut is not None:
                rhythm = {d: factors for d, factors in rhythm.items() if d >= rhythm_cut}
            for table, added in ((recent, delta["r"]), (forwarded, delta["f"])):
                for d, ids in added.items():
                    table.setdefault(int(d), set()).update(ids)
            rhythm.update((int(d), list(factors)) for d, factors in delta["h"].items())
            watermarks, totals, first_day, pruned_day = delta["w"] or {}, delta["t"], delta["d"], delta["p"]
            marks = marks_of(delta)
        return cls(
            watermarks={kind: datetime.fromisoformat(v) for kind, v in watermarks.items()},
            recent=recent,
            forwarded=forwarded,
            totals={intern_day(int(d)): int(n) for d, n in zip(*totals, strict=True)},
            first_day=first_day,
            pruned_day=pruned_day,
            rhythm=rhythm,
            gen=int(full.get("g", 0)),
            applied=marks,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RegionState:
        return cls.from_records(data)

    def heal(self, bound: datetime) -> Healed | None:
        """Take out what a report dated after ``bound`` (the latest event time the intake takes now) left in this
        state; None if nothing. Such a report was taken before the intake bounded event times (a 2099 date), and a
        state recovered from the changelogs still holds it: its kind's watermark made every later report of the
        region late, and its day was ``today``, so every later report was pruned, totalled and tested against it.

        Healed: every watermark after ``bound`` goes back to the start of the newest day before ``bound``'s that
        holds an id of its kind (:func:`report_id` says the kind; not ``bound``'s day: the bad report may be one of
        its ids), or to none when no such day is kept (the kind's next report sets it). That is never after the
        watermark the region would have without the bad report (a report of that day was judged), so no report is
        made late by healing; what the bad report's pruning forgot (older ids and totals) stays lost.
        Ids, forwarded substances, totals and weekday factors of days after ``bound``'s are dropped; the first
        day and the pruning day are taken back to kept days (``today`` follows the watermarks at the next report,
        and so does the next pruning). The state is written as a full record next (the changelog holds it).
        """
        last = day_of(bound)
        far = {kind: moment for kind, moment in self.watermarks.items() if moment > bound}
        days = sorted(
            {d for table in (self.recent, self.forwarded, self.totals, self.rhythm) for d in table if d > last}
        )
        if not far and not days and (self.pruned_day is None or self.pruned_day <= last):
            return None
        for table in (self.recent, self.forwarded, self.totals, self.rhythm):
            for d in [d for d in table if d > last]:
                del table[d]
        healed: dict[str, tuple[datetime, datetime | None]] = {}
        for kind, moment in far.items():
            tag = "lab:" if kind == "lab_detection" else "agency:"
            kept = [
                d for d, ids in self.recent.items() if d < last and any(i.startswith(tag) and "\x1f" in i for i in ids)
            ]
            if kept:
                self.watermarks[kind] = to = day_start(max(kept))
            else:
                del self.watermarks[kind]
                to = None
            healed[kind] = (moment, to)
        if self.first_day is not None and self.first_day > last:
            self.first_day = min(self.totals) if self.totals else None
        pruned = self.pruned_day if self.pruned_day is not None and self.pruned_day > last else None
        if pruned is not None:
            self.pruned_day = None
        self.today = self.settled = None
        self.full_due = True
        return Healed(healed, days, pruned)


@dataclass(slots=True)
class Healed:
    """What healing took out of one state record (see :meth:`RegionState.heal`, :meth:`SeriesState.heal`): each
    watermark after the bound (what it was, what it is now: None for none), the far-future days dropped (day
    numbers, ascending) and the far-future day the state was pruned as of (forgotten: pruned again at the next
    report, as of its day), if any."""

    watermarks: dict[str, tuple[datetime, datetime | None]]
    days: list[int]
    pruned: int | None = None


@dataclass(slots=True)
class RegionResult:
    alerts: list[Alert] = field(default_factory=list)
    sightings: list[Sighting] = field(default_factory=list)
    late_by_hours: float | None = None  # a late report: stored and flagged, not counted in spikes
    duplicate: bool = False
    replayed: bool = False  # judged before a restart and held in the region's state already: nothing to do

    # Written out, not left to @dataclass: compiled, the generated __init__ stays interpreted (~2,500 instructions
    # a result, one per report: ~3 % of the backtest's detection). The same arguments and defaults.
    def __init__(
        self,
        alerts: list[Alert] | None = None,
        sightings: list[Sighting] | None = None,
        late_by_hours: float | None = None,
        duplicate: bool = False,
        replayed: bool = False,
    ) -> None:
        self.alerts = [] if alerts is None else alerts
        self.sightings = [] if sightings is None else sightings
        self.late_by_hours = late_by_hours
        self.duplicate = duplicate
        self.replayed = replayed


@lru_cache(maxsize=1024)
def family_subject(family: str) -> Subject:
    """The alert subject of a family series (cached: built for every report with a family)."""
    return Subject(
        key=f"family:{family}",
        name=f"{FAMILY_LABELS.get(family, family)} (all substances)",
        inchikey=None,
        family=family,
        controlled=None,
        catalogued=True,
    )


class RegionDetector:
    """Region-keyed stage. State: ``regions`` (RegionState) and ``series`` ("REGION|series key")."""

    RHYTHM_DAYS = 56
    RHYTHM_LAG = 9

    def __init__(self, config: DetectionConfig | None = None, fetch: Fetch | None = None) -> None:
        self.config = config or DetectionConfig()
        self.fetch = fetch  # loads a state record not in memory yet (the worker's changelog table)
        self.model = SpikeModel(self.config.spike)
        self.regions: dict[str, RegionState] = {}
        self.series: dict[str, SeriesState] = {}
        self.dirty_regions: set[str] = set()
        self.dirty_series: set[str] = set()
        # The worker's outbox (off in the backtest, which has no crash to survive): a spike alert is kept
        # in the record of the series that raised it, written with the state that decided it, and sent
        # only after that record is acknowledged (see :meth:`take_outbox`). A worker killed before the
        # write re-decides the event from state that never saw it, and nothing was sent; one killed after
        # it finds the alert in the restored record (its mark skips the event) and sends it then.
        self.outbox = False
        self.outbox_series: set[str] = set()  # series holding outbox entries no checkpoint is sending
        self.lateness = timedelta(hours=self.config.lateness_hours)
        self._keep_ids_days = int(self.config.lateness_hours // 24) + 2
        # The worker's: the latest event time its intake takes now (its clock + SYNTHWATCH_MAX_FUTURE_HOURS). A
        # record loaded through ``fetch`` is healed of what a report dated after it left there (see
        # :meth:`RegionState.heal`, :meth:`SeriesState.heal`) and written back; ``on_healed`` is told (record key,
        # what), once per region record and per series record that held far-future days. None (the backtest, the
        # tests): records are loaded as they are.
        self.bound: Callable[[], datetime] | None = None
        self.on_healed: Callable[[str, Healed], None] | None = None
        self._healed: set[str] = set()

    # --- state access (the Faust adapter may preload these dicts from its tables) ---------------------

    def region_state(self, region: str) -> RegionState:
        state = self.regions.get(region)
        if state is None:
            stored = self.fetch(f"R:{region}") if self.fetch else None
            if stored and self.fetch:
                state = RegionState.from_records(stored, self.fetch(f"R+:{region}"))
                if self.bound is not None:
                    healed = state.heal(self.bound())
                    if healed is not None:
                        self.dirty_regions.add(region)
                        self._tell(f"R:{region}", healed)
            else:
                state = RegionState()
            self.regions[region] = state
        return state

    def _tell(self, key: str, healed: Healed) -> None:
        """Tell ``on_healed`` that the record ``key`` was healed, the first time only (a rebalance may load the
        record again before the healed one is written)."""
        if key not in self._healed and self.on_healed is not None:
            if len(self._healed) < 100_000:  # a bound on what a stream of hostile region names can make it hold
                self._healed.add(key)
            self.on_healed(key, healed)

    def series_state(self, region: str, key: str, day: int) -> tuple[str, SeriesState]:
        name = f"{region}|{key}"
        state = self.series.get(name)
        if state is None:
            state = self.load_series(name) or SeriesState(first_day=day)
            self.series[name] = state
        if day < state.first_day:
            state.first_day = day
        return name, state

    def load_series(self, name: str) -> SeriesState | None:
        """A series record from the table (None if it has none); its outbox entries are queued to send."""
        stored = self.fetch(f"S:{name}") if self.fetch else None
        if not stored or not self.fetch:
            return None
        state = SeriesState.from_records(stored, self.fetch(f"S+:{name}"))
        if self.bound is not None:
            healed = state.heal(day_of(self.bound()))
            if healed is not None:
                self.dirty_series.add(name)
                if healed[0]:  # only pruned as of the far day: every series a report touched then, told by the region
                    self._tell(f"S:{name}", Healed({}, *healed))
        if state.outbox:  # written with the state that decided them, maybe never sent: send (again)
            self.outbox_series.add(name)
        return state

    # --- the outbox (worker only) ---------------------------------------------------------------------

    def restore_outboxes(self, names: Iterable[str]) -> list[str]:
        """Load these series (their records hold outbox entries) so :meth:`take_outbox` returns them.

        Returns the names loaded now: their entries are all written (a series already in memory may
        hold entries added since, which only a checkpoint may send, after writing them).
        """
        loaded = []
        for name in names:
            if name not in self.series:
                state = self.load_series(name)
                if state is not None:
                    self.series[name] = state
                    loaded.append(name)
        return loaded

    def take_outbox(self, only: Collection[str] | None = None) -> list[tuple[str, SeriesState, list[str]]]:
        """(series, state, alert JSON) of outbox entries not handed out before, for a checkpoint to send.

        Call it with :meth:`drain_dirty`: an entry added since the last call belongs to a series that is
        dirty now, so the checkpoint writes it before sending it; a restored entry is written already.
        ``only``: just these series (restored ones, sent outside a checkpoint); the others stay queued.
        """
        taken = []
        for name in self.outbox_series if only is None else [n for n in self.outbox_series if n in only]:
            state = self.series.get(name)
            if state is not None and len(state.outbox) > state.sending:
                taken.append((name, state, state.outbox[state.sending :]))
                state.sending = len(state.outbox)
        if only is None:
            self.outbox_series.clear()
        else:
            self.outbox_series.difference_update(only)
        return taken

    def sent(self, name: str, state: SeriesState, n: int) -> None:
        """The first ``n`` outbox entries of ``state`` are acknowledged by the broker: drop them, and write
        the record without them at the next checkpoint (a restart before that sends them again: same id,
        same content, skipped downstream)."""
        if self.series.get(name) is not state:
            return  # forgotten (a rebalance) meanwhile: the next owner of the record sends them again
        del state.outbox[:n]
        state.sending -= n
        self.dirty_series.add(name)

    # --- weekday rhythm ------------------------------------------------------------------------------

    def rhythm(self, region: str, state: RegionState, day: int) -> list[float]:
        """Weekday factors from the region's own daily totals (1.0 until it has four weeks).

        Learnt from days that ended more than ``RHYTHM_LAG`` days before ``day``: recent totals are
        still filling in (the two input topics may deliver a region's labs and seizures at different
        paces), and the factors must not depend on that.
        """
        factors = state.rhythm.get(day)
        if factors is None:
            end = day - self.RHYTHM_LAG
            start = end - self.RHYTHM_DAYS
            since = state.first_day if state.first_day is not None else end
            days = list(range(max(start, since), end))
            factors = [1.0] * 7
            if len(days) >= 28:
                get = state.totals.get
                # Integer sums per weekday (exact, so the same numbers as summing each weekday's list).
                sums, sizes = [0] * 7, [0] * 7
                for d in days:
                    weekday = d % 7
                    sums[weekday] += get(d, 0)
                    sizes[weekday] += 1
                overall = sum(sums) / len(days)
                if overall > 0:
                    for weekday in range(7):
                        factors[weekday] = min(3.0, max(0.2, (sums[weekday] / sizes[weekday]) / overall))
            state.rhythm[day] = factors
            state.added_rhythm.append(day)
        return factors

    # --- the stage -----------------------------------------------------------------------------------

    def observe(
        self, obs: Observation, emit: bool = True, at: Position | None = None, test: bool = True
    ) -> RegionResult:
        """Process one event of ``obs.region`` (in that region's arrival order).

        ``at``: where the event was read (the worker). A region or series record that holds it already
        (a replay after a crash, see :mod:`.replay`) is left as it is; one that does not takes it.
        ``test`` off records the event in its series without testing them (see :meth:`SpikeModel.observe`).
        """
        result = RegionResult()
        region = self.regions.get(obs.region) or self.region_state(obs.region)
        if not apply_once(region.applied, at):
            # Judged before, and every series record it touched was written before this region record.
            result.replayed = True
            return result
        watermark = region.watermarks.get(obs.kind)
        if watermark is not None and obs.occurred_at < watermark - self.lateness:
            return self._observe_late(obs, region, watermark, result)
        day = obs.day
        key = report_id(obs)
        if self._seen_before(region, obs, key, result):
            return result
        today = region.today
        if today is None:
            if watermark is None or obs.occurred_at > watermark:
                region.watermarks[obs.kind] = obs.occurred_at
            today = region.today = day_of(max(region.watermarks.values()))
            settled = region.settled = self._settled_day(region, today)
        elif watermark is None or obs.occurred_at > watermark:
            region.watermarks[obs.kind] = obs.occurred_at
            if day > today:  # the day of the newest watermark: day_of is monotonic
                today = region.today = day
            settled = region.settled = self._settled_day(region, today)
        else:
            settled = region.settled if region.settled is not None else self._settled_day(region, today)
        if region.pruned_day != settled:
            self._prune(region, settled)
        region.totals[day] = region.totals.get(day, 0) + 1
        if region.first_day is None or day < region.first_day:
            region.first_day = day
        rhythm = self.rhythm(obs.region, region, day)

        # The substance's series, then its family's (both loaded first: a series' first report dates it).
        subject, family = obs.subject, obs.subject.family
        name, state = self.series_state(obs.region, subject.key, day)
        family_name, family_state = self.series_state(obs.region, f"family:{family}", day) if family else ("", None)
        # Seized mass is tested per substance only: a family's total mixes drugs of every member, so an
        # alert on it would say nothing about any one of them. The family keeps its masses as the usual
        # seizure of members with too little history of their own.
        if apply_once(state.applied, at):
            self.dirty_series.add(name)
            findings = self.model.observe(
                state,
                day,
                settled,
                obs.event_id,
                obs.grams,
                rhythm,
                pool=family_state,
                test=test,
                rhythms=region.rhythm,
            )
            if findings and emit:
                alerts = [self._spike_alert(obs, subject, state, f) for f in findings if f.new_episode]
                self._raise(result, name, state, alerts)
        if family and family_state is not None and apply_once(family_state.applied, at):
            self.dirty_series.add(family_name)
            findings = self.model.observe(
                family_state,
                day,
                settled,
                obs.event_id,
                obs.grams,
                rhythm,
                test_mass=False,
                test=test,
                rhythms=region.rhythm,
            )
            if findings and emit:
                group = family_subject(family)
                alerts = [self._spike_alert(obs, group, family_state, f) for f in findings if f.new_episode]
                self._raise(result, family_name, family_state, alerts)

        forwarded = region.forwarded.get(day)
        if forwarded is None:
            forwarded = region.forwarded[day] = set()
        if obs.subject.key not in forwarded:
            forwarded.add(obs.subject.key)
            result.sightings.append(obs.sighting())
            region.note_added(day, key, obs.subject.key)
        else:
            region.note_added(day, key, None)
            if obs.subject.formerly is not None:  # it ties a name to its structure: novelty must hear it
                result.sightings.append(obs.sighting())
        return result

    def _raise(self, result: RegionResult, name: str, state: SeriesState, alerts: list[Alert]) -> None:
        """Return the alerts; with the outbox on, also keep them in the series record that raised them."""
        if alerts:
            result.alerts.extend(alerts)
            if self.outbox:
                state.outbox.extend(a.model_dump_json() for a in alerts)
                self.outbox_series.add(name)

    def _seen_before(self, region: RegionState, obs: Observation, key: str, result: RegionResult) -> bool:
        """Note ``key`` (:func:`report_id` of ``obs``) among its day's ids; True (``result.duplicate`` set) if
        it was there already. A plain event id there was noted before ids were scoped by reporter: it may be
        this reporter's, so it still makes ``obs`` a duplicate (as it did then) until its day is pruned."""
        seen = region.recent.get(obs.day)
        if seen is None:
            seen = region.recent[obs.day] = set()
        elif key in seen or obs.event_id in seen:
            result.duplicate = True
            return True
        seen.add(key)
        self.dirty_regions.add(obs.region)
        return False

    def _observe_late(
        self, obs: Observation, region: RegionState, watermark: datetime, result: RegionResult
    ) -> RegionResult:
        """A late report: the spike windows of its day are decided, so it is left out of the series, the
        region's totals and watermarks; it is still stored (by the caller) and sighted for novelty.

        While its day's ids are kept, a re-send is a duplicate here; an older day's ids are pruned, and the
        caller tells a re-send from a late first report by what is stored.
        """
        late_by = round((watermark - obs.occurred_at).total_seconds() / 3600, 1)
        result.late_by_hours = late_by
        day = obs.day
        # The day the region's ids are kept as of: its last pruning's, else (right after healing forgot it) the day the
        # next pruning will use, the settled one (the slowest kind's). Not the newest kind's day: a late report of a
        # day pruning keeps was taken as from a pruned day, its id not noted, and its re-send sighted again.
        pruned = region.pruned_day
        if pruned is None:
            pruned = self._settled_day(region, day_of(max(region.watermarks.values())))
        if day < pruned - self._keep_ids_days:
            result.sightings.append(obs.sighting(late_by))
            return result
        key = report_id(obs)
        if self._seen_before(region, obs, key, result):
            return result
        forwarded = region.forwarded.get(day)
        if forwarded is None:
            forwarded = region.forwarded[day] = set()
        if obs.subject.key not in forwarded:
            forwarded.add(obs.subject.key)
            result.sightings.append(obs.sighting(late_by))
            region.note_added(day, key, obs.subject.key)
        else:
            region.note_added(day, key, None)
            if obs.subject.formerly is not None:  # it ties a name to its structure: novelty must hear it
                result.sightings.append(obs.sighting(late_by))
        return result

    def drain_dirty(self, encode: Callable[[dict[str, Any]], Any] | None = None) -> list[tuple[str, str, Any]]:
        """(region, table key, value) of every record changed since the last call.

        A state changed since its last full record ("R:…", "S:…") writes only a delta ("R+:…", "S+:…");
        :meth:`region_state` and :meth:`series_state` read both back through ``fetch``.

        Series first, regions last: written in this order to the region's partition, a region record
        that survived a crash implies its series records did (a region's replay marks then cover them).

        ``encode``: each value is handed to it as soon as it is built and its result is returned instead (the
        worker's checkpoint: its JSON bytes). Why: a record is a tree of small lists and dicts, and a checkpoint at
        1,000 events/s drains 1,000-1,500 of them: built all at once and kept until the changelog write had encoded
        them, they were 20,000-60,000 live containers that set off a young collection of the garbage collector
        (30-50 ms with the worker's thresholds) in the drain itself, which every alert on its way then waited for
        (docs/performance.md, "The alert tail, per alert"). Encoded at once, each tree is freed right away.
        """
        changed: list[tuple[str, str, Any]] = []
        for n in self.dirty_series:
            full, value = self.series[n].changelog_record()
            record = value if encode is None else encode(value)
            changed.append((n.split("|", 1)[0], f"S:{n}" if full else f"S+:{n}", record))
        for r in self.dirty_regions:
            full, value = self.regions[r].changelog_record()
            record = value if encode is None else encode(value)
            changed.append((r, f"R:{r}" if full else f"R+:{r}", record))
        self.dirty_regions.clear()
        self.dirty_series.clear()
        return changed

    def forget(self) -> None:
        """Drop the in-memory cache (after a rebalance another worker may own these regions)."""
        self.regions.clear()
        self.series.clear()
        self.dirty_regions.clear()
        self.dirty_series.clear()
        self.outbox_series.clear()

    def _settled_day(self, region: RegionState, today: int) -> int:
        """The day the region's state is pruned as of: that of its *slowest* kind's watermark, at most
        ``KIND_SKEW_DAYS`` before ``today`` (the newest kind's).

        A report that is not late for its kind is at most a day older than its kind's watermark, and its
        baseline and weekday rhythm need days up to ``keep_days`` before it. Pruned as of the newest kind's day,
        a report of a kind read days behind the other (two topics interleave arbitrarily) found the first days
        of its baseline gone while their exposure still counted: a lower rate, and a spike raised or not by how
        the topics interleaved (the demo's 22nd alert). A kind silent for longer than ``KIND_SKEW_DAYS`` stops
        holding pruning back, so state stays bounded. A kind with no watermark in the region counts as silent that
        long: its first report there (or its first after healing took its watermark, or after a rebuild from a window
        it was silent in) may be read days behind the other kind too, and must find the days the live worker keeps.
        """
        bound = today - KIND_SKEW_DAYS
        marks = region.watermarks
        for kind in KINDS:
            if kind not in marks:
                return bound
        # ``min`` written out: compiled, the builtin over a dict's values is a generic call (~2 % of the backtest's
        # detection process: once per report that moves a watermark). The same first smallest time.
        oldest: datetime | None = None
        for mark in marks.values():
            if oldest is None or mark < oldest:
                oldest = mark
        if oldest is None:  # not reached: every kind has a mark here
            return bound
        slowest = day_of(oldest)
        return slowest if slowest > bound else bound

    def _prune(self, region: RegionState, today: int) -> None:
        if region.pruned_day == today:
            return
        region.pruned_day = today
        oldest = today - self._keep_ids_days

        for table in (region.recent, region.forwarded, region.added_recent, region.added_forwarded):
            for day in [d for d in table if d < oldest]:
                del table[day]
                region.cut = oldest
        horizon = today - self.RHYTHM_DAYS - self.RHYTHM_LAG - 2
        if region.totals and min(region.totals) < horizon:
            region.totals = {d: n for d, n in region.totals.items() if d >= horizon}
        if region.rhythm and min(region.rhythm) < horizon:
            for day in [d for d in region.rhythm if d < horizon]:
                del region.rhythm[day]
            region.rhythm_cut = horizon

    def _spike_alert(self, obs: Observation, subject: Subject, state: SeriesState, f: SpikeFinding) -> Alert:
        pairs = zip(state.evidence_days, state.evidence_ids, strict=True)
        window_ids = [i for d, i in pairs if f.window_start_day <= d <= f.window_end_day][-20:]
        place = region_label(obs.region)
        if f.metric == "count":
            summary = (
                f"{place}: {f.observed:g} reports of {subject.name} in {f.window_days} "
                f"{'day' if f.window_days == 1 else 'days'} where "
                f"{f.expected:.2g} were expected (p < 1e-{int(f.score)})."
            )
        else:
            summary = (
                f"{place}: {f.observed:,.0f} g of {subject.name} seized in {f.window_days} days; the latest "
                f"seizure is {f.mass_z or 0:.1f} robust SD above the usual mass here, and that many this "
                f"large are improbable (p < 1e-{int(f.score)})."
            )
        return build_alert(
            alert_type="spike",
            subject=subject,
            country=obs.country,
            region=obs.region,
            triggered_at=obs.occurred_at,
            window_start=day_start(f.window_start_day),
            window_end=day_start(f.window_end_day + 1),
            episode=f.episode_start,
            evidence=window_ids,
            summary=summary,
            metric=f.metric,
            observed=f.observed,
            expected=f.expected,
            score=f.score,
            details={"window_days": f.window_days},
            reported_by=[obs.reporter] if obs.reporter else [],
        )


@dataclass(slots=True)
class DetectionResult:
    alerts: list[Alert] = field(default_factory=list)
    late_by_hours: float | None = None
    duplicate: bool = False

    def __init__(  # written out, as RegionResult's
        self, alerts: list[Alert] | None = None, late_by_hours: float | None = None, duplicate: bool = False
    ) -> None:
        self.alerts = [] if alerts is None else alerts
        self.late_by_hours = late_by_hours
        self.duplicate = duplicate


class Detector:
    """Both stages in one process, in arrival order: the backtest and the tests use this."""

    def __init__(self, config: DetectionConfig | None = None) -> None:
        self.config = config or DetectionConfig()
        self.regions = RegionDetector(self.config)
        self.novelty = NoveltyDetector(self.config.novelty)

    def observe(self, obs: Observation, stored: Container[str] = ()) -> DetectionResult:
        """Both stages; a late report whose :func:`report_id` is in ``stored`` is a re-send (the worker asks
        ClickHouse by reporter and event id)."""
        stage = self.regions.observe(obs)
        duplicate = stage.duplicate or (stage.late_by_hours is not None and report_id(obs) in stored)
        result = DetectionResult(alerts=[], late_by_hours=stage.late_by_hours, duplicate=duplicate)
        if duplicate:
            return result
        for sighting in stage.sightings:
            result.alerts.extend(self.novelty.observe(sighting))
        result.alerts.extend(stage.alerts)
        return result

    def observe_all(self, observations: Iterable[Observation], seen: set[str]) -> tuple[list[Alert], int, int, int]:
        """:meth:`observe` over ``observations`` in order, ``seen`` as ``stored`` (the backtest): (alerts in order,
        events taken, duplicates, late events of those taken). ``seen`` grows with the :func:`report_id` of every event
        taken, as the worker's sink stores them. Here, compiled, rather than in the backtest's interpreted loop
        (~7 % of its detection process)."""
        alerts: list[Alert] = []
        events = duplicates = late = 0
        for obs in observations:
            result = self.observe(obs, seen)
            if result.duplicate:
                duplicates += 1
            else:
                seen.add(report_id(obs))
                events += 1
                if result.late_by_hours is not None:
                    late += 1
                alerts.extend(result.alerts)
        return alerts, events, duplicates, late

    def observe_event(self, item: EnrichedEvent) -> DetectionResult:
        return self.observe(Observation.of(item))
