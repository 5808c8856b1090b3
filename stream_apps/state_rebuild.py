"""Rebuilding detector state from what ClickHouse holds, for when the broker's changelogs are gone.

The embedded broker keeps everything in memory, so after a restart of ``synthwatch up`` the Faust
tables come back empty while ClickHouse still has every report. The rebuild runs the same detector
core over the stored history with alerts switched off, so its state is exactly what it would have
been (the alerts it would raise were raised, and stored, the first time). Rows stored late are left
out of the region replay, as the live detector left them out of its spike series.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, timedelta
from typing import Any

from .alerting import Subject, day_of
from .detection import Observation, RegionDetector
from .identity import SubstanceResolver
from .novelty import NoveltyDetector, Sighting
from .spikes import intern_day

_HISTORY = """
SELECT event_id, kind, occurred_at, country, region, substance_key, resolved_name, resolved_inchikey, family,
       grams, method, sample_type
FROM (
    SELECT event_id, 'lab_detection' AS kind, occurred_at, country, region, substance_key, resolved_name,
           resolved_inchikey, family, CAST(NULL AS Nullable(Float64)) AS grams,
           CAST(method AS Nullable(String)) AS method, CAST(sample_type AS Nullable(String)) AS sample_type
    FROM lab_detections WHERE occurred_at >= %(since)s AND NOT late
    UNION ALL
    SELECT event_id, 'border_seizure', occurred_at, country, region, substance_key, resolved_name,
           resolved_inchikey, family, grams, NULL, NULL
    FROM border_seizures WHERE occurred_at >= %(since)s AND NOT late
)
ORDER BY occurred_at, event_id
"""

_FIRST_SEEN = """
SELECT substance_key, region, any(country), argMin(event_id, occurred_at), argMin(kind, occurred_at),
       min(occurred_at), max(occurred_at), any(resolved_name), any(resolved_inchikey), any(family)
FROM (
    SELECT substance_key, region, country, event_id, 'lab_detection' AS kind, occurred_at, resolved_name,
           resolved_inchikey, family FROM lab_detections
    UNION ALL
    SELECT substance_key, region, country, event_id, 'border_seizure', occurred_at, resolved_name,
           resolved_inchikey, family FROM border_seizures
)
GROUP BY substance_key, region
ORDER BY min(occurred_at)
"""

_LEARNT_NAMES = """
SELECT substance_name, any(substance_key) FROM lab_detections
WHERE substance_smiles IS NOT NULL OR substance_inchikey IS NOT NULL
GROUP BY substance_name
"""

# The evidence behind learnt names, in the order it was reported: replayed through the resolver's own rules
# (provisional, corroborated, contested) when it asks for corroboration.
_NAME_EVIDENCE = """
SELECT substance_name, substance_key, reporter, min(occurred_at) AS first_at
FROM (
    SELECT substance_name, substance_key, concat('lab:', lab_id) AS reporter, occurred_at FROM lab_detections
    WHERE substance_smiles IS NOT NULL OR substance_inchikey IS NOT NULL
    UNION ALL
    SELECT substance_name, substance_key, concat('agency:', agency), occurred_at FROM border_seizures
    WHERE substance_smiles IS NOT NULL OR substance_inchikey IS NOT NULL
)
WHERE NOT startsWith(substance_key, 'name:')
GROUP BY substance_name, substance_key, reporter
ORDER BY first_at, substance_name, substance_key, reporter
"""


@dataclass
class RebuildReport:
    substances: int
    events_replayed: int
    names_learnt: int
    seconds: float


def _subject(key: str, name: str, inchikey: str | None, family: str) -> Subject:
    return Subject(key, name, inchikey, family or None, None, False)


def rebuild(
    client: Any,
    regions: RegionDetector,
    novelty: NoveltyDetector,
    resolver: SubstanceResolver,
    reporter_of: Callable[[str], str] | None = None,
) -> RebuildReport:
    """Fill empty detectors from ClickHouse (blocking: run it in an executor thread)."""
    started = time.perf_counter()
    substances: set[str] = set()
    for row in client.query(_FIRST_SEEN).result_rows:
        key, region, country, event_id, kind, first, last, name, inchikey, family = row
        first, last = first.replace(tzinfo=UTC), last.replace(tzinfo=UTC)
        subject = _subject(key, name, inchikey, family)
        for moment in (first, last):
            novelty.observe(
                Sighting(
                    event_id,
                    kind,
                    moment,
                    day_of(moment),
                    country,
                    region,
                    key,
                    subject.name,
                    inchikey,
                    subject.family,
                    None,
                    False,
                ),
                emit=False,
            )
        substances.add(key)
    keep_days = regions.model.keep_days
    latest = client.query(
        "SELECT greatest((SELECT max(occurred_at) FROM lab_detections), (SELECT max(occurred_at) FROM border_seizures))"
    ).result_rows[0][0]
    replayed = 0
    if latest is not None and latest.year > 1970:
        since = latest.replace(tzinfo=UTC) - timedelta(days=keep_days)
        for row in client.query(_HISTORY, parameters={"since": since}).result_rows:
            event_id, kind, occurred_at, country, region, key, name, inchikey, family, grams, method, sample = row
            moment = occurred_at.replace(tzinfo=UTC)
            regions.observe(
                Observation(
                    event_id,
                    kind,
                    moment,
                    intern_day(day_of(moment)),
                    country,
                    region,
                    _subject(key, name, inchikey, family),
                    grams,
                    method,
                    sample,
                ),
                emit=False,
            )
            replayed += 1
    learnt = learn_names(client, resolver, reporter_of)
    return RebuildReport(len(substances), replayed, learnt, time.perf_counter() - started)


def learn_names(client: Any, resolver: SubstanceResolver, reporter_of: Callable[[str], str] | None = None) -> int:
    """Teach the resolver every name stored beside a structure; returns how many it learnt.

    Learnt names live in the worker's memory, not in the detector tables: a restarted worker whose
    tables came back from their changelogs must still learn them, or a name-only report of a substance
    it knew by structure becomes a "new substance" of its own. A resolver that asks for corroboration
    replays who reported each name (``reporter_of`` maps a stored ``lab:ID``/``agency:NAME`` to the
    reporter the live intake would have counted, e.g. the lab's organisation).
    """
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
