"""Records: each planned occurrence written as a lab detection or a border seizure, as its reporter would spell
it, and the malformed lines real feeds contain."""

from __future__ import annotations

import json
import random
from datetime import timedelta
from typing import Any

from synthwatch.producers.simulate.models import _NAIVE_EPOCH, MalformedKind
from synthwatch.producers.simulate.plan import _iso, _Occurrence, _Planner
from synthwatch.producers.simulate.substances import _pick, _structure_forms
from synthwatch.producers.simulate_templates import (
    ORIGINS,
    PURITY,
    SALT_FAMILIES,
    SALTS,
    Agency,
)


class _Records(_Planner):
    """The plan, written out as wire records."""

    def build_sources(self) -> None:
        """Each lab and agency writes times either in UTC or in local time, consistently."""
        rnd = self.rnd_setup
        self.writes_utc: dict[str, bool] = {}
        for region in self.regions:
            for lab in region.labs:
                self.writes_utc.setdefault(lab, rnd.random() < 0.4)
            for agency in region.agencies:
                self.writes_utc.setdefault(f"{region.code}/{agency.code}", rnd.random() < 0.4)
            if all(self.writes_utc[lab] for lab in region.labs) and all(
                self.writes_utc[f"{region.code}/{agency.code}"] for agency in region.agencies
            ):  # every region has some source writing its local offset
                self.writes_utc[region.labs[0]] = False
        self.lab_seq: dict[str, int] = {}
        self.seizure_seq: dict[str, int] = {}

    def lab_record(self, occ: _Occurrence, event_id: str, rnd: random.Random) -> tuple[dict[str, Any], int]:
        region = self.regions[occ.region]
        substance = self.substances[occ.substance]
        lab = rnd.choice(region.labs)
        offset = 0 if self.writes_utc[lab] else region.utc_offset_minutes
        year = (_NAIVE_EPOCH + timedelta(seconds=occ.ts)).year
        seq = self.lab_seq[lab] = self.lab_seq.get(lab, 0) + 1
        forms = _structure_forms(substance.smiles)
        u = rnd.random()
        inchikey = None
        if u < 0.45:
            smiles = forms.canonical
        elif u < 0.6:
            smiles = substance.smiles
        elif u < 0.85 or substance.family not in SALT_FAMILIES:
            smiles = rnd.choice(forms.variants)
        else:
            salt = rnd.choice(SALTS)
            if _structure_forms(salt).heavy_atoms * 2 > forms.heavy_atoms:
                salt = "Cl"
            base = forms.canonical if rnd.random() < 0.6 else rnd.choice(forms.variants)
            smiles = f"{base}.{salt}" if rnd.random() < 0.8 else f"{salt}.{base}"
        if "." not in smiles and forms.inchikey and rnd.random() < (0.7 if occ.first_of_incident else 0.3):
            inchikey = forms.inchikey
        report: dict[str, Any] = {"name": _pick(rnd, substance.lab_names), "smiles": smiles}
        if inchikey:
            report["inchikey"] = inchikey
        if substance.cas and rnd.random() < 0.1:
            report["cas"] = substance.cas
        u = rnd.random()
        if occ.first_of_incident or u < 0.82:
            sample_type = "seized_material"
        elif u < 0.9:
            sample_type = "drug_checking" if region.drug_checking else "seized_material"
        elif u < 0.97:
            sample_type = "biological"
        elif u < 0.99:
            sample_type = "wastewater"
        else:
            sample_type = "other"
        if substance.novel and (occ.first_of_incident or rnd.random() < 0.5):
            method = rnd.choice(("LC-HRMS", "NMR", "LC-HRMS"))
        else:
            u = rnd.random()
            method = (
                "GC-MS"
                if u < 0.45
                else "LC-HRMS"
                if u < 0.65
                else "LC-MS/MS"
                if u < 0.8
                else ("FTIR" if u < 0.92 else "NMR")
            )
        record: dict[str, Any] = {
            "kind": "lab_detection",
            "event_id": event_id,
            "occurred_at": _iso(occ.ts, offset),
            "reported_at": "",
            "country": region.country,
            "region": region.code,
            "substance": report,
            "lab_id": lab,
            "sample_id": f"{lab}-{year % 100:02d}-{seq:05d}",
            "sample_type": sample_type,
            "method": method,
            "confirmed": occ.first_of_incident or rnd.random() < 0.94,
        }
        if sample_type in ("seized_material", "drug_checking") and rnd.random() < 0.7:
            a, b = PURITY.get(substance.family, (4.0, 4.0))
            record["purity_pct"] = min(99.9, max(0.1, round(rnd.betavariate(a, b) * 100, 1)))
        return record, offset

    def seizure_record(self, occ: _Occurrence, event_id: str, rnd: random.Random) -> tuple[dict[str, Any], int]:
        region = self.regions[occ.region]
        substance = self.substances[occ.substance]
        points = region.border_points
        point = rnd.choices(points, weights=[p.weight for p in points])[0]
        agency: Agency = region.agencies[rnd.choice(point.agencies)]
        offset = 0 if self.writes_utc[f"{region.code}/{agency.code}"] else region.utc_offset_minutes
        year = (_NAIVE_EPOCH + timedelta(seconds=occ.ts)).year
        seq = self.seizure_seq[agency.code] = self.seizure_seq.get(agency.code, 0) + 1
        report: dict[str, Any] = {"name": _pick(rnd, substance.seizure_names)}
        if substance.cas and rnd.random() < 0.05:
            report["cas"] = substance.cas
        record: dict[str, Any] = {
            "kind": "border_seizure",
            "event_id": event_id,
            "occurred_at": _iso(occ.ts, offset),
            "reported_at": "",
            "country": region.country,
            "region": region.code,
            "substance": report,
            "agency": agency.name,
            "seizure_id": f"{agency.code}-{year}-{seq:06d}",
            "border_point": point.name,
            "conveyance": point.conveyance,
            "quantity": {"value": occ.value, "unit": occ.unit},
        }
        if rnd.random() < 0.8:
            origins = ORIGINS.get(substance.family, ORIGINS["other"])
            origin = rnd.choices([o for o, _ in origins], weights=[w for _, w in origins])[0]
            if origin != region.country:
                record["origin_country"] = origin
        if rnd.random() < 0.75 or not region.transit_destinations:
            destination = region.country
        else:
            destination = rnd.choice(region.transit_destinations)
        if record.get("origin_country") != destination:
            record["destination_country"] = destination
        return record, offset

    def malformed_line(self, kind: MalformedKind, base: dict[str, Any], event_id: str, rnd: random.Random) -> str:
        record = json.loads(json.dumps(base))
        record["event_id"] = event_id
        if kind == "bad_region_code":
            region = self.regions[[r.code for r in self.regions].index(record["region"])]
            record["region"] = rnd.choice(
                (f"{region.country}-XX", f"{region.country}-99", region.name, region.code.replace("-", ""))
            )
        elif kind == "region_of_other_country":
            record["region"] = rnd.choice([r.code for r in self.regions if r.country != record["country"]])
        elif kind == "negative_quantity":
            record["quantity"]["value"] = rnd.choice((-record["quantity"]["value"], 0))
        elif kind == "unknown_kind":
            record["kind"] = rnd.choice(("lab_result", "seizure", "wastewater_sample", "LabDetection"))
        elif kind == "blank_substance_name":
            record["substance"]["name"] = rnd.choice(("", "   ", "\t"))
        elif kind == "naive_timestamp":
            record["occurred_at"] = record["occurred_at"][:-6]
        elif kind == "missing_required_field":
            required = ["event_id", "occurred_at", "country", "region", "substance", "kind"]
            required += (
                ["lab_id", "sample_id", "sample_type", "method"]
                if record["kind"] == "lab_detection"
                else ["agency", "seizure_id", "border_point", "conveyance", "quantity"]
            )
            del record[rnd.choice(required)]
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":"))
        if kind == "truncated_json":
            line = line[: rnd.randint(len(line) // 4, len(line) - 2)]
        return line
