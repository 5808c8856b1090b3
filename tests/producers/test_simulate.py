"""The stream simulator: deterministic, valid on the wire, and its labels are true of the data.

Each property is checked against the generated lines themselves (parsed with the real wire contract,
substances identified by structure key or catalogue name as a detector would), never against the
simulator's internals, and with two catalogues: the shipped one (growing) and a fixed one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable
from datetime import UTC, date, datetime, time, timedelta
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from rdkit import Chem
from rdkit.rdBase import BlockLogs

from synthwatch.catalogue import CatalogueEntry, Family, shipped_catalogue
from synthwatch.producers.simulate import (
    MALFORMED_KINDS,
    Incident,
    Simulation,
    SimulationConfig,
    simulate,
)
from synthwatch.schemas.wire import WireError, parse_event

START = date(2026, 1, 5)  # a Monday
REQUIRED_REGIONS = {
    "ML-BKO",
    "ML-4",
    "ML-7",
    "MA-CAS",
    "MA-RAB",
    "MA-TNG",
    "SN-DK",
    "CI-AB",
    "NG-LA",
    "FR-75C",
    "FR-13",
    "NL-NH",
    "BE-BRU",
    "DE-BE",
    "ES-B",
    "US-CA",
    "US-NY",
}


def _entry(name: str, smiles: str, family: Family, nps: bool, *synonyms: str) -> CatalogueEntry:
    return CatalogueEntry(name=name, synonyms=synonyms, smiles=smiles, family=family, controlled=True, nps=nps)


#: A fixed catalogue, so the statistical checks do not depend on the shipped file's current size.
FIXED_CATALOGUE = (
    _entry("Cocaine", "COC(=O)[C@H]1[C@@H](OC(=O)c2ccccc2)C[C@@H]2CC[C@H]1N2C", "other", False, "coke"),
    _entry("Heroin", "CC(=O)OC1C=CC2C3Cc4ccc(OC(C)=O)c5OC1C2(CCN3C)c45", "other_opioid", False, "diamorphine"),
    _entry("Tramadol", "CN(C)CC1CCCCC1(O)c1cccc(OC)c1", "other_opioid", False, "tramal"),
    _entry("MDMA", "CNC(C)Cc1ccc2c(c1)OCO2", "phenethylamine", False, "ecstasy", "molly"),
    _entry("Ketamine", "CNC1(CCCCC1=O)c1ccccc1Cl", "arylcyclohexylamine", False, "special k"),
    _entry("3-MMC", "CNC(C)C(=O)c1cccc(C)c1", "synthetic_cathinone", True, "metaphedrone"),
    _entry("Mephedrone", "CNC(C)C(=O)c1ccc(C)cc1", "synthetic_cathinone", True, "4-MMC"),
    _entry("alpha-PVP", "CCCC(N1CCCC1)C(=O)c1ccccc1", "synthetic_cathinone", True, "flakka"),
    _entry("MDMB-4en-PINACA", "COC(=O)C(NC(=O)c1nn(CCCC=C)c2ccccc12)C(C)(C)C", "synthetic_cannabinoid", True),
    _entry("Isotonitazene", "CCN(CC)CCn1c(Cc2ccc(OC(C)C)cc2)nc2cc([N+](=O)[O-])ccc21", "nitazene", True),
    _entry("Bromazolam", "Cc1nnc2n1-c1ccc(Br)cc1C(c1ccccc1)=NC2", "benzodiazepine", True),
    _entry("Fentanyl", "CCC(=O)N(c1ccccc1)C1CCN(CCc2ccccc2)CC1", "fentanyl", False),
)


# ------------------------------------------------------------------------------------------------
# Helpers: identify substances the way a detector would
# ------------------------------------------------------------------------------------------------


@cache
def fragment_keys(smiles: str) -> frozenset[str]:
    """InChIKey first blocks of every fragment (a salt's parent is one of them)."""
    with BlockLogs():
        mol = Chem.MolFromSmiles(smiles)
        assert mol is not None, f"unparseable SMILES {smiles!r}"
        return frozenset(Chem.MolToInchiKey(frag)[:14] for frag in Chem.GetMolFrags(mol, asMols=True))


#: Scaffolds a new substance of each family must have (written here independently of the simulator).
FAMILY_SCAFFOLDS = {
    "nitazene": "c1ccc2c(c1)nc(Cc1ccccc1)n2CCN",  # 2-benzylbenzimidazole, N1-aminoethyl
    "synthetic_cathinone": "aC(=O)C(C)N",  # beta-keto amphetamine
    "synthetic_cannabinoid": "O=C(NC)c1[c,n]n(C)c2aaaac12",  # indazole/indole-3-carboxamide
    "benzodiazepine": "c12ccccc1C(a)=NC~*~[#7]2",  # 5-aryl-1,4-benzodiazepine
    "fentanyl": "O=CN(c)C1CCN(CCa)CC1",  # 4-anilidopiperidine
}


def normalise(name: str) -> str:
    decomposed = unicodedata.normalize("NFKD", name.casefold())
    return "".join(ch for ch in decomposed if ch.isalnum() and not unicodedata.combining(ch))


class Identifier:
    """Maps an event to a catalogue entry: labs by structure, seizures by (unambiguous) name."""

    def __init__(self, catalogue: Iterable[CatalogueEntry]) -> None:
        self.entries = list(catalogue)
        self.key_of = {e.name: next(iter(fragment_keys(e.smiles))) for e in self.entries}
        owners: dict[str, set[str]] = defaultdict(set)
        for e in self.entries:
            for text in (e.name, *e.synonyms):
                owners[normalise(text)].add(e.name)
        self.by_name = {n: next(iter(o)) for n, o in owners.items() if len(o) == 1}
        key_owners: dict[str, set[str]] = defaultdict(set)
        for name, key in self.key_of.items():
            key_owners[key].add(name)
        self.by_key = {k: next(iter(o)) for k, o in key_owners.items() if len(o) == 1}
        self.ambiguous = {n for o in key_owners.values() if len(o) > 1 for n in o}

    def identify(self, event: dict[str, Any]) -> str | None:
        smiles = event["substance"].get("smiles")
        if smiles:
            for key in fragment_keys(smiles):
                if key in self.by_key:
                    return self.by_key[key]
            return None
        return self.by_name.get(normalise(event["substance"]["name"]))


def occurred(event: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(event["occurred_at"])


def grams(event: dict[str, Any]) -> float:
    quantity = event.get("quantity")
    if not quantity:
        return 0.0
    return quantity["value"] * {"g": 1.0, "kg": 1000.0, "mg": 0.001}.get(quantity["unit"], 0.0)


# ------------------------------------------------------------------------------------------------
# Fixtures
# ------------------------------------------------------------------------------------------------


class Run:
    """A simulation plus its lines parsed once."""

    def __init__(self, sim: Simulation, catalogue: tuple[CatalogueEntry, ...]) -> None:
        self.sim = sim
        self.truth = sim.truth
        self.catalogue = catalogue
        self.identifier = Identifier(catalogue)
        bad_lines = {m.line for m in sim.truth.malformed_kinds}
        self.events: list[dict[str, Any]] = []  # valid, first sends, file order
        self.seen_lines: dict[str, str] = {}
        self.duplicate_lines: list[tuple[int, str]] = []
        for number, line in enumerate(sim.lines, start=1):
            if number in bad_lines:
                continue
            event = json.loads(line)
            if event["event_id"] in self.seen_lines:
                self.duplicate_lines.append((number, line))
            else:
                self.seen_lines[event["event_id"]] = line
                self.events.append(event)
        self.by_id = {e["event_id"]: e for e in self.events}
        self.substance = {e["event_id"]: self.identifier.identify(e) for e in self.events}

    def events_of(self, region: str, substance: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["region"] == region and self.substance[e["event_id"]] == substance]


CONFIG = SimulationConfig(days=42, seed=11, start=START, warmup_days=10)


@pytest.fixture(scope="module", params=["shipped", "fixed"])
def run(request: pytest.FixtureRequest) -> Run:
    catalogue = tuple(shipped_catalogue()) if request.param == "shipped" else FIXED_CATALOGUE
    return Run(simulate(CONFIG, catalogue), catalogue)


def incidents(run: Run, kind: str) -> list[Incident]:
    found = [i for i in run.truth.incidents if i.type == kind]
    if not found:
        pytest.skip(f"no {kind} incident with this catalogue ({len(run.catalogue)} entries)")
    return found


# ------------------------------------------------------------------------------------------------
# Determinism
# ------------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_output(tmp_path: Path) -> None:
    config = SimulationConfig(days=10, seed=3, start=START, malformed_fraction=0.01, duplicate_fraction=0.02)
    first, second = simulate(config, FIXED_CATALOGUE), simulate(config, FIXED_CATALOGUE)
    assert first.lines == second.lines
    assert first.truth.model_dump_json() == second.truth.model_dump_json()
    first.write(tmp_path / "a.ndjson", tmp_path / "a.json")
    second.write(tmp_path / "b.ndjson", tmp_path / "b.json")
    assert (tmp_path / "a.ndjson").read_bytes() == (tmp_path / "b.ndjson").read_bytes()
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert (tmp_path / "a.ndjson").read_text(encoding="utf-8").splitlines() == first.lines
    assert json.loads((tmp_path / "a.json").read_text())["lines"] == len(first.lines)


_DIGEST_SCRIPT = """
import hashlib, sys
from datetime import date
from synthwatch.producers.simulate import SimulationConfig, simulate
from tests.producers.test_simulate import FIXED_CATALOGUE
sim = simulate(SimulationConfig(days=8, seed=2, start=date(2026, 1, 5)), FIXED_CATALOGUE)
sys.stdout.write(hashlib.sha256(("\\n".join(sim.lines) + sim.truth.model_dump_json()).encode()).hexdigest())
"""


def test_output_does_not_depend_on_hash_seed() -> None:
    """No set or dict-of-set ordering leaks into the output: two processes, two hash seeds, same bytes."""
    root = Path(__file__).resolve().parents[2]
    digests = {
        subprocess.run(
            [sys.executable, "-c", _DIGEST_SCRIPT],
            env={**os.environ, "PYTHONHASHSEED": hash_seed},
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for hash_seed in ("1", "2")
    }
    assert len(digests) == 1 and len(digests.pop()) == 64


def test_different_seed_gives_different_output() -> None:
    a = simulate(SimulationConfig(days=5, seed=1, start=START), FIXED_CATALOGUE)
    b = simulate(SimulationConfig(days=5, seed=2, start=START), FIXED_CATALOGUE)
    assert a.lines != b.lines
    assert len(set(a.lines) & set(b.lines)) == 0


def test_default_incident_counts() -> None:
    assert SimulationConfig(days=30, seed=0, start=START).incident_counts() == (3, 6, 4)
    assert SimulationConfig(days=7, seed=0, start=START).incident_counts()[0] == 1
    assert SimulationConfig(days=5, seed=0, start=START).incident_counts() == (0, 1, 1)
    assert SimulationConfig(days=90, seed=0, start=START, warmup_days=60).incident_counts() == (3, 6, 4)
    assert SimulationConfig(days=30, seed=0, start=START, spikes=0).incident_counts()[2] == 0
    with pytest.raises(ValueError):
        SimulationConfig(days=0, seed=0, start=START)
    with pytest.raises(ValueError):
        SimulationConfig(days=30, seed=0, start=date(1985, 1, 1))


# ------------------------------------------------------------------------------------------------
# Wire validity and bookkeeping
# ------------------------------------------------------------------------------------------------


def test_valid_lines_parse_and_malformed_lines_fail(run: Run) -> None:
    bad = {m.line: m for m in run.truth.malformed_kinds}
    for number, line in enumerate(run.sim.lines, start=1):
        if number in bad:
            with pytest.raises(WireError):
                parse_event(line)
        else:
            event = parse_event(line)
            assert event.reported_at is not None and event.reported_at > event.occurred_at
    assert {m.kind for m in run.truth.malformed_kinds} == set(MALFORMED_KINDS)


def test_counts_add_up(run: Run) -> None:
    truth = run.truth
    assert truth.lines == len(run.sim.lines) == truth.valid_unique + truth.malformed + truth.duplicates
    assert truth.valid_unique == len(run.events)
    assert truth.duplicates == len(run.duplicate_lines)
    assert truth.malformed == len(truth.malformed_kinds)
    assert truth.late == len(truth.late_event_ids) and truth.very_late == len(truth.very_late_event_ids)
    assert not set(truth.late_event_ids) & set(truth.very_late_event_ids)
    assert 0.002 < truth.malformed / truth.lines < 0.004
    assert 0.003 < truth.duplicates / truth.lines < 0.007
    assert 0.01 < truth.late / truth.valid_unique < 0.03
    assert [e["event_id"] for e in run.sim.iter_events()] == [e["event_id"] for e in run.events]
    assert len({e["event_id"] for e in run.events}) == len(run.events)


def test_duplicates_are_exact_resends_of_earlier_lines(run: Run) -> None:
    first_line_of: dict[str, int] = {}
    bad = {m.line for m in run.truth.malformed_kinds}
    for number, line in enumerate(run.sim.lines, start=1):
        if number not in bad:
            first_line_of.setdefault(json.loads(line)["event_id"], number)
    assert run.duplicate_lines
    for number, line in run.duplicate_lines:
        event_id = json.loads(line)["event_id"]
        assert first_line_of[event_id] < number
        assert run.seen_lines[event_id] == line


def test_late_events_arrive_out_of_order(run: Run) -> None:
    for event_id in run.truth.late_event_ids:
        event = run.by_id[event_id]
        delay = datetime.fromisoformat(event["reported_at"]) - occurred(event)
        assert timedelta(hours=1) < delay < timedelta(hours=24)
    for event_id in run.truth.very_late_event_ids:
        event = run.by_id[event_id]
        assert datetime.fromisoformat(event["reported_at"]) - occurred(event) > timedelta(hours=24)
    # File order is arrival order: late events sit after events that occurred later than they did.
    position = {e["event_id"]: i for i, e in enumerate(run.events)}
    out_of_order = 0
    for event_id in run.truth.late_event_ids:
        later = run.events[position[event_id] - 1] if position[event_id] else None
        out_of_order += later is not None and occurred(later) > occurred(run.by_id[event_id])
    assert out_of_order >= 0.8 * len(run.truth.late_event_ids)


def test_stream_looks_like_the_field(run: Run) -> None:
    events = run.events
    assert {e["region"] for e in events} >= REQUIRED_REGIONS
    kinds = Counter(e["kind"] for e in events)
    assert 0.5 < kinds["lab_detection"] / len(events) < 0.62
    labs = [e for e in events if e["kind"] == "lab_detection"]
    seizures = [e for e in events if e["kind"] == "border_seizure"]
    assert all(e["substance"].get("smiles") for e in labs)
    assert sum("." in e["substance"]["smiles"] for e in labs) > 0.05 * len(labs)  # salts
    assert sum("inchikey" in e["substance"] for e in labs) > 0.1 * len(labs)
    assert {e["method"] for e in labs} == {"GC-MS", "LC-HRMS", "LC-MS/MS", "FTIR", "NMR"}
    assert Counter(e["sample_type"] for e in labs).most_common(1)[0][0] == "seized_material"
    assert not any(e["substance"].get("smiles") for e in seizures)
    units = Counter(e["quantity"]["unit"] for e in seizures)
    assert (units["g"] + units["kg"]) > 0.5 * len(seizures)
    masses = sorted(grams(e) for e in seizures if grams(e))
    assert masses[-1] > 50 * masses[len(masses) // 2]  # heavy tail
    offsets = Counter(e["occurred_at"][-6:] for e in events)
    assert offsets["+00:00"] > 0 and offsets["+01:00"] > 0 and offsets["-08:00"] > 0
    spellings = {e["substance"]["name"] for e in seizures}
    assert len(spellings) > len({normalise(s) for s in spellings})  # varying case/spacing


def test_weekends_are_quieter() -> None:
    sim = simulate(SimulationConfig(days=28, seed=5, start=START), FIXED_CATALOGUE)
    per_day: Counter[date] = Counter(occurred(e).date() for e in sim.iter_events())
    weekend = [per_day[START + timedelta(days=d)] for d in range(28) if (START + timedelta(days=d)).weekday() >= 5]
    weekday = [per_day[START + timedelta(days=d)] for d in range(28) if (START + timedelta(days=d)).weekday() < 5]
    assert sum(weekend) / len(weekend) < 0.8 * sum(weekday) / len(weekday)


# ------------------------------------------------------------------------------------------------
# Labelled incidents are true of the data
# ------------------------------------------------------------------------------------------------


def warmup_end() -> datetime:
    return datetime.combine(START + timedelta(days=CONFIG.warmup_days), time(), UTC)


def test_incident_labels_are_consistent(run: Run) -> None:
    assert run.truth.incidents
    for incident in run.truth.incidents:
        assert incident.start >= warmup_end()
        assert incident.event_ids
        events = [run.by_id[i] for i in incident.event_ids]
        assert min(occurred(e) for e in events) == incident.start
        assert all(e["region"] == incident.region for e in events) or incident.type == "new_substance"
    ids = [i.incident_id for i in run.truth.incidents]
    assert len(set(ids)) == len(ids)


def test_new_substances_are_new(run: Run) -> None:
    catalogue_keys = {k for e in run.catalogue for k in fragment_keys(e.smiles)}
    known = {normalise(t) for e in run.catalogue for t in (e.name, *e.synonyms)}
    found = incidents(run, "new_substance")
    assert len(found) == CONFIG.incident_counts()[0]
    for incident in found:
        assert incident.smiles
        (key,) = fragment_keys(incident.smiles)
        scaffold = Chem.MolFromSmarts(FAMILY_SCAFFOLDS[incident.family])
        assert Chem.MolFromSmiles(incident.smiles).HasSubstructMatch(scaffold), incident
        assert key not in catalogue_keys
        assert normalise(incident.substance_name) not in known
        first = run.by_id[incident.event_ids[0]]
        assert first["kind"] == "lab_detection" and first["region"] == incident.region
        assert incident.spread[0].region == incident.region
        # Nothing with that structure before its start, and every event of it is labelled.
        with_key = [
            e for e in run.events if e["substance"].get("smiles") and key in fragment_keys(e["substance"]["smiles"])
        ]
        assert min(occurred(e) for e in with_key) == incident.start
        assert {e["event_id"] for e in with_key} <= set(incident.event_ids)
        for step in incident.spread:
            in_region = [occurred(e) for e in with_key if e["region"] == step.region]
            assert min(in_region) == step.first_seen
    assert len({fragment_keys(i.smiles or "") for i in found}) == len(found)


def test_first_appearances_are_first(run: Run) -> None:
    for incident in incidents(run, "first_in_region"):
        if incident.substance_name in run.identifier.ambiguous:
            continue
        before = [
            e
            for e in run.events
            if run.substance[e["event_id"]] == incident.substance_name and occurred(e) < incident.start
        ]
        assert before, f"{incident.substance_name} was seen nowhere before {incident.start}"
        assert not [e for e in before if e["region"] == incident.region]
        assert {e["region"] for e in before} - {incident.region}
        in_region = run.events_of(incident.region, incident.substance_name)
        assert min(occurred(e) for e in in_region) == incident.start


def test_spikes_stand_out(run: Run) -> None:
    checked = 0
    for incident in incidents(run, "spike"):
        if incident.substance_name in run.identifier.ambiguous:
            continue
        assert incident.window_start and incident.window_end and incident.factor and incident.metric
        assert incident.window_start <= incident.start <= (incident.end or incident.start) < incident.window_end
        length = incident.window_end - incident.window_start
        assert timedelta(days=2) <= length <= timedelta(days=7)
        events = run.events_of(incident.region, incident.substance_name)
        during = [e for e in events if incident.window_start <= occurred(e) < incident.window_end]
        before = [e for e in events if incident.window_start - length <= occurred(e) < incident.window_start]
        assert {e["event_id"] for e in during} >= set(incident.event_ids)
        if incident.metric == "count":
            assert 2 <= incident.factor <= 8
            assert len(during) >= 1.3 * len(before) + 2, (incident, len(during), len(before))
        else:
            assert 10 <= incident.factor <= 50
            assert 3 <= len(incident.event_ids) <= 5
            assert all(run.by_id[i]["kind"] == "border_seizure" for i in incident.event_ids)
            assert sum(grams(e) for e in during) >= 2 * sum(grams(e) for e in before)
        checked += 1
    assert checked


def test_incidents_respect_warmup() -> None:
    config = SimulationConfig(days=20, seed=4, start=START, warmup_days=14, new_substances=2, spikes=2)
    truth = simulate(config, FIXED_CATALOGUE).truth
    boundary = datetime.combine(START + timedelta(days=14), time(), UTC)
    assert truth.incidents
    assert all(i.start >= boundary for i in truth.incidents)
    no_room = simulate(SimulationConfig(days=10, seed=4, start=START, warmup_days=10), FIXED_CATALOGUE)
    assert no_room.truth.incidents == []
