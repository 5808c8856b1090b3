"""Rebuilding detector state from what ClickHouse holds, for when the broker's changelogs are gone.

The embedded broker keeps everything in memory, so after a restart of ``synthwatch up`` the Faust
tables come back empty while ClickHouse still has every report. The rebuild runs the same detector
core over the stored history with alerts switched off, so that its state is the state of a worker
that saw that history: the alerts it would raise were raised, and stored, the first time, and the
live reports after it must raise the alerts a backtest of history and live together raises (a crash
never changes the alerts).

What each stage keeps, and how it comes back:

- Novelty (per substance): each region's first and last day, the days sighted lately, and the last
  day a spread held. That last one depends on every sighting before it and the order they came in,
  so every sighting is replayed - one per substance, region and day, the region stage's first
  report of that day, in arrival order. Replaying only each region's first and last day made a
  spread episode under way look new, and announced it again.
- Region (per region, and per region x substance / family series): daily counts for the spike
  baselines (``keep_days``), episodes, seizure masses (the last ``mass_memory``, however old) and
  each series' first day. The reports of ``keep_days`` plus :data:`SETTLE_DAYS` before the newest
  are replayed, tested on the last :data:`SETTLE_DAYS` only, so the episodes under way were decided on
  whole baselines (not on the first days of the replay, which lack theirs); each series' first day
  and its older masses are loaded first (a series dated by the window alone was too young to test,
  or learnt its rate over too few days, and mass tests fell back on the family's seizures).

Arrival order is the reports' ``reported_at`` (their occurrence when a source gives none or an earlier one;
a ``reported_at`` in the future puts that one report last, where it may be judged late): the region
stage judges lateness by it, as the live worker did. Rows the worker stored flagged late stay out of the
region replay, as they stayed out of its series; ``ingest-history`` flags none, so the replay finds them.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from synthwatch.schemas.topics import Sighting
from synthwatch.schemas.wire import DEFAULT_LIMITS
from synthwatch.stream_apps.detect.alerting import Subject, day_of, day_start
from synthwatch.stream_apps.detect.identity import NAME_KEY_PREFIX, NAME_LINK_REGIONS, SubstanceResolver, name_key
from synthwatch.stream_apps.detect.novelty import NoveltyDetector
from synthwatch.stream_apps.detect.region import Observation, RegionDetector
from synthwatch.stream_apps.detect.spikes import SeriesState, intern_day
from synthwatch.stream_apps.storage.tables import utc_aware

log = logging.getLogger("synthwatch.stack.worker")

#: The newest days replayed with spike tests: an episode a live report may continue began at most
#: ``max(windows) + renew_after_days`` (14) days back, and the one before it decides whether that one was new.
#: Before them, ``keep_days`` are replayed without tests (what those tests would decide has ended), so that the
#: tested days' baselines are whole. Testing every day costs most of a replay.
SETTLE_DAYS = 28

# Both tables as one stream, with the arrival order the live worker saw: when the report was sent, never before
# it occurred (a source's clock that is wrong the other way would have one row replayed before days of others,
# and make them all late).
_ROWS = """
    SELECT event_id, 'lab_detection' AS kind, occurred_at, greatest(occurred_at, coalesce(reported_at, occurred_at))
           AS arrival, country,
           region, substance_key, resolved_name, resolved_inchikey, family, CAST(NULL AS Nullable(Float64)) AS grams,
           CAST(method AS Nullable(String)) AS method, CAST(sample_type AS Nullable(String)) AS sample_type, late,
           lab_id AS reporter
    FROM lab_detections WHERE __PLAUSIBLE__
    UNION ALL
    SELECT event_id, 'border_seizure', occurred_at, greatest(occurred_at, coalesce(reported_at, occurred_at)),
           country, region,
           substance_key, resolved_name, resolved_inchikey, family, grams, NULL, NULL, late, agency
    FROM border_seizures WHERE __PLAUSIBLE__
"""

_HISTORY = f"""
SELECT event_id, kind, occurred_at, country, region, substance_key, resolved_name, resolved_inchikey, family,
       grams, method, sample_type, reporter
