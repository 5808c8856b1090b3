"""Typed read queries for the CLI, the dashboards' tests and the report, wherever the engine lives.

Every function goes through :func:`synthwatch.stream_apps.storage.query.run_query`, so it works on a server,
on an embedded
engine nobody holds, and on one a running ``synthwatch up`` owns (over its ``/sql`` endpoint). Counts
come from the aggregate tables (thousands of rows for years of reports), never from the raw tables, and
no query uses FINAL: the writers store each event and alert once, so plain ``sum() ... GROUP BY`` is exact.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from synthwatch.settings import Settings
from synthwatch.stream_apps.storage.query import run_query
from synthwatch.stream_apps.storage.tables import utc_aware

_SINCE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_INCHIKEY = re.compile(r"^([A-Z]{14})(?:-[A-Z]{10}-[A-Z])?$")
SEVERITIES = ("info", "warning", "critical")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def parse_since(text: str) -> timedelta:
    """``7d``, ``12h``, ``30m``, ``2w`` (or ``90s``) as a timedelta; ValueError with an example otherwise."""
    match = _SINCE.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a duration; use a number and a unit: 30m, 12h, 7d, 2w")
    return timedelta(seconds=float(match.group(1)) * _UNIT_SECONDS[match.group(2).lower()])


def _dt(value: Any) -> datetime | None:
    """A ClickHouse DateTime (ISO text from run_query, naive UTC) as an aware datetime."""
    if value is None:
        return None
    parsed = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return utc_aware(parsed)


def _day(value: Any) -> date:
    return value if isinstance(value, date) else date.fromisoformat(str(value)[:10])


# --- alerts ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AlertRow:
    alert_id: str
    alert_type: str
    severity: str
    country: str
    region: str
    substance_key: str
    substance_name: str
    family: str
    triggered_at: datetime
    detected_at: datetime
    observed: float | None
    expected: float | None
    score: float | None
    evidence: int
    summary: str


def _alert_row(r: dict[str, Any]) -> AlertRow:
    return AlertRow(
        alert_id=r["alert_id"],
        alert_type=r["alert_type"],
        severity=r["severity"],
        country=r["country"],
        region=r["region"],
        substance_key=r["substance_key"],
        substance_name=r["substance_name"],
        family=r["family"],
        triggered_at=_dt(r["triggered_at"]) or _EPOCH,
        detected_at=_dt(r["detected_at"]) or _EPOCH,
        observed=r["observed"],
        expected=r["expected"],
        score=r["score"],
        evidence=int(r["evidence"]),
        summary=r["summary"],
    )


_ALERTS = """
SELECT alert_id, alert_type, severity, country, region, substance_key, substance_name, family, triggered_at,
       detected_at, observed, expected, score, length(evidence_event_ids) AS evidence, summary
FROM alerts
WHERE {column} >= now64(3) - toIntervalSecond(%(seconds)s)
  AND (%(region)s = '' OR region = %(region)s)
  AND (%(severity)s = '' OR severity = %(severity)s)
