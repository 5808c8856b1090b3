"""Network-level novelty, keyed by substance: never-seen substances, first appearance in a region, spread.

Its input is a :class:`Sighting`: the region stage forwards at most one per region, substance and
day, so this stage sees a tiny fraction of the events and its state (one record per substance) is
small. The catalogue names and classifies a substance but never suppresses: a catalogued drug the
network has never seen is still news to it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from synthwatch.schemas import Alert
from synthwatch.schemas.records import AlertType, GuessedFamily, LearntNeighbours, SimilarSubstance
from synthwatch.schemas.topics import Sighting
from synthwatch.stream_apps.detect.alerting import (
    IDENTIFIED_TEXT,
    Subject,
    build_alert,
    day_of,
    day_start,
    region_label,
)
from synthwatch.stream_apps.detect.config import NoveltyConfig
from synthwatch.stream_apps.detect.replay import Position, applied, marks_of, note

if TYPE_CHECKING:
    from synthwatch.stream_apps.detect.similarity import LearntStructure, Neighbour, SimilarityIndex

NEIGHBOURS = 5
"""How many similar known substances a new-substance alert lists."""

STRUCTURE_ALERTS = frozenset({"new_substance", "identified"})
"""Alerts that show a substance's chemistry (nearest known and learnt structures): a never-seen substance, and a
name alerted on its own now identified by a structure."""


def sighting_subject(s: Sighting) -> Subject:
    """What a sighting's alerts are about (the sighting itself is a wire model, in schemas/topics.py)."""
    return Subject(s.key, s.name, s.inchikey, s.family, s.controlled, s.catalogued, s.identified_by)