FROM ({_ROWS})
WHERE occurred_at >= %(since)s AND NOT late
ORDER BY arrival, event_id, kind, reporter
"""

# What the region stage forwarded: the first report of each substance, region and day to arrive.
_SIGHTINGS = f"""
SELECT substance_key, region,
       argMin((event_id, kind, occurred_at, country, resolved_name, resolved_inchikey, family), (arrival, event_id))
FROM ({_ROWS})
GROUP BY substance_key, region, toDate(occurred_at)
ORDER BY min((arrival, event_id))
"""

# Every series' first day (a series is dated by its first report, however long ago).
_SERIES = f"""
SELECT region, substance_key, family, min(occurred_at)
FROM ({_ROWS})
WHERE NOT late
GROUP BY region, substance_key, family
"""

# The seizure masses before the replay window, per series, in arrival order (the replay adds the rest).
_MASSES = f"""
SELECT region, {{series}},
       arraySlice(arraySort(groupArray((arrival, event_id, occurred_at, grams))), -%(memory)s)
FROM ({_ROWS})
WHERE kind = 'border_seizure' AND NOT late AND grams > 0 AND occurred_at < %(since)s{{where}}
GROUP BY region, {{series}}
"""

_LEARNT_NAMES = """
SELECT substance_name, any(substance_key) FROM lab_detections
WHERE (substance_smiles IS NOT NULL OR substance_inchikey IS NOT NULL) AND __PLAUSIBLE__
GROUP BY substance_name
"""

# The evidence behind learnt names, in the order it was reported: replayed through the resolver's own rules
# (provisional, corroborated, contested) when it asks for corroboration.
_NAME_EVIDENCE = """
SELECT substance_name, substance_key, reporter, min(occurred_at) AS first_at
FROM (
    SELECT substance_name, substance_key, concat('lab:', lab_id) AS reporter, occurred_at FROM lab_detections
    WHERE (substance_smiles IS NOT NULL OR substance_inchikey IS NOT NULL) AND __PLAUSIBLE__
    UNION ALL
    SELECT substance_name, substance_key, concat('agency:', agency), occurred_at FROM border_seizures
    WHERE (substance_smiles IS NOT NULL OR substance_inchikey IS NOT NULL) AND __PLAUSIBLE__
)
WHERE NOT startsWith(substance_key, 'name:')
GROUP BY substance_name, substance_key, reporter
ORDER BY first_at, substance_name, substance_key, reporter
"""


# Names stored as their own substance (``name:...``: name-only reports nobody could resolve when they came), the
# regions they were reported from and when (first and last report per region, event time).
_NAME_KEYS = """
SELECT substance_key, toString(region), min(occurred_at), max(occurred_at) FROM (
    SELECT substance_key, region, occurred_at FROM lab_detections
    WHERE startsWith(substance_key, 'name:') AND __PLAUSIBLE__
    UNION ALL
    SELECT substance_key, region, occurred_at FROM border_seizures
    WHERE startsWith(substance_key, 'name:') AND __PLAUSIBLE__
)
GROUP BY substance_key, region
ORDER BY substance_key, region
"""

_LATEST = (
    "SELECT greatest((SELECT max(occurred_at) FROM lab_detections WHERE __PLAUSIBLE__),"
    " (SELECT max(occurred_at) FROM border_seizures WHERE __PLAUSIBLE__))"
)


# The family of each structure stored with one (the resolver gives it to name-only reports of a learnt name).
_STRUCTURE_FAMILIES = """
SELECT substance_key, anyIf(toString(family), family != '') FROM (
    SELECT substance_key, family FROM lab_detections WHERE match(substance_key, '^[A-Z]{14}$') AND __PLAUSIBLE__
    UNION ALL
    SELECT substance_key, family FROM border_seizures WHERE match(substance_key, '^[A-Z]{14}$') AND __PLAUSIBLE__
)
GROUP BY substance_key
HAVING countIf(family != '') > 0
ORDER BY substance_key
"""


class _Plausible:
    """A client whose queries read only reports the live intake would take: an event time at most
    ``max_future_hours`` after the report's receipt (``schemas.wire.check_event_time``).

    Rows stored before that bound, or by ``ingest-history``, may lie in the far future: one of them would be the
    resolver's watermark (every remembered name forgotten) and its region's newest report (every later one
    late). Their receipt as stored: ``ingested_at`` (the live worker stores a report after its Kafka timestamp,
    so every row it took passes). Such rows stay stored; the state leaves them out.
    """

    def __init__(self, client: Any, max_future_hours: float) -> None:
        self.client, self.max_future_hours = client, max_future_hours
        milliseconds = int(max_future_hours * 3_600_000)  # a number from the settings: no text reaches the SQL
        self.condition = f"(occurred_at <= ingested_at + toIntervalMillisecond({milliseconds}))"

    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> Any:
        sql = sql.replace("__PLAUSIBLE__", self.condition)
        return self.client.query(sql) if parameters is None else self.client.query(sql, parameters=parameters)


def _plausible(client: Any, max_future_hours: float) -> Any:
    return client if isinstance(client, _Plausible) else _Plausible(client, max_future_hours)


_LEFT_OUT = """
SELECT (SELECT count() FROM lab_detections WHERE NOT __PLAUSIBLE__),
       (SELECT count() FROM border_seizures WHERE NOT __PLAUSIBLE__),
       (SELECT groupArray(10)(event_id) FROM (
            SELECT event_id FROM lab_detections WHERE NOT __PLAUSIBLE__
            UNION ALL SELECT event_id FROM border_seizures WHERE NOT __PLAUSIBLE__ ORDER BY event_id LIMIT 10))
