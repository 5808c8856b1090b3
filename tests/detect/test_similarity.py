"""Nearest known substances, family guesses and "did you mean": what a chemist asks about a new structure."""

from __future__ import annotations

import pytest

from synthwatch.catalogue import CatalogueEntry, shipped_catalogue
from synthwatch.stream_apps.detect.identity import structure_from_smiles
from synthwatch.stream_apps.detect.similarity import SimilarityIndex, closest_names, fingerprint, guess_family

CATALOGUE = {entry.name: entry for entry in shipped_catalogue()}
# Etonitazene with a propyl linker: no SMARTS pattern matches (the nitazene one wants 2-aminoethyl).
HOMO_ETONITAZENE = "CCOc1ccc(Cc2nc3cc([N+](=O)[O-])ccc3n2CCCN(CC)CC)cc1"
BZO_HEXOXIZID = "CCCCCCN1C(=O)C(=NNC(=O)c2ccccc2)c2ccccc21"  # an OXIZID cannabinoid: no close relative known


def without(*names: str) -> SimilarityIndex:
    """An index of the catalogue as if ``names`` had never been seen: each is the new substance."""
    return SimilarityIndex(entry for entry in shipped_catalogue() if entry.name not in names)


def ranking(index: SimilarityIndex, name: str, k: int = 3) -> list[str]:
    return [n.name for n in index.nearest(CATALOGUE[name].smiles, k)]


@pytest.mark.parametrize(
    ("new", "expected"),
    [
        # the nitazene isomers and homologues: the alkoxy chain decides the order
        ("Isotonitazene", ["Metonitazene", "Etonitazene", "Butonitazene"]),
        ("Protonitazene", ["Butonitazene", "Etonitazene", "Metonitazene"]),
        ("Metonitazene", ["Etonitazene", "Butonitazene", "Isotonitazene"]),
        # positional isomers are different substances, and each other's nearest cathinones
        ("3-MMC", ["3-CMC", "Mephedrone", "4-CMC"]),
        ("Mephedrone", ["4-CMC", "3-MMC", "3-CMC"]),
        # indazole-3-carboxamides: tail and head groups
        ("ADB-BUTINACA", ["MDMB-4en-PINACA", "4F-MDMB-BINACA", "AB-FUBINACA"]),
        ("MDMB-4en-PINACA", ["4F-MDMB-BINACA", "ADB-BUTINACA", "5F-MDMB-PICA"]),
    ],
)
def test_a_new_analogue_finds_its_known_relatives_in_the_expected_order(new: str, expected: list[str]) -> None:
    index = without(new)
    assert new not in {n.name for n in index.nearest(CATALOGUE[new].smiles, 10)}
    assert ranking(index, new) == expected
    neighbours = index.nearest(CATALOGUE[new].smiles, 3)
    assert all(n.family == CATALOGUE[new].family and n.catalogued for n in neighbours)
    assert [n.score for n in neighbours] == sorted((n.score for n in neighbours), reverse=True)
    assert 0.5 < neighbours[0].score < 1.0


def test_the_substance_itself_is_never_its_own_neighbour_even_as_a_salt() -> None:
    index = SimilarityIndex()
    salt = CATALOGUE["Mephedrone"].smiles + ".Cl"
    assert "Mephedrone" not in {n.name for n in index.nearest(salt, 10)}
    assert index.nearest(salt, 1)[0].name == "4-CMC"


def test_a_structure_no_pattern_matches_gets_a_family_guess_marked_as_one() -> None:
    structure = structure_from_smiles(HOMO_ETONITAZENE)
    assert not isinstance(structure, str) and structure.family is None  # the SMARTS miss it
    neighbours = SimilarityIndex().nearest(HOMO_ETONITAZENE, 3)
    guess = guess_family(neighbours)
    assert guess is not None and guess.family == "nitazene" and guess.nearest == "Etonitazene"
    assert guess.describe().startswith("nitazene (a guess: nearest known Etonitazene, similarity 0.9")


def test_no_guess_when_nothing_known_is_close() -> None:
    neighbours = SimilarityIndex().nearest(BZO_HEXOXIZID, 3)
    assert neighbours and all(n.score < 0.45 for n in neighbours)
    assert guess_family(neighbours) is None


def test_learnt_structures_join_the_index_once_and_are_marked_as_not_catalogued() -> None:
    index = SimilarityIndex()
    size = len(index)
    structure = structure_from_smiles(HOMO_ETONITAZENE)
    assert not isinstance(structure, str)
    assert index.add(structure.key, HOMO_ETONITAZENE, "unknown-eto-3", None)
    assert not index.add(structure.key, HOMO_ETONITAZENE, "again", None)  # once per key
    assert not index.add("BADKEY", "not a smiles", "x", None)
    assert len(index) == size + 1 and structure.key in index
    nearest = index.nearest(CATALOGUE["Etonitazene"].smiles, 1)[0]
    assert (nearest.name, nearest.catalogued, nearest.family) == ("unknown-eto-3", False, None)


def test_bad_structures_have_no_fingerprint_and_no_neighbours() -> None:
    assert fingerprint("C1CC") is None and fingerprint("") is None
    assert SimilarityIndex().nearest("not a smiles") == []
    assert SimilarityIndex(()).nearest(CATALOGUE["Mephedrone"].smiles) == []


def test_the_index_refuses_a_catalogue_entry_with_a_bad_structure() -> None:
    bad = CatalogueEntry(name="Broken", smiles="C1CC", family="other", controlled=False, nps=True)
    with pytest.raises(ValueError, match="Broken"):
        SimilarityIndex([bad])


def test_did_you_mean_prefers_what_was_typed_then_the_closest_spelling() -> None:
    names = [name for entry in shipped_catalogue() for name in (entry.name, *entry.synonyms)]
    assert closest_names("Eto", names)[0].startswith("Eto")
    assert all(n.casefold().startswith("eto") for n in closest_names("eto", names))
    assert closest_names("isotonitazen", names)[0] == "Isotonitazene"
    assert closest_names("Mefedrone", names)[0] in {"Mephedrone", "méphédrone"}
    assert closest_names("zzzzqqq", names) == [] and closest_names("  ", names) == []