@dataclass(slots=True)
class SubstanceState:
    """What the network knows of one substance: where and when it was first and last seen."""

    first_region: str
    first_day: int
    regions: dict[str, list[int]] = field(default_factory=dict)  # region -> [first_day, last_day]
    spread: list[int] | None = None  # [episode start day, last day the condition held]
    # Per region, the days sighted lately as bits (bit i: the region's last day - i): the region stage
    # forwards one sighting per region, substance and day, so another one for a set bit was sent again
    # (an intake replay after a crash) and changes nothing.
    days: dict[str, int] = field(default_factory=dict)
    # Per sightings partition, the offset of the last sighting this record took (see replay.py).
    applied: dict[str, int] = field(default_factory=dict)
    # Name keys (``name:...``) a structure report tied to this substance (Sighting.formerly), each alerted once
    # as ``identified``: its name-only reports were counted, and alerted as never seen, under that key.
    names: list[str] = field(default_factory=list)
    # Regions where those names were reported (so alerted under the name key) and this record has not seen yet
    # (sorted; each leaves when the region is sighted). Bookkeeping only: a first report there raises
    # first_in_region as anywhere else (docs/detection.md, "Regions alerted under the name").
    named_regions: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A snapshot: the worker keeps it in its table, and a batch changes the live spans in place
        (a table value that followed them would hold effects of events whose batch was never finished)."""
        spread = self.spread
        return {
            "r": self.first_region,
            "d": self.first_day,
            "g": {region: [span[0], span[1]] for region, span in self.regions.items()},
            "s": [spread[0], spread[1]] if spread is not None else None,
            "m": dict(self.days),
            "a": dict(self.applied),
            **({"n": list(self.names)} if self.names else {}),  # absent when empty: older records stay as they were
            **({"nr": list(self.named_regions)} if self.named_regions else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SubstanceState:
        return cls(
            first_region=data["r"],
            first_day=int(data["d"]),
            regions={k: [int(v[0]), int(v[1])] for k, v in data["g"].items()},
            spread=[int(x) for x in data["s"]] if data.get("s") else None,
            days={str(k): int(v) for k, v in (data.get("m") or {}).items()},
            applied=marks_of(data),
            names=[str(n) for n in data.get("n") or ()],
            named_regions=[str(r) for r in data.get("nr") or ()],
        )

    def add_name(self, name_key: str, regions: Iterable[str]) -> None:
        """Tie a name key to this substance, with the regions it was reported from (those not seen here yet);
        both lists kept sorted, so a rebuilt record is byte-identical to the live one."""
        self.names = sorted({*self.names, name_key})
        self.named_regions = sorted({*self.named_regions, *(r for r in regions if r not in self.regions)})

    def sighted(self, region: str, day: int, horizon: int) -> bool:
        """Whether a sighting of ``region`` on ``day`` was taken already (known for ``horizon`` days back)."""
        span = self.regions.get(region)
        if span is None:
            return False
        back = span[1] - day
        return 0 <= back < horizon and bool(self.days.get(region, 0) >> back & 1)

    def mark_sighted(self, region: str, day: int, last_before: int | None, horizon: int) -> None:
        """Set ``day``'s bit; ``last_before`` is the region's last day before this sighting (None: new)."""
        mask = self.days.get(region, 0) if last_before is not None else 0
        last = self.regions[region][1]
        if last_before is not None and last > last_before:
            mask <<= last - last_before
        back = last - day
        if back < horizon:
            mask |= 1 << back
        self.days[region] = mask & ((1 << horizon) - 1)

    def heal(self, last_day: int) -> HealedSubstance | None:
        """Take out what a sighting dated after ``last_day`` (the day of the latest event time the intake takes
        now) left in this record; None if nothing. Such a sighting came from a report taken before the intake
        bounded event times (a 2099 date), and a record recovered from the changelogs still holds it: its region's
        span ended in 2099, so that region counted as active in every later spread test of the substance.

        Healed: a region sighted only after ``last_day`` goes (its next sighting is a first in the region again);
        one whose span ended after it ends on the newest day before it that the record still knows was sighted
        there (the day bits reach ``resent_days`` back from the far day, so usually its first day: never later
        than the region would have ended without the bad sighting, so healing makes no region active that was
        not). A spread episode started after ``last_day`` goes, one prolonged after it ends on ``last_day``. A
        record left with no region held only such sightings: it is as never seen (its next sighting is a new
        substance), keeping its replay marks. What stays lost: the region's real sightings between its last known
        day and the far one (its span ends earlier than it would have), names the bad sighting tied (told apart
        from real ones only when no region is left), a region it took out of ``named_regions``, and the spread
        episode a far one replaced.
        """
        far = {region: span for region, span in self.regions.items() if span[1] > last_day}
        spread = self.spread
        if not far and (spread is None or spread[1] <= last_day):
            return None
        dropped: list[str] = []
        moved: dict[str, tuple[int, int]] = {}
        for region, span in sorted(far.items()):
            if span[0] > last_day:
                del self.regions[region]
                self.days.pop(region, None)
                dropped.append(region)
                continue
            mask = self.days.get(region, 0)
            kept = mask >> (span[1] - last_day)  # bit i: last_day - i (the bits below were days after it)
            newest = last_day - (kept & -kept).bit_length() + 1 if kept else span[0]  # lowest set bit: newest day
            self.days[region] = mask >> (span[1] - newest) | 1
            moved[region] = (span[1], newest)
            span[1] = newest
        was = list(spread) if spread is not None else None
        if spread is not None and spread[0] > last_day:
            self.spread = None
        elif spread is not None and spread[1] > last_day:
            spread[1] = last_day
        if not self.regions:  # every sighting it held was far: as never seen (the replay marks stay)
            self.days.clear()
            self.spread = None
            self.names.clear()
            self.named_regions.clear()
        return HealedSubstance(moved, dropped, was if was != self.spread else None, not self.regions)


@dataclass(slots=True)
class HealedSubstance:
    """What healing took out of one substance record (see :meth:`SubstanceState.heal`): per region whose span ended
    after the bound, (its last day, its last day now); the regions dropped (sighted only after it); the spread
    episode [start, last day] if it was changed (dropped or ended earlier); whether no region is left (the
    substance is as never seen)."""

    moved: dict[str, tuple[int, int]]
    dropped: list[str]
    spread: list[int] | None
    emptied: bool


def reported_between(first: int, last: int, mask: int, since: int, day: int, bits: int) -> bool:
    """Whether a region first sighted on ``first`` and last on ``last``, with day bits ``mask`` (bit i: the day
    ``last - i``; ``bits`` of them kept), has a report from ``since`` to ``day``: its first day, or a bit in the window.
    One test for the spread's counts (:meth:`NoveltyDetector._holds`) and the regions an alert names (``_active``)."""
    low, high = max(last - day, 0), min(last - since, bits - 1)
    return since <= first <= day or (low <= high and mask >> low & ((1 << (high - low + 1)) - 1) != 0)