ORDER BY {column} DESC, alert_id
LIMIT 1 BY alert_id
LIMIT %(limit)s
"""

#: What ``--since`` counts back from: when synthwatch raised the alert (the default: what an analyst asking
#: "what came in lately" means, a late report's alert included), or the event time of the report that
#: raised it (when the sample was taken or the seizure made).
ALERT_TIMES: dict[str, str] = {"detected": "detected_at", "triggered": "triggered_at"}


def recent_alerts(
    settings: Settings,
    region: str | None = None,
    since: timedelta = timedelta(days=7),
    severity: str | None = None,
    limit: int = 100,
    time: str = "detected",
) -> list[AlertRow]:
    """Alerts whose ``time`` (detected: raised by synthwatch; triggered: the raising report's event time) is
    within ``since`` of now, newest first by it (``LIMIT 1 BY alert_id``: cheap, alerts are few)."""
    if severity is not None and severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {', '.join(SEVERITIES)}, got {severity!r}")
    if time not in ALERT_TIMES:
        raise ValueError(f"time must be one of {', '.join(ALERT_TIMES)}, got {time!r}")
    result = run_query(
        settings,
        _ALERTS.format(column=ALERT_TIMES[time]),
        {
            "seconds": int(since.total_seconds()),
            "region": (region or "").upper(),
            "severity": severity or "",
            "limit": int(limit),
        },
    )
    return [_alert_row(r) for r in result.as_dicts()]


# --- stats -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StatsRow:
    """One region x substance over the window; first/last seen are all-time for that region."""

    country: str
    region: str
    substance_key: str
    substance_name: str
    family: str
    reports: int
    lab_detections: int
    border_seizures: int
    grams: float
    first_seen: datetime | None
    last_seen: datetime | None


_STATS = """
SELECT d.country AS country, d.region AS region, d.substance_key AS substance_key,
       d.substance_name AS substance_name, d.family AS family, d.n AS reports, d.labs AS labs,
       d.seizures AS seizures, d.g AS grams, s.first_seen AS first_seen, s.last_seen AS last_seen
FROM (
    SELECT country, region, substance_key, any(substance_name) AS substance_name, any(family) AS family,
           sum(reports) AS n, sumIf(reports, kind = 'lab_detection') AS labs,
           sumIf(reports, kind = 'border_seizure') AS seizures, sum(grams) AS g
    FROM reports_daily
    WHERE day > today() - %(days)s AND (%(region)s = '' OR region = %(region)s)
    GROUP BY country, region, substance_key
    HAVING n != 0  -- a substance whose reports were all corrected away (migration 0012: retractions)
) AS d
LEFT JOIN (
    SELECT substance_key, country, region, min(first_seen) AS first_seen, max(last_seen) AS last_seen
    FROM substance_region_first_seen
    WHERE %(region)s = '' OR region = %(region)s
    GROUP BY substance_key, country, region
) AS s ON s.substance_key = d.substance_key AND s.country = d.country AND s.region = d.region
ORDER BY reports DESC, region, substance_key
"""


def stats(settings: Settings, days: int = 30, region: str | None = None) -> list[StatsRow]:
    """Reports and grams per region and substance over the last ``days`` days (today included)."""
    if days < 1:
        raise ValueError("days must be at least 1")
    result = run_query(settings, _STATS, {"days": int(days), "region": (region or "").upper()})
    return [
        StatsRow(
            country=r["country"],
            region=r["region"],
            substance_key=r["substance_key"],
            substance_name=r["substance_name"],
            family=r["family"],
            reports=int(r["reports"]),
            lab_detections=int(r["labs"]),
            border_seizures=int(r["seizures"]),
            grams=float(r["grams"]),
            first_seen=_dt(r["first_seen"]),
            last_seen=_dt(r["last_seen"]),
        )
        for r in result.as_dicts()
    ]


# --- one substance ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RegionHistory:
    country: str
    region: str
    first_seen: datetime
    last_seen: datetime
    reports: int


@dataclass(frozen=True, slots=True)
class MonthCount:
    month: date
    reports: int
    lab_detections: int
    border_seizures: int
    grams: float


@dataclass(frozen=True, slots=True)
class SimilarRow:
    """A known substance structurally close to the one asked about (Tanimoto of Morgan fingerprints)."""

    name: str
    substance_key: str
    score: float
    family: str
    controlled: bool | None
    catalogued: bool  # False: a structure learnt from stored reports


@dataclass(frozen=True, slots=True)
class SubstanceHistory:
    """Everything stored about one substance key: when and where it appeared, how often, what was raised."""

    query: str
    substance_key: str
    substance_name: str
    family: str
    resolved_by: str
    first_seen: datetime
    last_seen: datetime
    reports: int
    regions: list[RegionHistory] = field(default_factory=list)
    months: list[MonthCount] = field(default_factory=list)
    alerts: list[AlertRow] = field(default_factory=list)
    similar: list[SimilarRow] = field(default_factory=list)
    family_guess: str | None = None  # for a structure no SMARTS pattern classified: a guess, never a class


_LEARNT_NAMES = """
SELECT substance_name, any(substance_key) AS key, any(family) AS family FROM lab_detections
WHERE (substance_smiles IS NOT NULL OR substance_inchikey IS NOT NULL) AND match(substance_key, '^[A-Z]{14}$')
GROUP BY substance_name
"""


def resolve_substance_key(settings: Settings, name_or_inchikey: str) -> tuple[str, str]:
    """(substance key, how): an InChIKey or its first block is the key; a name goes through the resolver.

    The resolver knows the catalogue and, like the worker after a restart, the names learnt from stored
    lab reports with a structure, so a street name first reported next to a SMILES finds that structure.
    """
    from synthwatch.stream_apps.detect.identity import SubstanceResolver

    text = name_or_inchikey.strip()
    match = _INCHIKEY.match(text.upper())
    if match is not None:
        return match.group(1), "inchikey"
    resolver = SubstanceResolver()
    for row in run_query(settings, _LEARNT_NAMES).rows:
        resolver.learn(str(row[0]), str(row[1]), row[2] or None)
    resolved = resolver.resolve(text)
    return resolved.key, resolved.resolved_by


_STORED_NAMES = "SELECT DISTINCT substance_name FROM substance_first_seen"


def similar_substance_names(settings: Settings, text: str, limit: int = 5) -> list[str]:
    """Names close to ``text`` for a "did you mean": catalogue names and synonyms, and names stored in reports.

    Why: ``synthwatch substance Eto`` must lead somewhere. Names that start with what was typed come
    first (difflib alone rates "Eto" far from "Etonitazene"), then difflib's close matches; spelling,
    case and accents are folded as the resolver folds them.
    """
    import difflib

    from synthwatch.catalogue import shipped_catalogue
    from synthwatch.stream_apps.detect.identity import normalise_name

    names: dict[str, str] = {}  # folded name or synonym -> the name to show
    for entry in shipped_catalogue():
        for name in (entry.name, *entry.synonyms):
            names.setdefault(normalise_name(name), entry.name)
    for row in run_query(settings, _STORED_NAMES).rows:
        if row[0]:
            names.setdefault(normalise_name(str(row[0])), str(row[0]))
    names.pop("", None)
    wanted = normalise_name(text)
    if not wanted:
        return []
    prefixed = sorted((folded for folded in names if folded.startswith(wanted)), key=lambda f: (len(f), f))
    close = difflib.get_close_matches(wanted, list(names), n=limit, cutoff=0.6)
    found = list(dict.fromkeys([*prefixed, *close]))[: limit * 2]
    return list(dict.fromkeys(names[folded] for folded in found))[:limit]


# Every structure the network learnt from stored reports: one spelling per structure key is enough.
_LEARNT_STRUCTURES = """
SELECT substance_key, any(substance_name) AS name, any(family) AS family, any(substance_smiles) AS smiles
FROM (
    SELECT substance_key, substance_name, family, substance_smiles FROM lab_detections
    WHERE substance_smiles IS NOT NULL AND match(substance_key, '^[A-Z]{14}$')
    UNION ALL
    SELECT substance_key, substance_name, family, substance_smiles FROM border_seizures
    WHERE substance_smiles IS NOT NULL AND match(substance_key, '^[A-Z]{14}$')
)
GROUP BY substance_key
ORDER BY substance_key
"""


def similar_substances(settings: Settings, key: str, k: int = 5) -> tuple[list[SimilarRow], str | None]:
    """The known substances nearest to ``key`` (catalogue and learnt structures) and, when the structure has no
    family, the guessed one: what the new-substance alert told the officers, for an analyst asking later."""
    from synthwatch.stream_apps.detect.similarity import SimilarityIndex, guess_family

    index = SimilarityIndex()
    own: tuple[str, str | None] | None = None
    for row_key, name, family, smiles in run_query(settings, _LEARNT_STRUCTURES).rows:
        index.add(str(row_key), str(smiles), str(name), family or None)
        if row_key == key:
            own = (str(name), family or None)
    if key not in index:
        return [], None
    name, family = own or (key, None)
    neighbours = index.learn_and_rank(key, "", name, None, None, k)
    guess = guess_family(neighbours) if family is None and own is not None else None  # learnt, unclassified
    rows = [SimilarRow(n.name, n.key, n.score, n.family or "", n.controlled, n.catalogued) for n in neighbours]
    return rows, guess.family if guess is not None else None


def substance_history(settings: Settings, name_or_inchikey: str) -> SubstanceHistory | None:
    """First seen, regions (first/last seen, reports), monthly counts and alerts; None when never reported."""
    key, how = resolve_substance_key(settings, name_or_inchikey)
    params = {"key": key}
    overall = run_query(
        settings,
        "SELECT any(substance_name) AS name, any(family) AS family, min(first_seen) AS first_seen, "
        "max(last_seen) AS last_seen, sum(reports) AS reports FROM substance_first_seen "
        "WHERE substance_key = %(key)s HAVING count() > 0",
        params,
    ).as_dicts()
    if not overall:
        return None
    head = overall[0]
    regions = run_query(
        settings,
        "SELECT country, region, min(first_seen) AS first_seen, max(last_seen) AS last_seen, sum(reports) AS reports "
        "FROM substance_region_first_seen WHERE substance_key = %(key)s GROUP BY country, region "
        "ORDER BY first_seen, region",
        params,
    ).as_dicts()
    months = run_query(
        settings,
        "SELECT toStartOfMonth(day) AS month, sum(reports) AS n, sumIf(reports, kind = 'lab_detection') AS labs, "
        "sumIf(reports, kind = 'border_seizure') AS seizures, sum(grams) AS g FROM reports_daily "
        "WHERE substance_key = %(key)s GROUP BY month ORDER BY month",
        params,
    ).as_dicts()
    alerts = run_query(
        settings,
        "SELECT alert_id, alert_type, severity, country, region, substance_key, substance_name, family, triggered_at, "
        "detected_at, observed, expected, score, length(evidence_event_ids) AS evidence, summary FROM alerts "
        "WHERE substance_key = %(key)s ORDER BY triggered_at, alert_id LIMIT 1 BY alert_id",
        params,
    ).as_dicts()
    similar, guess = similar_substances(settings, key)
    return SubstanceHistory(
        query=name_or_inchikey,
        substance_key=key,
        substance_name=head["name"],
        family=head["family"],
        resolved_by=how,
        first_seen=_dt(head["first_seen"]) or _EPOCH,
        last_seen=_dt(head["last_seen"]) or _EPOCH,
        reports=int(head["reports"]),
        regions=[
            RegionHistory(
                r["country"],
                r["region"],
                _dt(r["first_seen"]) or _EPOCH,
                _dt(r["last_seen"]) or _EPOCH,
                int(r["reports"]),
            )
            for r in regions
        ],
        months=[
            MonthCount(_day(m["month"]), int(m["n"]), int(m["labs"]), int(m["seizures"]), float(m["g"])) for m in months
        ],
        alerts=[_alert_row(a) for a in alerts],
        similar=similar,
        family_guess=guess,
    )


# --- rejects -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RejectRow:
    rejected_at: datetime
    stage: str
    source: str
    reason: str
    event_id: str | None
    reporter: str  # the lab_id or agency the refused record named ('' when it named none or was unreadable)


_REJECTS = """
SELECT rejected_at, stage, source, reason, event_id,
       if(JSONExtractString(raw, 'lab_id') != '', JSONExtractString(raw, 'lab_id'),
          JSONExtractString(raw, 'agency')) AS reporter
FROM rejects
WHERE rejected_at >= now64(3) - toIntervalSecond(%(seconds)s)
  AND (%(lab)s = '' OR JSONExtractString(raw, 'lab_id') = %(lab)s OR JSONExtractString(raw, 'agency') = %(lab)s)
ORDER BY rejected_at DESC, source
LIMIT 1 BY reject_id
LIMIT %(limit)s
"""


def recent_rejects(
    settings: Settings, since: timedelta = timedelta(days=7), lab: str | None = None, limit: int = 200
) -> list[RejectRow]:
    """Records refused within ``since`` of now, newest first, so a lab can fix and re-send them.

    ``lab`` keeps the rejects whose record names that ``lab_id`` (or customs ``agency``); a record too
    broken to read (not JSON) names nobody and is listed only without ``lab``.
    """
    result = run_query(
        settings,
        _REJECTS,
        {"seconds": int(since.total_seconds()), "lab": (lab or "").strip(), "limit": int(limit)},
    )
    return [
        RejectRow(
            rejected_at=_dt(r["rejected_at"]) or _EPOCH,
            stage=r["stage"],
            source=r["source"],
            reason=r["reason"],
            event_id=r["event_id"],
            reporter=r["reporter"],
        )
        for r in result.as_dicts()
    ]


# --- corrections ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CorrectionRow:
    """A corrected report and the report that corrects it (``corrects`` column, migration 0011)."""

    corrected: str  # the event id of the report that was corrected (it stays stored, marked corrected)
    corrected_by: str  # the event id of the correction
    kind: str
    reporter: str  # lab_id or agency
    old_substance: str
    new_substance: str
    old_quantity: str  # '' for lab detections
    new_quantity: str
    occurred_at: datetime
    superseded: bool  # the correction itself was corrected since (a chain)


# Event ids are unique per reporter only: a correction and the report it corrects share a reporter (the
# worker refuses any other), so the join and the chain are by (reporter, id).
_CORRECTIONS = """
SELECT corrected, corrected_by, kind, reporter, old_substance, new_substance, old_quantity, new_quantity,
       occurred_at,
       (kind, reporter, corrected_by) IN (
           SELECT 'lab_detection', lab_id, corrects FROM lab_detections WHERE corrects != ''
           UNION ALL SELECT 'border_seizure', agency, corrects FROM border_seizures WHERE corrects != ''
       ) AS superseded
FROM (
    SELECT n.corrects AS corrected, n.event_id AS corrected_by, 'lab_detection' AS kind, n.lab_id AS reporter,
           o.substance_name AS old_substance, n.substance_name AS new_substance, '' AS old_quantity,
           '' AS new_quantity, n.occurred_at AS occurred_at
    FROM lab_detections AS n LEFT JOIN lab_detections AS o ON o.event_id = n.corrects AND o.lab_id = n.lab_id
    WHERE n.corrects != ''
    UNION ALL
    SELECT n.corrects, n.event_id, 'border_seizure', n.agency, o.substance_name, n.substance_name,
           if(o.event_id = '', '', concat(toString(o.quantity_value), ' ', o.quantity_unit)),
           concat(toString(n.quantity_value), ' ', n.quantity_unit), n.occurred_at
    FROM border_seizures AS n LEFT JOIN border_seizures AS o ON o.event_id = n.corrects AND o.agency = n.agency
    WHERE n.corrects != ''
)
WHERE occurred_at >= now64(3) - toIntervalSecond(%(seconds)s)
  AND (%(lab)s = '' OR reporter = %(lab)s)
  AND (%(event)s = '' OR corrected = %(event)s OR corrected_by = %(event)s)
ORDER BY occurred_at DESC, corrected_by
LIMIT 1 BY kind, reporter, corrected_by
LIMIT %(limit)s
"""


def recent_corrections(
    settings: Settings,
    since: timedelta = timedelta(days=365),
    lab: str | None = None,
    event_id: str | None = None,
    limit: int = 200,
) -> list[CorrectionRow]:
    """Reports corrected by their reporter, newest correction first: which report, by which id, what changed.

    A corrected report stays stored and still counts in the aggregates (docs/detection.md, "Corrections");
    this is where an analyst sees that it was corrected. ``event_id`` keeps the rows where that id is the
    corrected report or its correction (one link of a chain)."""
    result = run_query(
        settings,
        _CORRECTIONS,
        {
            "seconds": int(since.total_seconds()),
            "lab": (lab or "").strip(),
            "event": (event_id or "").strip(),
            "limit": int(limit),
        },
    )
    return [
        CorrectionRow(
            corrected=r["corrected"],
            corrected_by=r["corrected_by"],
            kind=r["kind"],
            reporter=r["reporter"],
            old_substance=r["old_substance"] or "",
            new_substance=r["new_substance"] or "",
            old_quantity=r["old_quantity"] or "",
            new_quantity=r["new_quantity"] or "",
            occurred_at=_dt(r["occurred_at"]) or _EPOCH,
            superseded=bool(r["superseded"]),
        )
        for r in result.as_dicts()
    ]
