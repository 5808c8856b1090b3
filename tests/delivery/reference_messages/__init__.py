"""Reviewed reference texts of every alert type (and the digest) in every language.

``tests/delivery/test_reference_messages.py`` renders the alerts below and compares byte for byte with the files
in ``tests/delivery/reference_messages/<language>/``: any change of wording, plural, date, digit or markup fails
it. After a deliberate change of templates or messages.py, regenerate with

    .venv/bin/python -m tests.delivery.reference_messages

then READ EVERY CHANGED FILE (git diff tests/delivery/reference_messages) as a native speaker of its language
would before committing: the files are the reviewed texts, and regenerating them is not a review.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path

from synthwatch.schemas import Alert, AlertSubstance
from synthwatch.schemas.records import GuessedFamily, SimilarSubstance
from synthwatch.stream_apps.delivery.messages import (
    LANGUAGES,
    Message,
    render_alert,
    render_budget_notice,
    render_digest,
)

HERE = Path(__file__).parent
GRAFANA = "https://grafana.example.org"
#: The officer's time zone per language in the references (Casablanca is UTC+1 in December: shows conversion).
ZONES = {"en": "UTC", "fr": "Africa/Bamako", "ar": "Africa/Casablanca"}

_DAY = datetime(2026, 12, 5, tzinfo=UTC)
_NITAZENE = AlertSubstance(
    name="N-Pyrrolidino protonitazene",
    key="NPYRPROTONITAZ",
    inchikey="NPYRPROTONITAZ-UHFFFAOYSA-N",
    family="nitazene",
    controlled=True,
)


def _similar(name: str, key: str, score: float) -> SimilarSubstance:
    """A catalogued nitazene near the new substance (scores as the similarity index computes them)."""
    return SimilarSubstance(name=name, key=key, score=score, family="nitazene", controlled=True, catalogued=True)


def reference_alerts() -> dict[str, Alert]:
    """One alert per type (two spikes: count and mass), fixed so the texts never depend on the clock."""
    common = {
        "window_start": _DAY,
        "window_end": datetime(2026, 12, 6, tzinfo=UTC),
        "triggered_at": datetime(2026, 12, 5, 14, 3, tzinfo=UTC),
        "detected_at": datetime(2026, 12, 5, 14, 4, tzinfo=UTC),
    }
    return {
        "new_substance": Alert(
            alert_id="0123456789abcdef01234567",
            alert_type="new_substance",
            severity="critical",
            country="ML",
            region="ML-BKO",
            substance=_NITAZENE,
            observed=1.0,
            expected=0.0,
            evidence_event_ids=["lab-1"],
            summary="Never seen by the network.",
            identification_methods=["LC-HRMS"],
            sample_types=["seized_material"],
            identified_by="catalogue_name",
            reported_by=["LAB-ML-01"],
            similar_substances=[
                _similar("Etonitazepyne", "LQZWZCJCEPUKCJ", 0.864),
                _similar("Protonitazene", "SJHUJFHOXYDSJY", 0.734),
                _similar("Butonitazene", "UZZPOLCDCVWLAZ", 0.682),
            ],
            **common,
        ),
        # A structure no SMARTS pattern classifies (etonitazene with a propyl linker): a family guess, and a
        # neighbour the network learnt from an earlier report (not in the catalogue, status unknown).
        "new_substance_unclassified": Alert(
            alert_id="6123456789abcdef01234567",
            alert_type="new_substance",
            severity="warning",
            country="SN",
            region="SN-DK",
            substance=AlertSubstance(
                name="Homo-etonitazene", key="KQNHOMOETONITZ", inchikey="KQNHOMOETONITZ-UHFFFAOYSA-N"
            ),
            observed=1.0,
            expected=0.0,
            evidence_event_ids=["lab-6"],
            summary="Never seen by the network.",
            identification_methods=["NMR"],
            sample_types=["seized_material"],
            identified_by="structure",
            reported_by=["LAB-SN-03"],
            similar_substances=[
                _similar("Etonitazene", "PXDBZSCGSQSKST", 0.895),
                SimilarSubstance(name="ETZ-7", key="QWERTYUIOPASDF", score=0.81, catalogued=False),
                _similar("Butonitazene", "UZZPOLCDCVWLAZ", 0.803),
            ],
            family_guess=GuessedFamily(family="nitazene", score=0.895, nearest="Etonitazene"),
            **common,
        ),
        # A name-only report nothing resolves: the catalogue names spelt like it.
        "new_substance_unresolved": Alert(
            alert_id="7123456789abcdef01234567",
            alert_type="new_substance",
            severity="info",
            country="ML",
            region="ML-BKO",
            substance=AlertSubstance(name="protonitazen", key="name:protonitazen"),
            observed=1.0,
            expected=0.0,
            evidence_event_ids=["lab-7"],
            summary="Never seen by the network.",
            identification_methods=["GC-MS"],
            sample_types=["seized_material"],
            identified_by="unresolved_name",
            reported_by=["LAB-ML-01"],
            did_you_mean=["Protonitazene", "Isotonitazene", "Etonitazene"],
            **common,
        ),
        "first_in_region": Alert(
            alert_id="1123456789abcdef01234567",
            alert_type="first_in_region",
            severity="critical",
            country="MR",
            region="MR-NKC",
            substance=_NITAZENE,
            observed=1.0,
            expected=0.0,
            evidence_event_ids=["lab-2"],
            identification_methods=["GC-MS"],
            sample_types=["biological"],
            details={"other_regions": ["ML-BKO", "SN-DK"], "network_first_day": "2026-11-20"},
            identified_by="structure",
            reported_by=["LAB-MR-02"],
            reported_late=True,
            late_by_hours=50.0,
            **common,
        ),
        "spike_count": Alert(
            alert_id="2123456789abcdef01234567",
            alert_type="spike",
            severity="warning",
            country="MA",
            region="MA-06",
            substance=AlertSubstance(
                name="3-MMC", key="MMCKEY", inchikey=None, family="synthetic_cathinone", controlled=True
            ),
            metric="count",
            observed=14.0,
            expected=2.5,
            score=7.3,
            evidence_event_ids=[f"lab-{i}" for i in range(14)],
            identified_by="learnt_name",
            reported_by=["LAB-MA-01", "LAB-MA-03"],
            window_start=datetime(2026, 12, 3, tzinfo=UTC),
            **{k: v for k, v in common.items() if k != "window_start"},
        ),
        "spike_family": Alert(
            alert_id="5123456789abcdef01234567",
            alert_type="spike",
            severity="critical",
            country="ML",
            region="ML-BKO",
            substance=AlertSubstance(
                name="nitazene (benzimidazole opioid) (all substances)", key="family:nitazene", family="nitazene"
            ),
            metric="count",
            observed=2.0,
            expected=0.2,
            score=2.2,
            evidence_event_ids=["lab-1", "lab-7"],
            reported_by=["LAB-ML-01"],
            **common,
        ),
        "spike_quantity": Alert(
            alert_id="3123456789abcdef01234567",
            alert_type="spike",
            severity="warning",
            country="SN",
            region="SN-DK",
            substance=AlertSubstance(name="Tramadol", key="TRAMKEY", family="other_opioid", controlled=False),
            metric="quantity",
            observed=14500.0,
            expected=2300.5,
            score=4.1,
            evidence_event_ids=["s-1", "s-2"],
            identified_by="catalogue_name",
            reported_by=["Douane sénégalaise"],
            **common,
        ),
        "spread": Alert(
            alert_id="4123456789abcdef01234567",
            alert_type="spread",
            severity="warning",
            substance=AlertSubstance(name="Zorblex", key="name:zorblex", family=None),
            observed=3.0,
            expected=3.0,
            evidence_event_ids=["lab-9"],
            details={"regions": ["MA-06", "ML-BKO", "MR-NKC"]},
            identified_by="unresolved_name",
            reported_by=["LAB-MR-02"],
            window_start=datetime(2026, 11, 22, tzinfo=UTC),
            **{k: v for k, v in common.items() if k != "window_start"},
        ),
        # A seizure corrected by its agency (a quantity typo and the substance): the notice to whoever got
        # the spike alert resting on it (stream_apps/detect/corrections.py builds it the same way).
        "correction": Alert(
            alert_id="correction:5123456789abcdef",
            alert_type="correction",
            severity="warning",
            country="SN",
            region="SN-DK",
            substance=AlertSubstance(name="Tramadol", key="name:tramadol", family="other_opioid"),
            evidence_event_ids=["s-2", "s-2b"],
            details={
                "corrected_alert_id": "3123456789abcdef01234567",
                "corrected_alert_type": "spike",
                "corrected_event_id": "s-2",
                "correction_event_id": "s-2b",
                "old_substance": "Tramadol",
                "new_substance": "Tapentadol",
                "old_quantity": "12 kg",
                "new_quantity": "1.2 kg",
                "counts_recomputed": False,
            },
            reported_by=["Douane sénégalaise"],
            **common,
        ),
    }


def reference_messages() -> dict[tuple[str, str], Message]:
    """(language, name) -> message: every alert above, and a digest of two of them, in every language."""
    alerts = reference_alerts()
    found: dict[tuple[str, str], Message] = {}
    for language in LANGUAGES:
        zone = ZONES[language]
        for name, alert in alerts.items():
            found[language, name] = render_alert(alert, language, GRAFANA, zone)
        two = [alerts["spread"], alerts["spike_quantity"]]
        found[language, "digest"] = render_digest(two, language, GRAFANA, date(2026, 12, 6), "Awa Ndiaye", zone)
        # a digest one of whose alerts a reporter's immediate budget held back, and the notice sent then
        found[language, "digest_held"] = render_digest(
            [alerts["new_substance"], *two], language, GRAFANA, date(2026, 12, 6), "Awa Ndiaye", zone, held=1
        )
        found[language, "budget_notice"] = render_budget_notice(
            "budget-2026-12-05-0123456789abcdef", "LAB-ML-01", date(2026, 12, 5), 10, 10, language
        )
        # the same, when the keys file names the organisation the lab reports for (the budget's unit then)
        found[language, "budget_notice_organisation"] = render_budget_notice(
            "budget-2026-12-05-fedcba9876543210", "lns-bamako", date(2026, 12, 5), 10, 10, language, organisation=True
        )
        # the notice that a reporter's correction notices of a day passed their own budget (the same size)
        found[language, "correction_budget_notice"] = render_budget_notice(
            "budget-2026-12-05-00112233aabbccdd", "LAB-ML-01", date(2026, 12, 5), 10, 10, language, corrections=True
        )
    return found


def files(message: Message) -> dict[str, str]:
    """suffix -> content: the subject on the plain text's first line, then the text; the HTML apart."""
    return {"txt": f"Subject: {message.subject}\n\n{message.text}", "html": message.html}


def write() -> list[Path]:
    """Rewrite every reference file; returns the paths (a human must review the diff)."""
    written = []
    for (language, name), message in reference_messages().items():
        folder = HERE / language
        folder.mkdir(exist_ok=True)
        for suffix, content in files(message).items():
            path = folder / f"{name}.{suffix}"
            path.write_text(content, encoding="utf-8")
            written.append(path)
    return written