class NoveltyDetector:
    """Pure and synchronous: ``observe(sighting) -> alerts``; state is a dict of SubstanceState.

    A new-substance alert names its nearest catalogue relatives (a :class:`~.similarity.SimilarityIndex`,
    one fingerprint per structure, built on first use: a detector that never meets a structure never loads
    it). Not the structures this detector learnt from earlier sightings: what a detector has met depends on
    where it started (a restarted worker replays, several workers split the substances), and an alert must
    be the same with or without a crash (tests/detect/test_replay.py found one that was not). Analysts
    compare a structure with every stored one in ``synthwatch substance``.

    The structures the network learnt are a separate, labelled part of the alert (:meth:`with_learnt`): the
    runtime reads them from the store up to a cut fixed by the sightings message (see
    :class:`~synthwatch.schemas.records.LearntNeighbours`), so the answer does not depend on this detector.
    """

    def __init__(
        self,
        config: NoveltyConfig | None = None,
        fetch: Callable[[str], dict[str, Any] | None] | None = None,
        similarity: SimilarityIndex | None = None,
    ) -> None:
        self.config = config or NoveltyConfig()
        self.fetch = fetch  # loads a record not in memory yet (the worker's changelog table)
        self.state: dict[str, SubstanceState] = {}
        self.dirty: set[str] = set()
        self._similarity = similarity
        # The worker's: the latest event time its intake takes now (as RegionDetector.bound). A record loaded
        # through ``fetch`` is healed of what a sighting dated after its day left there (SubstanceState.heal) and
        # written back; ``on_healed`` is told (substance key, what), once per record. None (the backtest, the
        # tests): records are loaded as they are.
        self.bound: Callable[[], datetime] | None = None
        self.on_healed: Callable[[str, HealedSubstance], None] | None = None
        self._healed: set[str] = set()

    @property
    def similarity(self) -> SimilarityIndex:
        """The structures known to this detector (catalogue first), built the first time it is needed."""
        if self._similarity is None:
            from synthwatch.stream_apps.detect.similarity import SimilarityIndex  # RDKit fingerprints: when asked

            self._similarity = SimilarityIndex()
        return self._similarity

    def get(self, key: str) -> SubstanceState | None:
        known = self.state.get(key)
        if known is None and self.fetch is not None:
            stored = self.fetch(key)
            if stored is not None:
                known = self.state[key] = SubstanceState.from_dict(stored)
                if self.bound is not None:
                    healed = known.heal(day_of(self.bound()))
                    if healed is not None:
                        self.dirty.add(key)
                        self._tell(key, healed)
        return known

    def _tell(self, key: str, healed: HealedSubstance) -> None:
        """Tell ``on_healed`` that ``key``'s record was healed, the first time only (a rebalance may load the
        record again before the healed one is written)."""
        if key not in self._healed and self.on_healed is not None:
            if len(self._healed) < 100_000:  # a bound on what a stream of hostile substance keys can make it hold
                self._healed.add(key)
            self.on_healed(key, healed)

    def drain_dirty(self) -> list[tuple[str, dict[str, Any]]]:
        changed = [(key, self.state[key].to_dict()) for key in self.dirty]
        self.dirty.clear()
        return changed

    def forget(self) -> None:
        self.state.clear()
        self.dirty.clear()

    def observe_batch(self, batch: Sequence[tuple[Sighting, Position | None]]) -> tuple[list[Alert], int]:
        """A batch of sightings read from the sightings topic, in the order read: (alerts, sightings taken).

        In the order read, not re-sorted: a substance's sightings are on one partition, so after a crash
        its replay takes them in the same order as before and raises the same alerts with the same
        content (an order that depended on how the stream was cut into batches would not). Each
        message is sorted by event time by the region stage that sent it. A sighting whose record
        holds its position already (read again after a restart) is skipped; a message (one position)
        holds sightings of one substance and is taken whole or not at all.
        """
        alerts: list[Alert] = []
        taken = 0
        fresh: dict[Position | None, bool] = {None: True}  # per message: all its sightings, or none
        # A sighting dated more than a day after the bound's day was sent by a region stage before the intake
        # bounded event times and read only now (in flight at the upgrade): taken as then, and its record healed at
        # once, as it would be when next loaded (else it kept the 2099 span in memory until the worker let the
        # record go). A day's margin: the intake bounded its report by its receipt (at most that worker's clock),
        # this is this worker's clock (often another worker: sightings go by substance), and a sound sighting healed
        # at once would lose its region (the next one alerts it again).
        last_day = day_of(self.bound()) if self.bound is not None else None
        for sighting, at in batch:
            if at not in fresh:
                known = self.get(sighting.key)
                fresh[at] = known is None or not applied(known.applied, at)
            if not fresh[at]:
                continue
            alerts.extend(self.observe(sighting))
            record = self.state[sighting.key]
            note(record.applied, at)
            taken += 1
            if last_day is not None and sighting.day > last_day + 1:
                healed = record.heal(last_day)
                if healed is not None:
                    self.dirty.add(sighting.key)
                    self._tell(sighting.key, healed)
        return alerts, taken

    def observe(self, sighting: Sighting, emit: bool = True) -> list[Alert]:
        """Update the substance's record; return the alerts this sighting makes true.

        ``emit=False`` rebuilds state from history without raising alerts again. A sighting of a
        region and day taken already (sent again by a region stage replaying after a crash) changes
        nothing.
        """
        key, region, day = sighting.key, sighting.region, sighting.day
        horizon, bits = self.config.resent_days, self.day_bits
        known = self.get(key)
        alerts: list[Alert] = []
        formerly = sighting.formerly
        if known is not None and not known.regions:  # healed of every sighting it held: as never seen
            known = None
        if formerly is not None and known is not None and formerly not in known.names:
            # A name alerted on its own (name-only reports) is tied to this known structure: say so, once.
            self.dirty.add(key)
            known.add_name(formerly, sighting.formerly_regions or ())
            if emit:
                alerts.append(self._identified(sighting, known))
        if known is not None and known.sighted(region, day, horizon):
            return alerts
        self.dirty.add(key)
        if known is None:
            healed = self.state.get(key)  # a healed record's replay marks stay
            known = self.state[key] = SubstanceState(first_region=region, first_day=day)
            if healed is not None:
                known.applied = healed.applied
            known.regions[region] = [day, day]
            known.mark_sighted(region, day, None, bits)
            if formerly is not None:
                known.add_name(formerly, sighting.formerly_regions or ())
            if emit:
                # A new substance whatever its name had: the link to the name's alert is in its details.
                alerts.append(self._new_substance(sighting))
        else:
            if region not in known.regions:
                known.regions[region] = [day, day]
                known.mark_sighted(region, day, None, bits)
                if region in known.named_regions:
                    known.named_regions.remove(region)
                # Raised even where the name was alerted by itself: that alert was for information only (routes
                # from warning up never had it), and a junk name-only report must never silence a real one.
                if emit:
                    alerts.append(self._first_in_region(sighting, known))
            else:
                span = known.regions[region]
                last_before = span[1]
                span[0], span[1] = min(span[0], day), max(span[1], day)
                known.mark_sighted(region, day, last_before, bits)
        if day < known.first_day:  # "first" is by occurrence: a late report can predate the first one received
            known.first_day, known.first_region = day, region
        spread = self._spread(sighting, known)
        if spread is not None and emit:
            alerts.append(spread)
        return alerts

    def _neighbours(self, s: Sighting) -> list[Neighbour]:
        """The sighting's nearest catalogue structures: by its SMILES, or by the catalogue's structure for a
        name-only report of a catalogued drug (see :meth:`SimilarityIndex.rank_only` for why not learnt ones)."""
        return self.similarity.rank_only(s.key, s.smiles or "", NEIGHBOURS)

    def compared_by_structure(self, s: Sighting) -> bool:
        """Whether a sighting has a structure to compare: its SMILES, or a catalogued drug's (by name)."""
        return bool(s.smiles) or s.key in self.similarity

    def with_learnt(self, alert: Alert, s: Sighting, learnt: Iterable[LearntStructure], as_of: datetime) -> Alert:
        """``alert`` (the new-substance alert ``s`` raised) with its nearest learnt structures as of ``as_of``.

        Pure: the same sighting, stored structures and cut give the same section, whoever computes it and
        whenever (a replay). The catalogue part of the alert is left as :meth:`observe` made it. An alert of
        another type, or a sighting with no structure, is returned as it was.
        """
        if alert.alert_type not in STRUCTURE_ALERTS or not self.compared_by_structure(s):
            return alert
        neighbours = self.similarity.rank_learnt(s.key, s.smiles or "", learnt, NEIGHBOURS)
        section = LearntNeighbours(
            as_of=as_of,
            substances=[
                SimilarSubstance(
                    name=n.name, key=n.key, score=n.score, family=n.family, controlled=None, catalogued=False
                )
                for n in neighbours
            ],
        )
        return alert.model_copy(update={"learnt_substances": section})

    def _chemistry(self, s: Sighting) -> dict[str, Any]:
        """What a chemist asks of a new substance: its nearest known relatives, a family guess, or a spelling."""
        if self.compared_by_structure(s):  # a name-only report of a catalogued drug: its structure
            from synthwatch.stream_apps.detect.similarity import guess_family

            neighbours = self._neighbours(s)
            guess = guess_family(neighbours) if s.family is None else None
            return {
                "similar_substances": [
                    SimilarSubstance(
                        name=n.name,
                        key=n.key,
                        score=n.score,
                        family=n.family,
                        controlled=n.controlled,
                        catalogued=n.catalogued,
                    )
                    for n in neighbours
                ],
                "family_guess": (
                    GuessedFamily(family=guess.family, score=guess.score, nearest=guess.nearest) if guess else None
                ),
            }
        if s.identified_by == "unresolved_name":
            return {"did_you_mean": self.similarity.did_you_mean(s.name)}
        return {}

    def _new_substance(self, s: Sighting) -> Alert:
        subject = sighting_subject(s)
        origin = "a catalogued substance" if s.catalogued else "not in the catalogue"
        # How this report identified it, not whether the catalogue knows a structure: a name-only report of a
        # catalogued drug was identified by its name, and the officer must be able to tell.
        identified = IDENTIFIED_TEXT.get(s.identified_by or "", "identification not recorded")
        details: dict[str, Any] = {"first_region": s.region, "catalogued": s.catalogued}
        named = ""
        if s.formerly is not None:  # its name was reported (and alerted, at info) by name only before
            details.update(self._name_link(s))
            # what backs the link, no more: the name-only samples were never analysed, and the name may have
            # been reported after this structure's first report
            named = (
                f" The name {s.formerly.removeprefix('name:')} ({s.formerly}) was reported by name only"
                f"{f' since {s.formerly_since}' if s.formerly_since else ''} (alerted then for information);"
                " structure-identified reports tie that name to this structure."
            )
        return self._first_alert(
            s,
            "new_substance",
            summary=(
                f"Never seen by the network: {s.name} ({subject.family_text}; {origin}; {identified}), "
                f"first reported in {region_label(s.region)} by a {s.kind.replace('_', ' ')}"
                f"{f' ({s.reporter})' if s.reporter else ''}.{named}"
            ),
            details=details,
            **self._chemistry(s),
        )

    @staticmethod
    def _name_link(s: Sighting) -> dict[str, Any]:
        """The name a structure report tied to its substance: key, regions and first day of its name-only reports."""
        return {
            "name_key": s.formerly,
            "name": (s.formerly or "").removeprefix("name:"),
            "name_regions": sorted(s.formerly_regions or ()),
            **({"name_first_day": s.formerly_since} if s.formerly_since else {}),
        }

    def _identified(self, s: Sighting, known: SubstanceState) -> Alert:
        """A follow-up: a structure report ties a name the network alerted on its own (``s.formerly``, at info) to
        this substance, already known. Its new_substance alert was raised when it was first seen; this tells the
        name's readers what the name was. (A structure new to the network gets its new_substance alert instead,
        with the same link in its details.) The name key's own record stays apart (another partition may hold it).
        """
        subject = sighting_subject(s)
        place = region_label(s.region)
        since = day_start(known.first_day).date()
        return self._first_alert(
            s,
            "identified",
            summary=(
                f"Name identified: {s.formerly}, reported earlier by name only (alerted then, at info, as a name "
                f"nobody could identify), is the known substance {s.name} ({s.key}; {subject.family_text}), known "
                f"to the network since {since} (first in {region_label(known.first_region)}); a "
                f"{s.kind.replace('_', ' ')}"
                f"{f' ({s.reporter})' if s.reporter else ''} in {place} reported it under that name. Not a new "
                f"substance."
            ),
            details={
                **self._name_link(s),
                "structure_new": False,
                "network_first_day": str(since),
                "first_region": known.first_region,
            },
            episode=s.formerly or "",
            **self._chemistry(s),
        )

    def _first_in_region(self, s: Sighting, known: SubstanceState) -> Alert:
        elsewhere = sorted(r for r in known.regions if r != s.region)
        since = day_start(known.first_day).date()
        if s.day < known.first_day:  # a late report older than every report received of the substance
            history = f"it predates the network's first report received ({since}, in {known.first_region})"
        else:
            history = f"known to the network since {since} (first in {known.first_region}"
            history += f"; {len(elsewhere)} other {'region' if len(elsewhere) == 1 else 'regions'})"
        subject = sighting_subject(s)
        return self._first_alert(
            s,
            "first_in_region",
            summary=(f"First report of {s.name} ({subject.family_text}) in {region_label(s.region)}; {history}."),
            details={"other_regions": elsewhere[:20], "network_first_day": str(day_start(known.first_day).date())},
        )

    @staticmethod
    def _first_alert(
        s: Sighting,
        alert_type: AlertType,
        *,
        summary: str,
        details: dict[str, Any],
        episode: str = "first",
        **extra: Any,
    ) -> Alert:
        """A first sighting's alert (a new substance, or a known one in a new region): the day of one report."""
        return build_alert(
            alert_type=alert_type,
            subject=sighting_subject(s),
            country=s.country,
            region=s.region,
            triggered_at=s.occurred_at,
            window_start=day_start(s.day),
            window_end=day_start(s.day + 1),
            episode=episode,
            evidence=[s.event_id],
            summary=summary,
            methods=[s.method] if s.method else [],
            sample_types=[s.sample_type] if s.sample_type else [],
            details=details,
            late_by_hours=s.late_by_hours,
            reported_by=s.reported_by,
            **extra,
        )

    @property
    def day_bits(self) -> int:
        """How many days back from a region's last sighting its day bits reach: the re-send horizon, and at least
        the days a spread test of a late report reads (``2 * spread_days - 1``: every window that holds its day)."""
        return max(self.config.resent_days, 2 * self.config.spread_days - 1)

    def _spread(self, s: Sighting, known: SubstanceState) -> Alert | None:
        """A spread alert if this sighting opens an episode: ``spread_regions`` regions reported the substance within
        ``spread_days`` days of each other, more than ``spread_days`` after the last day such a window held.

        A sighting dated before another region's last sighting (a late report) is tested on every window holding
        its day, each region counted only if a day bit puts a report of it inside the window: a region's span
        [first, last] also covers days it was silent, and counting spans said a late report made a spread of
        regions with no report in its window (or missed one that the late report completed after its own day).
        In order (no region's last day after the sighting's), a region is active exactly when its last day is in
        the window, as the spans say, and the test is the one it always was.
        """
        cfg = self.config
        day, width, needed = s.day, cfg.spread_days, cfg.spread_regions
        if len(known.regions) < needed:
            return None
        since, newest, found = day - width + 1, day, 0
        for span in known.regions.values():
            last = span[1]
            if last > newest:
                newest = last
            elif last >= since:
                found += 1
        if newest == day:
            if found < needed:
                return None
            first_held = last_held = day
        else:
            end = min(day + width - 1, newest)  # the windows holding this day, up to the newest day sighted
            episode = known.spread
            if episode is not None and episode[1] >= end and end >= episode[0] - width:
                return None  # whatever window holds, it is within the episode's known days: nothing to extend
            held = self._held(known, s, end)
            if held is None:
                return None
            first_held, last_held = held
            if episode is not None and last_held < episode[0] - width:
                # Windows more than spread_days before the known episode began: an earlier episode of its own, if
                # the late report made it (none held before, none within spread_days before or after it holds).
                if not self._earlier_episode(known, s, first_held, last_held, end):
                    return None
                return self._spread_alert(s, known, first_held)
        if known.spread is not None and first_held - known.spread[1] <= width:
            known.spread[1] = max(known.spread[1], last_held)  # same episode: condition still holds
            return None
        known.spread = [first_held, last_held]
        return self._spread_alert(s, known, first_held)

    def _spread_alert(self, s: Sighting, known: SubstanceState, day: int) -> Alert:
        """The spread alert of the episode that began on ``day``."""
        cfg = self.config
        since = day - cfg.spread_days + 1
        active = self._active(known, day, s)
        subject = sighting_subject(s)
        return build_alert(
            alert_type="spread",
            subject=subject,
            country=None,
            region=None,
            triggered_at=s.occurred_at,
            window_start=day_start(since),
            window_end=day_start(day + 1),
            episode=day,
            evidence=[s.event_id],
            summary=(
                f"{s.name} ({subject.family_text}) is spreading: reported in {len(active)} regions within "
                f"{cfg.spread_days} days ({', '.join(active[:8])}{'…' if len(active) > 8 else ''})."
            ),
            observed=float(len(active)),
            expected=float(cfg.spread_regions),
            details={"regions": active},
            late_by_hours=s.late_by_hours,
            reported_by=s.reported_by,
        )

    def _held(self, known: SubstanceState, s: Sighting, end: int) -> tuple[int, int] | None:
        """The first and the last day from the late sighting's day to ``end`` on which a report was sighted and the
        ``spread_days`` ending there hold ``spread_regions`` regions; None if no such day.

        Report days only: in day order the test runs on the day of each report, and an episode's last day is the
        last report's day that held. A day between reports whose window still held (one ending up to
        ``spread_days - 1`` days after a report that held) made the episode last longer than in day order, and a
        later spread that day order raised as a new episode continued it instead, unsent."""
        width, needed, bits, day = self.config.spread_days, self.config.spread_regions, self.day_bits, s.day
        rows: list[tuple[bool, int, int, int]] = []
        sighted = 0  # bit i: a report of the day ``end - i``
        for region, span in known.regions.items():
            first, last = span
            if last <= day - width:  # silent in every window holding the day: one comparison, not one per window
                continue
            mask = known.days.get(region, 0) | 1
            rows.append((region == s.region, first, last, mask))
            if last >= day:  # a region last sighted before the day has no report from it to the end
                sighted |= mask << (end - last) if last <= end else mask >> (last - end)
            if day <= first <= end:
                sighted |= 1 << (end - first)
        sighted |= 1 << (end - day)
        held = [x for x in range(day, end + 1) if sighted >> (end - x) & 1]
        first_held = next((x for x in held if self._holds(rows, x, width, needed, bits)), None)
        if first_held is None:
            return None
        last_held = next(x for x in reversed(held) if x == first_held or self._holds(rows, x, width, needed, bits))
        return first_held, last_held

    def _earlier_episode(self, known: SubstanceState, s: Sighting, first: int, last: int, end: int) -> bool:
        """Whether the windows from ``first`` to ``last`` that the late sighting ``s`` makes hold (tested up to
        ``end``) are an episode of their own: none of them held without it (else it was tested when it came to
        hold), no report's window within ``spread_days`` before ``first`` or after ``last`` holds (else they
        continue an episode, alerted or not), and every report those windows read is known (a region whose bits
        no longer reach them could hide one: then it is not raised, as a second alert of an episode would be)."""
        width, needed, bits = self.config.spread_days, self.config.spread_regions, self.day_bits
        low, high = first - 2 * width + 1, last + width
        rows: list[tuple[bool, int, int, int]] = []
        without: list[tuple[bool, int, int, int]] = []  # as before the sighting
        reports: set[int] = set()
        for region, span in known.regions.items():
            head, tail = span
            if tail < low:
                continue
            if head + 1 <= min(tail - bits, high) and tail - bits >= low:
                return False  # days between its first report and what its bits reach, in the windows read
            mask = known.days.get(region, 0) | 1
            rows.append((False, head, tail, mask))
            reports.update(d for d in range(max(low, tail - bits + 1), min(high, tail) + 1) if mask >> (tail - d) & 1)
            if low <= head <= high:
                reports.add(head)
            if region == s.region:
                if 0 <= tail - s.day < bits:
                    mask &= ~(1 << (tail - s.day))
                if head == s.day:  # its first report was this one: none before it in the windows read
                    head = low - 1
            without.append((False, head, tail, mask))
        for x in sorted(reports):
            if first - width <= x < first or end < x <= high:
                if self._holds(rows, x, width, needed, bits):
                    return False
            elif first <= x <= last and self._holds(without, x, width, needed, bits):
                return False
        return True

    @staticmethod
    def _holds(rows: list[tuple[bool, int, int, int]], day: int, width: int, needed: int, bits: int) -> bool:
        """Whether ``needed`` regions of ``rows`` (as :meth:`_held` reads them) have a report in the window ending on
        ``day`` (a window holding the late sighting's day: its own region is one)."""
        since, found = day - width + 1, 0
        for own, first, last, mask in rows:
            if own or reported_between(first, last, mask, since, day, bits):
                found += 1
                if found >= needed:
                    return True
        return False

    def _active(self, known: SubstanceState, day: int, s: Sighting) -> list[str]:
        """The regions (sorted) with a report in the ``spread_days`` ending on ``day``: by their day bits, their first
        day (a report, however far back the bits reach) and the sighting ``s`` itself; a report the bits no longer
        reach that is neither is not counted (an alert names only regions a kept report backs)."""
        width, bits = self.config.spread_days, self.day_bits
        since = day - width + 1
        active = []
        for region, span in known.regions.items():
            # The last day is a report whatever the bits say (a record written before they were kept has none).
            mask = known.days.get(region, 0) | 1
            if (region == s.region and since <= s.day <= day) or reported_between(
                span[0], span[1], mask, since, day, bits
            ):
                active.append(region)
        return sorted(active)
