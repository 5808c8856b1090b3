"""Signed envelopes per organisation (schemas/envelope.py) in the intake, and learnt names needing corroboration.

Pure and fast: the end-to-end check against a real worker and broker is in test_kafka_security.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from synthwatch.schemas.envelope import (
    AUTH_CLASSES,
    HEADER_ORG,
    HEADER_SIG,
    EnvelopeVerifier,
    Organisation,
    OrgKeysError,
    auth_reason_class,
    envelope_headers,
    load_org_keys,
    sign,
)
from synthwatch.schemas.reject_reasons import reject_reason
from synthwatch.stream_apps.detect.identity import SubstanceResolver
from synthwatch.stream_apps.detect.intake import Intake, RawMessage
from tests.support.factories import lab, seizure

KEY_A = bytes(range(32))
KEY_B = bytes(range(1, 33))
TOPIC = "synthwatch.lab-detections"
ORGS = {
    "lab-fr": Organisation("lab-fr", (KEY_A,), frozenset({"LAB-FR-01"}), frozenset()),
    "douane-ml": Organisation("douane-ml", (KEY_B,), frozenset(), frozenset({"Douanes maliennes"})),
}
PENTYLOXY_NITAZENE = "CCCCCOc1ccc(Cc2nc3cc([N+](=O)[O-])ccc3n2CCN(CC)CC)cc1"
FENTANYL = "CCC(=O)N(c1ccccc1)C1CCN(CCc2ccccc2)CC1"


def signed(
    record: dict[str, object], org: str, secret: bytes, topic: str = TOPIC, key: bytes = b"FR-75C"
) -> RawMessage:
    value = json.dumps(record).encode()
    return RawMessage(f"{topic}:0:1", value, topic, key, envelope_headers(org, secret, topic, key, value))


# --- the envelope -----------------------------------------------------------------------------------------


def test_signature_covers_topic_key_and_value() -> None:
    verifier = EnvelopeVerifier(ORGS)
    value = b'{"x": 1}'
    headers = envelope_headers("lab-fr", KEY_A, TOPIC, b"k", value)
    assert verifier.check(TOPIC, b"k", value, headers) == ("lab-fr", None)
    for topic, key, body in [("synthwatch.alerts", b"k", value), (TOPIC, b"k2", value), (TOPIC, b"k", b'{"x": 2}')]:
        org, reason = verifier.check(topic, key, body, headers)
        assert org is None and reason is not None and reason.startswith("auth: bad_signature")
    # length prefixes: moving bytes between key and value changes the signature
    assert sign(KEY_A, TOPIC, b"ab", b"c") != sign(KEY_A, TOPIC, b"a", b"bc")
    assert sign(KEY_A, TOPIC, None, b"") != sign(KEY_A, TOPIC, b"", b"")


def test_missing_unknown_and_wrong_key_signatures_are_refused_with_their_reason() -> None:
    verifier = EnvelopeVerifier(ORGS)
    value = b"{}"
    assert verifier.check(TOPIC, None, value, None)[1] == (
        f"auth: unsigned: no {HEADER_ORG}/{HEADER_SIG} headers (signed reports are required)"
    )
    unknown = verifier.check(TOPIC, None, value, envelope_headers("lab-x\x1b[2J", KEY_A, TOPIC, None, value))[1]
    assert unknown is not None and unknown.startswith("auth: unknown_organisation") and "\x1b" not in unknown
    # lab-fr's id with douane-ml's key: a forger holding one key cannot sign as another organisation
    forged = verifier.check(TOPIC, None, value, envelope_headers("lab-fr", KEY_B, TOPIC, None, value))[1]
    assert forged is not None and forged.startswith("auth: bad_signature")
    # not required: an unsigned record passes unattributed, a signed one is still checked
    lenient = EnvelopeVerifier(ORGS, required=False)
    assert lenient.check(TOPIC, None, value, []) == (None, None)
    assert lenient.check(TOPIC, None, value, envelope_headers("lab-fr", KEY_B, TOPIC, None, value))[1] == forged


def test_rotated_keys_are_all_accepted_and_headers_may_be_a_mapping() -> None:
    rotating = {"lab-fr": Organisation("lab-fr", (KEY_B, KEY_A), frozenset({"LAB-FR-01"}), frozenset())}
    verifier = EnvelopeVerifier(rotating)
    headers = dict(envelope_headers("lab-fr", KEY_A, TOPIC, None, b"v"))
    assert verifier.check(TOPIC, None, b"v", headers) == ("lab-fr", None)


def test_reject_reasons_map_to_a_fixed_set_of_metric_labels() -> None:
    verifier = EnvelopeVerifier(ORGS)
    reasons = [
        verifier.check(TOPIC, None, b"v", None)[1],
        verifier.check(TOPIC, None, b"v", envelope_headers("org-x", KEY_A, TOPIC, None, b"v"))[1],
        verifier.check(TOPIC, None, b"v", envelope_headers("lab-fr", KEY_B, TOPIC, None, b"v"))[1],
        verifier.permits("lab-fr", "LAB-XX", None),
        verifier.permits("douane-ml", None, "Customs elsewhere"),
    ]
    labels = {reject_reason(reason or "") for reason in reasons}
    assert labels == {f"auth_{kind}" for kind in AUTH_CLASSES}
    assert auth_reason_class("too late") is None


def write_keys(path: Path, mode: int = 0o600, **orgs: dict[str, object]) -> Path:
    path.write_text(yaml.safe_dump({"organisations": orgs}), encoding="utf-8")
    path.chmod(mode)
    return path


def test_keys_file_is_loaded_and_refused_when_others_can_read_it(tmp_path: Path) -> None:
    good = write_keys(tmp_path / "orgs.yaml", **{"lab-fr": {"keys": [KEY_A.hex()], "lab_ids": ["LAB-FR-01"]}})
    orgs = load_org_keys(good)
    assert orgs["lab-fr"].keys == (KEY_A,) and orgs["lab-fr"].lab_ids == {"LAB-FR-01"}
    assert KEY_A.hex() not in repr(orgs["lab-fr"])
    readable = write_keys(tmp_path / "open.yaml", 0o644, **{"lab-fr": {"keys": [KEY_A.hex()], "lab_ids": ["L"]}})
    with pytest.raises(OrgKeysError, match="chmod 600"):
        load_org_keys(readable)
    for bad, match in [
        ({"lab-fr": {"keys": ["not hex"], "lab_ids": ["L"]}}, "hex"),
        ({"lab-fr": {"keys": ["abcd"], "lab_ids": ["L"]}}, "at least 16 bytes"),
        ({"lab-fr": {"keys": [KEY_A.hex()]}}, "neither lab_ids nor agencies"),
        ({"lab-fr": {"lab_ids": ["L"]}}, "needs `keys"),
        (  # one lab under two organisations: either could sign, correct or squat the other's reports
            {"lab-fr": {"keys": [KEY_A.hex()], "lab_ids": ["L"]}, "lab-x": {"keys": [KEY_B.hex()], "lab_ids": ["L"]}},
            "lab id 'L' is listed under organisations 'lab-fr' and 'lab-x'",
        ),
        (
            {
                "d-1": {"keys": [KEY_A.hex()], "agencies": ["Douane"]},
                "d-2": {"keys": [KEY_B.hex()], "agencies": ["Douane"]},
            },
            "agency 'Douane' is listed under organisations 'd-1' and 'd-2'",
        ),
        # the id names the organisation in notices, digests and webhooks to other agencies: no forged line, no
        # terminal escape, no reordered text (a report's names are refused these characters by the wire contract)
        ({"lab-fr\nSeverity: critical": {"keys": [KEY_A.hex()], "lab_ids": ["L"]}}, r"its id holds U\+000A"),
        (
            {"lab-\u202efr": {"keys": [KEY_A.hex()], "lab_ids": ["L"]}},
            r"organisation 'lab-\\u202efr': its id holds U\+202E",
        ),
        ({"lab-fr": {"keys": [KEY_A.hex()], "lab_ids": ["L\x1b[2J"]}}, r"the name 'L\\x1b\[2J' holds U\+001B"),
        ({"d-1": {"keys": [KEY_A.hex()], "agencies": ["Douane\u2028x"]}}, r"U\+2028"),
    ]:
        with pytest.raises(OrgKeysError, match=match):
            load_org_keys(write_keys(tmp_path / "bad.yaml", **bad))


def test_a_keys_file_that_is_not_yaml_is_refused_by_line_without_quoting_the_key(tmp_path: Path) -> None:
    """The parser's own message quotes the offending line, and the line with the stray quote is a key's:
    the worker printed the key to its log and terminal at start."""
    path = tmp_path / "orgs.yaml"
    path.write_text(f'organisations:\n  lab-fr:\n    keys: ["{KEY_A.hex()}", "{KEY_B.hex()}]\n', encoding="utf-8")
    path.chmod(0o600)
    with pytest.raises(OrgKeysError) as refused:
        load_org_keys(path)
    message = str(refused.value)
    for key in (KEY_A.hex(), KEY_B.hex()):  # not even a part of one (the parser quotes up to 75 characters)
        assert not any(key[i : i + 8] in message for i in range(len(key) - 8)), message
    assert message.startswith(f"{path}:3: not valid YAML: while scanning a quoted scalar"), message


# --- the intake ---------------------------------------------------------------------------------------


def test_intake_accepts_its_own_organisations_reports_and_refuses_forgeries_counted() -> None:
    intake = Intake(verifier=EnvelopeVerifier(ORGS))
    seizure_topic = "synthwatch.border-seizures"
    messages = [
        signed(lab(event_id="ok-1"), "lab-fr", KEY_A),
        signed(seizure(event_id="ok-2"), "douane-ml", KEY_B, topic=seizure_topic),
        # an authenticated lab reporting as another lab, and a customs service reporting a lab result
        signed(lab(event_id="f-1", lab_id="LAB-DE-07"), "lab-fr", KEY_A),
        signed(lab(event_id="f-2"), "douane-ml", KEY_B),
        # unsigned, and a signed record whose value was changed on the way
        RawMessage(f"{TOPIC}:0:9", json.dumps(lab(event_id="f-3")).encode(), TOPIC, b"FR-75C", None),
    ]
    tampered = signed(lab(event_id="f-4"), "lab-fr", KEY_A)
    assert isinstance(tampered.value, bytes)
    changed = tampered.value.replace(b"3-MMC", b"4-MMC")
    messages.append(RawMessage(tampered.source, changed, TOPIC, b"FR-75C", tampered.headers))
    result = intake.process(messages)
    assert [(e.event_id, e.org) for e in result.events] == [("ok-1", "lab-fr"), ("ok-2", "douane-ml")]
    reasons = {r.event_id or r.source: r.reason for r in result.rejects}
    assert all(r.stage == "auth" for r in result.rejects)
    assert reasons["f-1"] == "auth: not_permitted: organisation 'lab-fr' may not report as lab_id 'LAB-DE-07'"
    assert reasons["f-2"].startswith("auth: not_permitted: organisation 'douane-ml' may not report as lab_id")
    assert reasons[f"{TOPIC}:0:9"].startswith("auth: unsigned")
    assert reasons[tampered.source].startswith("auth: bad_signature")
    assert len(result.events) + len(result.rejects) + result.duplicates == len(messages)


def test_an_organisation_limited_to_its_countries_cannot_place_a_report_in_another(tmp_path: Path) -> None:
    """Alerts are routed by place: a French lab's signed report placed in Bamako raised an alert that went to Mali's
    officers (a critical one at once, for an opioid). With ``countries`` in the keys file it is refused."""
    path = write_keys(
        tmp_path / "orgs.yaml",
        **{
            "lab-fr": {"keys": [KEY_A.hex()], "lab_ids": ["LAB-FR-01"], "countries": ["FR"]},
            "douane-ml": {"keys": [KEY_B.hex()], "agencies": ["Douanes maliennes"]},  # no list: any country
        },
    )
    orgs = load_org_keys(path)
    assert orgs["lab-fr"].countries == {"FR"} and orgs["douane-ml"].countries == frozenset()
    intake = Intake(verifier=EnvelopeVerifier(orgs))
    bamako = {"country": "ML", "region": "ML-BKO"}
    result = intake.process(
        [
            signed(lab(event_id="fr-in-fr"), "lab-fr", KEY_A),
            signed(lab(event_id="fr-in-ml", **bamako), "lab-fr", KEY_A),
            signed(seizure(event_id="ml-in-fr"), "douane-ml", KEY_B, topic="synthwatch.border-seizures"),
        ]
    )
    assert [e.event_id for e in result.events] == ["fr-in-fr", "ml-in-fr"]
    (refused,) = result.rejects
    assert (refused.event_id, refused.stage) == ("fr-in-ml", "auth")
    assert refused.reason == (
        "auth: not_permitted: organisation 'lab-fr' may not report for country 'ML' (its countries: FR)"
    )
    for bad in ("FR", [], ["fr"], ["FRA"], [False], ["UK"]):  # YAML 1.1 reads a bare NO as false; UK is GB
        entry = {"keys": [KEY_A.hex()], "lab_ids": ["L"], "countries": bad}
        with pytest.raises(OrgKeysError, match="countries is a list of ISO 3166-1 alpha-2 codes"):
            load_org_keys(write_keys(tmp_path / "bad.yaml", **{"lab-fr": entry}))


def test_intake_without_a_verifier_reads_unsigned_records_as_before() -> None:
    result = Intake().process([RawMessage("t:0:1", json.dumps(lab()).encode())])
    assert len(result.events) == 1 and result.events[0].org is None and not result.rejects


# --- learnt names need more than one reporter -------------------------------------------------------------


def _key(smiles: str) -> str:
    return SubstanceResolver().resolve("x", smiles=smiles).key


def test_a_name_from_one_reporter_is_provisional_until_another_confirms_it() -> None:
    resolver = SubstanceResolver(corroboration=2)
    resolver.resolve("Blue Dragon", smiles=PENTYLOXY_NITAZENE, reporter="org:lab-fr")
    first = resolver.resolve("blue dragon")
    assert first.resolved_by == "learnt_name" and first.provisional and first.key == _key(PENTYLOXY_NITAZENE)
    resolver.resolve("BLUE DRAGON", smiles=PENTYLOXY_NITAZENE, reporter="org:lab-fr")  # the same reporter again
    assert resolver.resolve("blue dragon").provisional
    resolver.resolve("blue-dragon", smiles=PENTYLOXY_NITAZENE, reporter="org:lab-de")
    settled = resolver.resolve("blue dragon")
    assert settled.key == first.key and not settled.provisional
    # once corroborated, a different structure from anyone does not take the name over
    resolver.resolve("blue dragon", smiles=FENTANYL, reporter="org:forger")
    assert resolver.resolve("blue dragon").key == first.key and resolver.contested_names() == {}


def test_a_conflicting_structure_makes_a_provisional_name_contested_not_overridden() -> None:
    resolver = SubstanceResolver(corroboration=2)
    resolver.resolve("blue dragon", smiles=FENTANYL, reporter="org:forger")  # first, and wrong
    resolver.resolve("blue dragon", smiles=PENTYLOXY_NITAZENE, reporter="org:lab-fr")
    by_name = resolver.resolve("blue dragon")
    assert by_name.resolved_by == "unresolved_name" and by_name.key == "name:bluedragon"
    assert resolver.contested_names() == {"bluedragon": {_key(FENTANYL), _key(PENTYLOXY_NITAZENE)}}
    # later reports do not quietly settle it either way; structure reports still resolve by structure
    resolver.resolve("blue dragon", smiles=PENTYLOXY_NITAZENE, reporter="org:lab-de")
    assert resolver.resolve("blue dragon").key == "name:bluedragon"
    assert resolver.resolve("blue dragon", smiles=FENTANYL).key == _key(FENTANYL)


def test_first_sighting_still_wins_without_corroboration_and_replay_matches_live() -> None:
    resolver = SubstanceResolver()  # corroboration=1: trusted batch loads, as before
    resolver.resolve("blue dragon", smiles=PENTYLOXY_NITAZENE)
    resolver.resolve("blue dragon", smiles=FENTANYL)
    assert not resolver.resolve("blue dragon").provisional
    assert resolver.learnt_names() == {"bluedragon": _key(PENTYLOXY_NITAZENE)}

    live, replayed = SubstanceResolver(corroboration=2), SubstanceResolver(corroboration=2)
    evidence = [("Blue Dragon", PENTYLOXY_NITAZENE, "lab:A"), ("Pink", FENTANYL, "lab:A"), ("Pink", FENTANYL, "lab:B")]
    evidence += [("Grey", FENTANYL, "lab:A"), ("grey", PENTYLOXY_NITAZENE, "lab:B")]
    for name, smiles, reporter in evidence:
        live.resolve(name, smiles=smiles, reporter=reporter)
        replayed.observe_name(name, _key(smiles), reporter)
    for resolver in (live, replayed):
        assert resolver.provisional_names() == {"bluedragon": _key(PENTYLOXY_NITAZENE)}
        assert resolver.learnt_names() == {"bluedragon": _key(PENTYLOXY_NITAZENE), "pink": _key(FENTANYL)}
        assert set(resolver.contested_names()) == {"grey"}


def test_intake_counts_a_signed_organisation_once_whatever_lab_id_it_uses() -> None:
    two_labs = {"lab-fr": Organisation("lab-fr", (KEY_A,), frozenset({"LAB-FR-01", "LAB-FR-02"}), frozenset())}
    intake = Intake(SubstanceResolver(corroboration=2), verifier=EnvelopeVerifier(two_labs))
    records = [
        lab(event_id="a", lab_id="LAB-FR-01", substance={"name": "Blue Dragon", "smiles": FENTANYL}),
        lab(event_id="b", lab_id="LAB-FR-02", substance={"name": "Blue Dragon", "smiles": FENTANYL}),
    ]
    result = intake.process(signed(r, "lab-fr", KEY_A) for r in records)
    assert len(result.events) == 2
    assert intake.resolver.resolve("blue dragon").provisional  # one organisation, two lab ids: not corroborated
    assert intake.stored_reporter("lab:LAB-FR-02") == "org:lab-fr" and intake.stored_reporter("lab:X") == "lab:X"


# --- after a restart: the same rules replayed from what ClickHouse stored ---------------------------------


@pytest.mark.integration
def test_restart_replays_name_evidence_from_clickhouse(ch: Any) -> None:
    from synthwatch.stream_apps.storage.clickhouse import migrate
    from synthwatch.stream_apps.storage.sink import ClickHouseSink
    from synthwatch.stream_apps.storage.state_rebuild import learn_names

    migrate(ch)
    orgs = {
        "lab-fr": Organisation("lab-fr", (KEY_A,), frozenset({"LAB-FR-01", "LAB-FR-02"}), frozenset()),
        "lab-de": Organisation("lab-de", (KEY_B,), frozenset({"LAB-DE-07"}), frozenset()),
    }
    live = Intake(SubstanceResolver(corroboration=2), verifier=EnvelopeVerifier(orgs))
    reports = [  # (event, lab, name, smiles, organisation, key), in the order they occurred
        ("r1", "LAB-FR-01", "Blue Dragon", PENTYLOXY_NITAZENE, "lab-fr", KEY_A),
        ("r2", "LAB-FR-02", "Blue Dragon", PENTYLOXY_NITAZENE, "lab-fr", KEY_A),  # same organisation again
        ("r3", "LAB-FR-01", "Pink", FENTANYL, "lab-fr", KEY_A),
        ("r4", "LAB-DE-07", "Pink", FENTANYL, "lab-de", KEY_B),  # confirmed by another organisation
        ("r5", "LAB-FR-01", "Grey", FENTANYL, "lab-fr", KEY_A),
        ("r6", "LAB-DE-07", "Grey", PENTYLOXY_NITAZENE, "lab-de", KEY_B),  # contested
    ]
    messages = [
        signed(
            lab(
                event_id=event,
                lab_id=lab_id,
                occurred_at=f"2026-03-0{i + 1}T09:00:00Z",
                substance={"name": name, "smiles": smiles},
            ),
            org,
            key,
        )
        for i, (event, lab_id, name, smiles, org, key) in enumerate(reports)
    ]
    batch = live.process(messages)
    assert len(batch.events) == len(reports)
    ClickHouseSink(ch).store_events(batch.events)

    restarted = Intake(SubstanceResolver(corroboration=2), verifier=EnvelopeVerifier(orgs))
    learn_names(ch, restarted.resolver, restarted.stored_reporter)
    for resolver in (live.resolver, restarted.resolver):
        assert resolver.provisional_names() == {"bluedragon": _key(PENTYLOXY_NITAZENE)}
        assert resolver.learnt_names() == {"bluedragon": _key(PENTYLOXY_NITAZENE), "pink": _key(FENTANYL)}
        assert set(resolver.contested_names()) == {"grey"}
