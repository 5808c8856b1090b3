"""Substance identity: one key per substance whatever the spelling, salt or stereo of the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rdkit import Chem

from synthwatch.catalogue import CatalogueEntry, shipped_catalogue
from synthwatch.stream_apps.detect.backtest import run_file
from synthwatch.stream_apps.detect.identity import (
    SMILES_ERROR,
    SubstanceResolver,
    normalise_name,
    normalise_quantity,
    strip_salt_words,
    structure_from_smiles,
)
from tests.support.factories import lab

CATALOGUE = shipped_catalogue()
ENTRIES = st.sampled_from(CATALOGUE)
SEEDS = st.integers(min_value=0, max_value=2**31 - 1)
RESOLVER = SubstanceResolver()  # read-only use in property tests; tests that learn build their own

ISOTONITAZENE = "CCN(CC)CCn1c(Cc2ccc(OC(C)C)cc2)nc2cc([N+](=O)[O-])ccc21"
PENTYLOXY_NITAZENE = "CCN(CC)CCn1c(Cc2ccc(OCCCCC)cc2)nc2cc([N+](=O)[O-])ccc21"
FENTANYL = "CCC(=O)N(c1ccccc1)C1CCN(CCc2ccccc2)CC1"
# Hydrochloride, hydrated hydrochloride, hydrobromide, sulfate, citrate.
SALTS = (".Cl", ".O.Cl", ".Br", ".OS(=O)(=O)O", ".OC(=O)CC(O)(CC(O)=O)C(O)=O")


def _key(smiles: str) -> str:
    structure = structure_from_smiles(smiles)
    assert not isinstance(structure, str), smiles
    return structure.key


@settings(max_examples=150, deadline=None)
@given(entry=ENTRIES, seed=SEEDS)
def test_key_invariant_under_random_smiles(entry: CatalogueEntry, seed: int) -> None:
    mol = Chem.MolFromSmiles(entry.smiles)
    rewritten = Chem.MolToRandomSmilesVect(mol, 1, randomSeed=seed)[0]
    assert _key(rewritten) == _key(entry.smiles)


@settings(max_examples=60, deadline=None)
@given(entry=ENTRIES, seed=SEEDS)
def test_key_invariant_under_kekule_smiles(entry: CatalogueEntry, seed: int) -> None:
    mol = Chem.MolFromSmiles(entry.smiles)
    Chem.Kekulize(mol, clearAromaticFlags=True)
    kekule = Chem.MolToRandomSmilesVect(mol, 1, randomSeed=seed, kekuleSmiles=True)[0]
    assert _key(kekule) == _key(entry.smiles)
    assert _key(Chem.MolToSmiles(mol, kekuleSmiles=True)) == _key(entry.smiles)


@settings(max_examples=60, deadline=None)
@given(entry=ENTRIES)
def test_key_invariant_under_stereo_removal(entry: CatalogueEntry) -> None:
    mol = Chem.MolFromSmiles(entry.smiles)
    Chem.RemoveStereochemistry(mol)
    assert _key(Chem.MolToSmiles(mol)) == _key(entry.smiles)


@settings(max_examples=80, deadline=None)
@given(entry=ENTRIES, salt=st.sampled_from(SALTS))
def test_key_and_family_invariant_under_salt_forms(entry: CatalogueEntry, salt: str) -> None:
    plain = RESOLVER.resolve(entry.name, smiles=entry.smiles)
    salted = RESOLVER.resolve(entry.name, smiles=entry.smiles + salt)
    assert (salted.key, salted.family, salted.display_name) == (plain.key, plain.family, plain.display_name)


def test_protonated_salt_is_the_free_base() -> None:
    assert _key("C[NH2+]C(C)Cc1ccccc1.[Cl-]") == _key("CNC(C)Cc1ccccc1")


def test_isotopes_do_not_change_the_key() -> None:
    assert _key("[2H]C([2H])([2H])NC(C)Cc1ccccc1") == _key("CNC(C)Cc1ccccc1")


def test_bad_smiles_is_silent(capfd: pytest.CaptureFixture[str]) -> None:
    assert structure_from_smiles("C1CC(N=") == SMILES_ERROR
    assert capfd.readouterr().err == ""


@st.composite
def respelt(draw: st.DrawFn, name: str) -> str:
    """The same name with random case, and spaces or hyphens sprinkled in and around it."""
    out = []
    for ch in name:
        out.append(ch.upper() if draw(st.booleans()) else ch.lower())
        out.append(draw(st.sampled_from(["", "", "", " ", "-", "\u2011", "  "])))
    return draw(st.sampled_from(["", " ", "\t"])) + "".join(out) + draw(st.sampled_from(["", " "]))


@settings(max_examples=150, deadline=None)
@given(data=st.data(), entry=ENTRIES)
def test_name_case_spacing_and_punctuation_invariance(data: st.DataObject, entry: CatalogueEntry) -> None:
    alias = data.draw(st.sampled_from((entry.name, *entry.synonyms)))
    spelt = data.draw(respelt(alias))
    resolved = RESOLVER.resolve(spelt)
    assert resolved.resolved_by == "catalogue_name"
    assert resolved.key == RESOLVER.resolve(entry.name).key
    assert resolved.display_name == entry.name


def test_normalise_name_examples() -> None:
    assert normalise_name("3-MMC") == normalise_name("3 mmc") == normalise_name(" 3\u2011Mmc ") == "3mmc"
    assert normalise_name("Cocaïne") == normalise_name("cocaine")
    assert normalise_name("MÉPHÉDRONE") == "mephedrone"


def test_smiles_beats_name() -> None:
    resolved = SubstanceResolver().resolve("cocaine", smiles=FENTANYL)
    assert resolved.display_name == "Fentanyl"
    assert resolved.resolved_by == "structure"
    assert resolved.key == _key(FENTANYL)


def test_smiles_beats_inchikey() -> None:
    resolved = SubstanceResolver().resolve("x", smiles=FENTANYL, inchikey="ZPUCINDJVBIVPJ-LJISPDSOSA-N")
    assert resolved.display_name == "Fentanyl"


def test_inchikey_only_report() -> None:
    inchikey = Chem.MolToInchiKey(Chem.MolFromSmiles(ISOTONITAZENE))
    resolved = SubstanceResolver().resolve("white powder", inchikey=inchikey.lower())
    assert resolved.key == inchikey[:14]
    assert resolved.inchikey == inchikey
    assert resolved.display_name == "Isotonitazene"
    assert resolved.family == "nitazene" and resolved.catalogued and resolved.resolved_by == "structure"


def test_name_only_catalogued_synonym() -> None:
    resolved = SubstanceResolver().resolve("Meow Meow")
    mephedrone = Chem.MolToInchiKey(Chem.MolFromSmiles("CNC(C)C(=O)c1ccc(C)cc1"))
    assert resolved.key == mephedrone[:14]
    assert resolved.inchikey == mephedrone
    assert resolved.family == "synthetic_cathinone"
    assert resolved.display_name == "Mephedrone"
    assert resolved.controlled is True and resolved.catalogued and resolved.resolved_by == "catalogue_name"


def test_a_catalogue_indexed_after_construction_resolves_as_one_given_to_the_constructor() -> None:
    """The worker makes its resolver with ``catalogue=()`` and indexes the catalogue in its join wait."""
    later = SubstanceResolver(catalogue=(), corroboration=2)
    assert later.resolve("Meow Meow").catalogued is False  # nothing indexed yet
    later.add_catalogue(CATALOGUE)
    at_once = SubstanceResolver(catalogue=CATALOGUE, corroboration=2)
    for entry in CATALOGUE:
        for spelling in (entry.name, *entry.synonyms):
            assert later.resolve(spelling) == at_once.resolve(spelling)
        assert later.resolve(None, smiles=entry.smiles) == at_once.resolve(None, smiles=entry.smiles)
    for resolver in (later, at_once):  # learning still refuses catalogue names, and learns new ones alike
        assert resolver.resolve("Mephedrone", smiles=FENTANYL).display_name == "Fentanyl"
        resolver.resolve("blue dragon", smiles=PENTYLOXY_NITAZENE, reporter="lab:a")
    assert later.learnt_names() == at_once.learnt_names()
    assert later.resolve("blue dragon") == at_once.resolve("blue dragon")


def test_learnt_names() -> None:
    resolver = SubstanceResolver()
    first = resolver.resolve("Blue Dragon", smiles=PENTYLOXY_NITAZENE)
    later = resolver.resolve("blue-dragon")
    assert later.key == first.key and later.resolved_by == "learnt_name" and later.family == "nitazene"
    assert resolver.learnt_names() == {"bluedragon": first.key}

    rebuilt = SubstanceResolver()
    for name, key in resolver.learnt_names().items():
        assert rebuilt.learn(name, key, family=resolver.family_of(key))
    assert rebuilt.resolve("BLUE DRAGON").key == first.key
    assert rebuilt.resolve("BLUE DRAGON").family == "nitazene"


def test_first_learnt_name_wins_and_catalogue_names_are_never_learnt() -> None:
    resolver = SubstanceResolver()
    resolver.resolve("blue dragon", smiles=PENTYLOXY_NITAZENE)
    resolver.resolve("blue dragon", smiles=FENTANYL)
    resolver.resolve("cocaine", smiles=FENTANYL)  # a mislabelled sample must not redefine "cocaine"
    resolver.resolve("unknown", smiles=FENTANYL)  # placeholders are never learnt
    assert resolver.learnt_names() == {"bluedragon": _key(PENTYLOXY_NITAZENE)}
    assert resolver.resolve("cocaine").display_name == "Cocaine"
    assert not resolver.learn("coke", _key(FENTANYL))
    with pytest.raises(ValueError):
        resolver.learn("anything", "name:anything")


def test_unresolved_name_key() -> None:
    resolved = SubstanceResolver().resolve("  Purple Haze-7 ")
    assert resolved.key == "name:purplehaze7"
    assert resolved.resolved_by == "unresolved_name"
    assert resolved.inchikey is None and resolved.family is None
    assert resolved.controlled is None and not resolved.catalogued


def test_bad_smiles_falls_back_with_structure_error() -> None:
    resolver = SubstanceResolver()
    by_name = resolver.resolve("ketamine", smiles="C1CC(N")
    assert by_name.structure_error == SMILES_ERROR
    assert by_name.display_name == "Ketamine" and by_name.resolved_by == "catalogue_name"

    inchikey = Chem.MolToInchiKey(Chem.MolFromSmiles(FENTANYL))
    by_key = resolver.resolve("mystery", smiles="not-a-smiles", inchikey=inchikey)
    assert by_key.structure_error == SMILES_ERROR and by_key.display_name == "Fentanyl"

    unresolved = resolver.resolve("mystery 2", smiles="Xx")
    assert unresolved.structure_error == SMILES_ERROR and unresolved.key == "name:mystery2"
    assert resolver.learnt_names() == {"mystery": inchikey[:14]}


def test_fentanyl_is_fentanyl_not_phenethylamine() -> None:
    assert SubstanceResolver().resolve("x", smiles=FENTANYL).family == "fentanyl"


def test_bupropion_is_a_cathinone_but_not_controlled() -> None:
    resolved = SubstanceResolver().resolve("", smiles="CC(NC(C)(C)C)C(=O)c1cccc(Cl)c1")
    assert resolved.family == "synthetic_cathinone"
    assert resolved.controlled is False and resolved.display_name == "Bupropion"


def test_new_nitazene_analogue_is_a_nitazene_and_not_catalogued() -> None:
    resolved = SubstanceResolver().resolve("pentyloxy-isotonitazene", smiles=PENTYLOXY_NITAZENE)
    assert resolved.family == "nitazene"
    assert not resolved.catalogued and resolved.controlled is None
    assert resolved.key != _key(ISOTONITAZENE)
    assert resolved.display_name == "pentyloxy-isotonitazene"


def test_quantities() -> None:
    assert normalise_quantity(2.5, "kg").grams == pytest.approx(2500)
    assert normalise_quantity(250, "mg").grams == pytest.approx(0.25)
    assert normalise_quantity(1, "l").millilitres == pytest.approx(1000)
    assert normalise_quantity(500, "ml").millilitres == pytest.approx(500)
    tablets = normalise_quantity(40, "tablets")
    assert (tablets.units, tablets.grams, tablets.millilitres) == (40, None, None)
    assert normalise_quantity(3, "blotters").units == 3


def test_the_wire_units_table_holds_pints_own_factors() -> None:
    """The table that spares pint's import for the wire's units gives exactly what pint gives, for every one."""
    from typing import get_args

    from synthwatch.schemas.events import QuantityUnit
    from synthwatch.stream_apps.detect.identity import COUNT_UNITS, WIRE_UNIT_FACTORS, _pint_factor

    measured = {u for u in get_args(QuantityUnit) if normalise_name(u) not in COUNT_UNITS}
    assert set(WIRE_UNIT_FACTORS) == measured
    for unit, factor in WIRE_UNIT_FACTORS.items():
        assert _pint_factor(unit) == factor, unit
    assert normalise_quantity(3, "ounce").grams == 3 * _pint_factor("ounce")[1]  # other units: pint


@pytest.mark.parametrize(("value", "unit"), [(1, "parsec"), (1, "furlongs per fortnight"), (-1, "g")])
def test_bad_quantities_are_rejected(value: float, unit: str) -> None:
    with pytest.raises(ValueError):
        normalise_quantity(value, unit)


def _uncached_structure(smiles: str) -> tuple[str, str, str | None]:
    """The standardisation done from scratch (no per-molecule cache): what the cached path must equal."""
    from synthwatch.stream_apps.detect.families import classify
    from synthwatch.stream_apps.detect.identity import _parent

    parent = _parent(Chem.MolFromSmiles(smiles))
    inchikey = Chem.MolToInchiKey(parent)
    return inchikey[:14], inchikey, classify(parent)


@settings(max_examples=150, deadline=None)
@given(entry=ENTRIES, seed=SEEDS, salt=st.sampled_from(("", *SALTS)), kekule=st.booleans())
def test_molecule_cache_gives_what_standardising_each_spelling_gives(
    entry: CatalogueEntry, seed: int, salt: str, kekule: bool
) -> None:
    mol = Chem.MolFromSmiles(entry.smiles)
    if kekule:
        Chem.Kekulize(mol, clearAromaticFlags=True)
    spelling = Chem.MolToRandomSmilesVect(mol, 1, randomSeed=seed, kekuleSmiles=kekule)[0] + salt
    structure = structure_from_smiles(spelling)
    assert not isinstance(structure, str), spelling
    assert (structure.key, structure.inchikey, structure.family) == _uncached_structure(spelling)


# Spellings labs really use for salts and forms of catalogued substances (English, French, abbreviations).
SALT_SPELLINGS: list[tuple[str, str]] = [
    ("Mephedrone HCl", "Mephedrone"),
    ("mephedrone hydrochloride", "Mephedrone"),
    ("MEPHEDRONE HYDROCHLORIDE", "Mephedrone"),
    ("4-MMC HCl", "Mephedrone"),
    ("4-MMC.HCl", "Mephedrone"),
    ("chlorhydrate de méphédrone", "Mephedrone"),
    ("Méphédrone (chlorhydrate)", "Mephedrone"),
    ("MDMA hemifumarate", "MDMA"),
    ("MDMA·HCl", "MDMA"),
    ("sel de MDMA", "MDMA"),
    ("bromhydrate de MDMA", "MDMA"),
    ("Cocaine base", "Cocaine"),
    ("cocaine freebase", "Cocaine"),
    ("Cocaine free base", "Cocaine"),
    ("cocaïne base libre", "Cocaine"),
    ("Amphetamine sulphate", "Amphetamine"),
    ("amphétamine sulfate", "Amphetamine"),
    ("Ketamine hydrochloride", "Ketamine"),
    ("kétamine chlorhydrate", "Ketamine"),
    ("Fentanyl citrate", "Fentanyl"),
    ("citrate de fentanyl", "Fentanyl"),
    ("Heroin HCl salt", "Heroin"),
    ("Tramadol hydrochloride", "Tramadol"),
    ("Isotonitazene citrate", "Isotonitazene"),
    ("Methamphetamine HBr", "Methamphetamine"),
    ("Codeine phosphate", "Codeine"),
    ("codéine phosphate hémihydrate", "Codeine"),
    ("Morphine sulfate", "Morphine"),
    ("LSD tartrate", "LSD"),
    ("3-MMC (HCl)", "3-MMC"),
]


@pytest.mark.parametrize(("spelling", "catalogued"), SALT_SPELLINGS)
def test_salt_and_form_words_resolve_to_the_catalogued_substance(spelling: str, catalogued: str) -> None:
    resolved = SubstanceResolver().resolve(spelling)
    assert (resolved.display_name, resolved.resolved_by, resolved.catalogued) == (catalogued, "catalogue_name", True)


def test_a_name_made_only_of_salt_words_is_kept_whole() -> None:
    assert strip_salt_words("Hydrochloride") == "hydrochloride"
    assert SubstanceResolver().resolve("base").key == "name:base"
    # a salt word at the start of a name is left alone without the French "de"/"d'" that makes it a salt
    assert strip_salt_words("Basetamine HCl") == "basetamine"
    # as indifferent to spacing and punctuation as name resolution (hypothesis found "hydrochlorid e")
    assert strip_salt_words("cocaine hydrochlorid e") == strip_salt_words("Cocaine (HCl)") == "cocaine"


def test_salt_words_do_not_split_a_learnt_name() -> None:
    resolver = SubstanceResolver()
    key = resolver.resolve("Novelone HCl", smiles=PENTYLOXY_NITAZENE).key
    assert resolver.resolve("novelone hydrochloride").key == key
    assert resolver.resolve("chlorhydrate de novelone").resolved_by == "learnt_name"


def test_a_structure_needs_no_name() -> None:
    resolver = SubstanceResolver()
    by_smiles = resolver.resolve(None, smiles=FENTANYL + ".Cl")
    assert (by_smiles.display_name, by_smiles.catalogued) == ("Fentanyl", True)
    unknown = resolver.resolve("", smiles=PENTYLOXY_NITAZENE)
    assert unknown.display_name == unknown.key and unknown.family == "nitazene"
    assert resolver.learnt_names() == {}  # the missing name is never learnt
    bad = resolver.resolve(None, smiles="C1CC(")
    assert bad.key == "name:c1cc" and bad.structure_error == SMILES_ERROR


def test_salt_spellings_raise_no_never_seen_alerts(tmp_path: Path) -> None:
    """The issue's report: "Mephedrone HCl" by name raised "Never seen by the network"; only the first
    report of mephedrone (any spelling) is news now."""
    lines = [
        json.dumps(lab(event_id=f"salt-{i}", occurred_at=f"2026-03-{i + 2:02d}T09:00:00Z", substance={"name": n}))
        for i, (n, catalogued) in enumerate(SALT_SPELLINGS)
        if catalogued == "Mephedrone"
    ]
    source = tmp_path / "salts.ndjson"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    run = run_file(source, tmp_path / "alerts.ndjson")
    new = [a for a in run.alerts if a.alert_type == "new_substance"]
    assert len(lines) >= 5 and not run.rejects
    assert [(a.substance.name, a.evidence_event_ids) for a in new] == [("Mephedrone", ["salt-0"])]