"""


def _left_out(client: _Plausible) -> int:
    """How many stored reports the state leaves out, said in the log with some of their ids (why: they are stored,
    so every count of the tables holds them, but no detector sees them; an operator must be able to tell)."""
    labs, seizures, some = client.query(_LEFT_OUT).result_rows[0]
    count = int(labs) + int(seizures)
    if count:
        log.warning(
            "%d stored reports are left out of the detector state: their event time is more than %g h after they "
            "were stored (SYNTHWATCH_MAX_FUTURE_HOURS; stored before that bound existed). They stay in "
            "lab_detections/border_seizures; their senders correct them with a new event_id and `corrects` naming "
            "the old one (docs/detection.md, Corrections). Some of them: %s",
            count,
            client.max_future_hours,
            ", ".join(str(i)[:80].encode("unicode_escape").decode() for i in some),
        )
    return count


@dataclass
class RebuildReport:
    substances: int
    events_replayed: int
    names_learnt: int
    seconds: float
    sightings_replayed: int = 0
    series: int = 0
    #: Stored reports left out of the state: event time past the bound (see :class:`_Plausible`).
    future_left_out: int = 0


def _subject(key: str, name: str, inchikey: str | None, family: str) -> Subject:
    return Subject(key, name, inchikey, family or None, None, False)


def rebuild(
    client: Any,
    regions: RegionDetector,
    novelty: NoveltyDetector,
    resolver: SubstanceResolver,
    reporter_of: Callable[[str], str] | None = None,
    max_future_hours: float = DEFAULT_LIMITS.max_future_hours,
) -> RebuildReport:
    """Fill empty detectors from ClickHouse (blocking: run it in an executor thread); reports with an event time
    more than ``max_future_hours`` after their receipt are left out, as the live intake refuses them."""
    started = time.perf_counter()
    client = _plausible(client, max_future_hours)
    substances: set[str] = set()
    sightings = 0
    for key, region, first in client.query(_SIGHTINGS).result_rows:
        event_id, kind, occurred_at, country, name, inchikey, family = first
        moment = utc_aware(occurred_at)
        novelty.observe(
            Sighting(
                event_id,
                kind,
                moment,
                day_of(moment),
                country,
                region,
                key,
                name,
                inchikey,
                family or None,
                None,
                False,
            ),
            emit=False,
        )
        substances.add(key)
        sightings += 1
    latest = client.query(_LATEST).result_rows[0][0]
    replayed = 0
    if latest is not None and latest.year > 1970:
        tested_from = day_of(utc_aware(latest)) - SETTLE_DAYS
        since = day_start(tested_from - regions.model.keep_days)
        _seed_series(client, regions, since)
        for row in client.query(_HISTORY, parameters={"since": since}).result_rows:
            event_id, kind, occurred_at, country, region, key, name, inchikey, family, grams, method, sample, by = row
            moment = utc_aware(occurred_at)
            day = intern_day(day_of(moment))
            regions.observe(
                Observation(
                    event_id,
                    kind,
                    moment,
                    day,
                    country,
                    region,
                    _subject(key, name, inchikey, family),
                    grams,
                    method,
                    sample,
                    by,  # the region's recent ids are (reporter, event id), as the live stage noted them
                ),
                emit=False,
                test=day >= tested_from,
            )
            replayed += 1
    learnt = learn_names(client, resolver, reporter_of)
    _identified_names(client, novelty, resolver, reporter_of)
    seconds = time.perf_counter() - started
    left_out = _left_out(client)
    return RebuildReport(len(substances), replayed, learnt, seconds, sightings, len(regions.series), left_out)


def _seed_series(client: Any, regions: RegionDetector, since: datetime) -> None:
    """Create every series the history holds, dated by its first report, with its masses from before ``since``.

    The live detector keeps a series once it has one report, with its first day and its last seizure masses
    whatever their age; the replay window alone would date it by its first report in the window.
    """
    firsts: dict[str, int] = {}
    region_firsts: dict[str, int] = {}
    for region, key, family, first in client.query(_SERIES).result_rows:
        day = day_of(utc_aware(first))
        names = [f"{region}|{key}"] + ([f"{region}|family:{family}"] if family else [])
        for name in names:
            if name not in firsts or day < firsts[name]:
                firsts[name] = day
        if region not in region_firsts or day < region_firsts[region]:
            region_firsts[region] = day
    for name, day in firsts.items():
        regions.series[name] = SeriesState(first_day=intern_day(day))
        regions.dirty_series.add(name)
    for region, day in region_firsts.items():
        regions.region_state(region).first_day = intern_day(day)
        regions.dirty_regions.add(region)
    memory = regions.model.config.mass_memory
    for series, where, prefix in (("substance_key", "", ""), ("family", " AND family != ''", "family:")):
        query = _MASSES.format(series=series, where=where)
        for region, key, masses in client.query(query, parameters={"since": since, "memory": memory}).result_rows:
            state = regions.series.get(f"{region}|{prefix}{key}")
            if state is None:  # a series of late reports only
                continue
            state.mass_days = [intern_day(day_of(utc_aware(occurred_at))) for _, _, occurred_at, _ in masses]
            state.mass_values = [math.log(grams) for _, _, _, grams in masses]


def _stored_names(client: Any) -> dict[str, list[tuple[str, datetime, datetime]]]:
    """Stored ``name:...`` keys -> (region, first, last report there), in key and region order."""
    stored: dict[str, list[tuple[str, datetime, datetime]]] = {}
    for stored_key, region, first, last in client.query(_NAME_KEYS).result_rows:
        stored.setdefault(str(stored_key), []).append((str(region), utc_aware(first), utc_aware(last)))
    return stored


def _settled_at(
    client: Any, resolver: SubstanceResolver, reporter_of: Callable[[str], str] | None
) -> dict[str, datetime]:
    """Settled learnt name -> event time of the report that settled it (the ``corroboration``-th reporter of its
    structure, in the order :func:`_learn_names` replays them): the time a live link is bounded by."""
    settled = resolver.settled_names()
    counted: dict[str, set[str]] = {}
    at: dict[str, datetime] = {}
    for name, key, reporter, first in client.query(_NAME_EVIDENCE).result_rows:
        normalised = name_key(str(name))
        if settled.get(normalised) != key or normalised in at:
            continue
        reporters = counted.setdefault(normalised, set())
        reporters.add(reporter_of(reporter) if reporter_of else reporter)
        if len(reporters) >= resolver.corroboration:
            at[normalised] = utc_aware(first)
    return at


def _identified_names(
    client: Any,
    novelty: NoveltyDetector,
    resolver: SubstanceResolver,
    reporter_of: Callable[[str], str] | None = None,
) -> None:
    """The name keys a structure report tied to each substance (``SubstanceState.names``): a *settled* learnt name
    (never a provisional or contested one) also stored as its own ``name:...`` key, whose last name-only report
    is within the resolver's horizon of the report that settled it, as the live resolver decides (``links``)."""
    stored = _stored_names(client)
    if not stored:
        return
    settled_at = _settled_at(client, resolver, reporter_of)
    for name, key in sorted(resolver.settled_names().items()):
        known = novelty.state.get(key)
        spans = stored.get(NAME_KEY_PREFIX + name)
        if known is None or spans is None or NAME_KEY_PREFIX + name in known.names:
            continue
        last = max(span[2] for span in spans)
        at = settled_at.get(name)
        if at is not None and last < at - resolver.name_horizon:
            continue
        known.add_name(NAME_KEY_PREFIX + name, [region for region, _, _ in spans][:NAME_LINK_REGIONS])
        novelty.dirty.add(key)


