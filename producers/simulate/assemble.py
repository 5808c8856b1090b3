"""Assembly: the records in arrival order (late, duplicated and malformed lines included) and the truth that
labels every injected incident with its events."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from synthwatch.catalogue import CatalogueEntry, shipped_catalogue
from synthwatch.producers.simulate.models import (
    _DAY,
    _HOUR,
    _LAB,
    _SEIZURE,
    MALFORMED_KINDS,
    Incident,
    MalformedKind,
    MalformedLine,
    Simulation,
    SimulationConfig,
    SpreadStep,
    Truth,
    _LineStatus,
)
from synthwatch.producers.simulate.plan import _iso, _utc
from synthwatch.producers.simulate.records import _Records
from synthwatch.producers.simulate.substances import _structure_forms
from synthwatch.schemas.wire import WireError, parse_event


class _Generator(_Records):
    """One simulation run: plan, write the records, assemble the stream and its truth."""

    def assemble(self) -> Simulation:
        """Serialise in event-time order (ids and sequence numbers follow time), then shuffle into
        arrival order: report delays, late and very late arrivals, re-sends and malformed lines."""
        config = self.config
        seed = config.seed
        self.occurrences.sort(key=lambda o: (o.ts, o.region, o.substance, o.kind, o.incident, o.value))
        self.build_sources()
        rnd = self.rnd_wire
        items: list[tuple[int, int, str, _LineStatus, str | None]] = []
        event_ids: list[str] = []
        late_ids: list[str] = []
        very_late_ids: list[str] = []
        seizure_records: list[dict[str, Any]] = []
        all_records: list[dict[str, Any]] = []
        very_late_cut = config.very_late_fraction
        late_cut = very_late_cut + config.late_fraction
        for n, occ in enumerate(self.occurrences, start=1):
            event_id = f"sim-{seed}-{n:08d}"
            event_ids.append(event_id)
            record, offset = (self.lab_record if occ.kind == _LAB else self.seizure_record)(occ, event_id, rnd)
            u = rnd.random()
            if u < very_late_cut:
                delay = int(rnd.uniform(25, 72) * _HOUR)
                very_late_ids.append(event_id)
            elif u < late_cut:
                delay = int(rnd.uniform(1.5, 20) * _HOUR)
                late_ids.append(event_id)
            else:
                delay = 60 + int(min(rnd.expovariate(1 / 900), 3240))
            record["reported_at"] = _iso(occ.ts + delay, offset)
            line = json.dumps(record, ensure_ascii=False, separators=(",", ":"))
            items.append((occ.ts + delay, n, line, "event", event_id))
            all_records.append(record)
            if occ.kind == _SEIZURE:
                seizure_records.append(record)
        valid = len(items)
        n_dup = int(valid * config.duplicate_fraction + 0.5) if valid else 0
        for j, original in enumerate(sorted(rnd.sample(range(valid), n_dup)) if n_dup else []):
            ts, _, line, _, original_id = items[original]
            delay = 1 + int(rnd.expovariate(1 / 1800))
            items.append((ts + delay, valid + j + 1, line, "duplicate", original_id))
        total_good = valid + n_dup
        mf = config.malformed_fraction
        n_bad = int(total_good * mf / (1 - mf) + 0.5) if total_good else 0
        kinds: list[MalformedKind] = []
        while len(kinds) < n_bad:
            batch = list(MALFORMED_KINDS)
            rnd.shuffle(batch)
            kinds.extend(batch)
        first_ts = self.day_seconds[0]
        last_ts = self.day_seconds[-1] + _DAY
        bad_ids: dict[int, tuple[MalformedKind, str | None]] = {}
        for j, kind in enumerate(kinds[:n_bad]):
            if kind == "negative_quantity" and not seizure_records:
                kind = "blank_substance_name"
            base = rnd.choice(seizure_records if kind == "negative_quantity" else all_records)
            bad_id = f"sim-{seed}-bad{j + 1:06d}"
            line = self.malformed_line(kind, base, bad_id, rnd)
            try:
                parse_event(line)
            except WireError:
                pass
            else:  # pragma: no cover - a bug in malformed_line
                raise AssertionError(f"malformed line of kind {kind} passed validation: {line}")
            tiebreak = total_good + j + 1
            kept_id = bad_id if bad_id in line else None
            bad_ids[tiebreak] = (kind, kept_id)
            items.append((rnd.randint(first_ts, last_ts), tiebreak, line, "malformed", kept_id))
        items.sort(key=lambda item: (item[0], item[1]))
        malformed = [
            MalformedLine(line=i + 1, kind=bad_ids[item[1]][0], event_id=bad_ids[item[1]][1])
            for i, item in enumerate(items)
            if item[3] == "malformed"
        ]
        return Simulation(
            lines=[item[2] for item in items],
            truth=Truth(
                config=config,
                catalogue_size=self.n_catalogue,
                lines=len(items),
                valid_unique=valid,
                malformed=len(malformed),
                duplicates=n_dup,
                late=len(late_ids),
                very_late=len(very_late_ids),
                incidents=self.incidents(event_ids),
                malformed_kinds=malformed,
                late_event_ids=late_ids,
                very_late_event_ids=very_late_ids,
            ),
            statuses=[item[3] for item in items],
        )

    def incidents(self, event_ids: list[str]) -> list[Incident]:
        members: dict[int, list[int]] = {}
        for n, occ in enumerate(self.occurrences):
            if occ.incident >= 0:
                members.setdefault(occ.incident, []).append(n)
        result = []
        for index, plan in enumerate(self.plans):
            rows = members.get(index, [])
            if not rows:
                continue
            substance = self.substances[plan.substance]
            region = self.regions[plan.region]
            forms = _structure_forms(substance.smiles)
            incident = Incident(
                incident_id="",
                type=plan.type,
                substance_name=substance.name,
                smiles=substance.smiles,
                inchikey=forms.inchikey,
                family=substance.family,
                region=region.code,
                country=region.country,
                start=_utc(self.occurrences[rows[0]].ts),
                event_ids=[event_ids[n] for n in rows],
            )
            if plan.type == "spike" and plan.window is not None:
                d0, length = plan.window
                offset = region.utc_offset_minutes * 60
                incident.end = _utc(self.occurrences[rows[-1]].ts)
                incident.window_start = _utc(self.day_seconds[d0] - offset)
                incident.window_end = _utc(self.day_seconds[d0] + length * _DAY - offset)
                incident.factor = plan.factor
                incident.metric = plan.metric
                incident.baseline_per_day = plan.baseline_per_day
            if plan.type == "new_substance":
                for spread_region in plan.spread_regions:
                    first = next(n for n in rows if self.occurrences[n].region == spread_region)
                    other = self.regions[spread_region]
                    incident.spread.append(
                        SpreadStep(
                            region=other.code,
                            country=other.country,
                            first_seen=_utc(self.occurrences[first].ts),
                            event_id=event_ids[first],
                        )
                    )
            result.append(incident)
        result.sort(key=lambda i: (i.start, i.type, i.region, i.substance_name))
        for k, incident in enumerate(result, start=1):
            incident.incident_id = f"inc-{self.config.seed}-{k:03d}"
        return result

    def run(self) -> Simulation:
        new, first, spikes = self.config.incident_counts()
        self.build_rates()
        self.generate_baseline()
        self.plan_new_substances(new)
        self.plan_first_appearances(first)
        self.plan_spikes(spikes)
        return self.assemble()


def simulate(config: SimulationConfig, catalogue: Sequence[CatalogueEntry] | None = None) -> Simulation:
    """Generate the stream and its truth for ``config`` (catalogue: the shipped one by default).

    Deterministic: the same config and catalogue always give byte-identical lines and truth.
    """
    return _Generator(config, shipped_catalogue() if catalogue is None else catalogue).run()