def learn_names(
    client: Any,
    resolver: SubstanceResolver,
    reporter_of: Callable[[str], str] | None = None,
    max_future_hours: float = DEFAULT_LIMITS.max_future_hours,
) -> int:
    """Teach the resolver every name stored beside a structure; returns how many it learnt.

    Learnt names live in the worker's memory, not in the detector tables: a restarted worker whose
    tables came back from their changelogs must still learn them, or a name-only report of a substance
    it knew by structure becomes a "new substance" of its own. A resolver that asks for corroboration
    replays who reported each name (``reporter_of`` maps a stored ``lab:ID``/``agency:NAME`` to the
    reporter the live intake would have counted, e.g. the lab's organisation). Then the names stored as their
    own key and still unlearnt: the first structure report of one says so (an ``identified`` alert). And each
    structure's family: a name-only report of a learnt name gets it, as it did before the restart. Reports past
    the event-time bound are left out (:class:`_Plausible`), as the live intake refuses them.
    """
    client = _plausible(client, max_future_hours)
    learnt = _learn_names(client, resolver, reporter_of)
    latest = client.query(_LATEST).result_rows[0][0]
    if latest is not None and latest.year > 1970:
        resolver.note_time(utc_aware(latest))
        cut = resolver.unresolved_cut(utc_aware(latest))
        for key, spans in _stored_names(client).items():
            if max(last for _, _, last in spans) >= cut:  # as the live resolver keeps them (_prune)
                for region, first, last in spans:
                    resolver.note_unresolved(key, region, first, last)
    for key, family in client.query(_STRUCTURE_FAMILIES).result_rows:
        resolver.note_family(str(key), family)
    return learnt


def _learn_names(client: Any, resolver: SubstanceResolver, reporter_of: Callable[[str], str] | None = None) -> int:
    """:func:`learn_names` without the unresolved names."""
    if resolver.corroboration > 1:
        before = len(resolver.learnt_names())
        for name, key, reporter, _first in client.query(_NAME_EVIDENCE).result_rows:
            try:
                resolver.observe_name(name, key, reporter_of(reporter) if reporter_of else reporter)
            except ValueError:  # a name the resolver refuses to learn must not stop the worker
                continue
        return len(resolver.learnt_names()) - before
    learnt = 0
    for name, key in client.query(_LEARNT_NAMES).result_rows:
        if key.startswith("name:"):  # its structure was unusable: nothing to learn from it
            continue
        try:
            learnt += bool(resolver.learn(name, key))
        except ValueError:  # a name the resolver refuses to learn must not stop the worker
            continue
    return learnt
