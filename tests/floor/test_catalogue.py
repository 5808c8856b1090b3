"""The shipped catalogue is chemically right and unambiguous: the resolver trusts it blindly."""

from __future__ import annotations

from collections import defaultdict
from importlib import resources
from pathlib import Path

import pytest
from rdkit import Chem
from rdkit.Chem.rdMolDescriptors import CalcMolFormula

from synthwatch.catalogue import CatalogueEntry, shipped_catalogue
from synthwatch.stream_apps.detect.families import classify
from synthwatch.stream_apps.detect.identity import SubstanceResolver, normalise_name, structure_from_smiles

CATALOGUE = shipped_catalogue()
BY_NAME = {entry.name: entry for entry in CATALOGUE}

# Declared family -> what the SMARTS classifier may say instead. Empty on purpose: every shipped family is
# expressible by a pattern. Add an entry (with a comment why) only for a family SMARTS cannot express.
FAMILY_EXCEPTIONS: dict[str, str | None] = {}

# Reference molecular formulae (literature values) for a spread of entries: catches a wrong-but-valid SMILES.
FORMULAE = {
    "Cocaine": "C17H21NO4",
    "Heroin": "C21H23NO5",
    "Morphine": "C17H19NO3",
    "Methadone": "C21H27NO",
    "Tramadol": "C16H25NO2",
    "MDMA": "C11H15NO2",
    "THC": "C21H30O2",
    "LSD": "C20H25N3O",
    "Ketamine": "C13H16ClNO",
    "Alprazolam": "C17H13ClN4",
    "Fentanyl": "C22H28N2O",
    "Carfentanil": "C24H30N2O3",
    "Ocfentanil": "C22H27FN2O2",
    "Isotonitazene": "C23H30N4O3",
    "Protonitazene": "C23H30N4O3",
    "Etonitazepyne": "C22H26N4O3",
    "N-Desethyl isotonitazene": "C21H26N4O3",
    "Brorphine": "C20H22BrN3O",
    "U-47700": "C16H22Cl2N2O",
    "Mephedrone": "C11H15NO",
    "3-MMC": "C11H15NO",
    "3-CMC": "C10H12ClNO",
    "alpha-PVP": "C15H21NO",
    "MDPV": "C16H21NO3",
    "Bupropion": "C13H18ClNO",
    "MDMB-4en-PINACA": "C20H27N3O3",
    "ADB-BUTINACA": "C18H26N4O2",
    "5F-MDMB-PICA": "C21H29FN2O3",
    "JWH-018": "C24H23NO",
    "Bromazolam": "C17H13BrN4",
    "Etizolam": "C17H15ClN4S",
    "Clonazolam": "C17H12ClN5O2",
    "Methoxetamine": "C15H21NO2",
    "5-MeO-DMT": "C13H18N2O",
    "25I-NBOMe": "C18H22INO3",
    "Xylazine": "C12H16N2S",
}


def _ids(entry: CatalogueEntry) -> str:
    return entry.name


def test_catalogue_is_substantial() -> None:
    assert len(CATALOGUE) >= 50


@pytest.mark.parametrize("entry", CATALOGUE, ids=_ids)
def test_smiles_is_a_neutral_parent_compound(entry: CatalogueEntry) -> None:
    mol = Chem.MolFromSmiles(entry.smiles)
    assert mol is not None, entry.smiles
    assert "." not in entry.smiles, "parent compound only: no salts or solvents"
    assert Chem.GetFormalCharge(mol) == 0, "free base: net neutral"


@pytest.mark.parametrize("name", sorted(FORMULAE))
def test_molecular_formula(name: str) -> None:
    assert CalcMolFormula(Chem.MolFromSmiles(BY_NAME[name].smiles)) == FORMULAE[name]


def test_structure_keys_are_unique() -> None:
    owners: dict[str, list[str]] = defaultdict(list)
    for entry in CATALOGUE:
        structure = structure_from_smiles(entry.smiles)
        assert not isinstance(structure, str), entry.name
        owners[structure.key].append(entry.name)
    assert {key: names for key, names in owners.items() if len(names) > 1} == {}


def test_names_and_synonyms_do_not_collide_across_entries() -> None:
    owners: dict[str, set[str]] = defaultdict(set)
    for entry in CATALOGUE:
        for alias in (entry.name, *entry.synonyms):
            assert normalise_name(alias), f"{entry.name}: alias {alias!r} normalises to nothing"
            owners[normalise_name(alias)].add(entry.name)
    assert {alias: names for alias, names in owners.items() if len(names) > 1} == {}


@pytest.mark.parametrize("entry", CATALOGUE, ids=_ids)
def test_smarts_family_matches_declared_family(entry: CatalogueEntry) -> None:
    found = classify(Chem.MolFromSmiles(entry.smiles))
    expected = FAMILY_EXCEPTIONS.get(entry.name, None if entry.family == "other" else entry.family)
    assert found == expected


def test_positional_isomers_keep_different_keys() -> None:
    resolver = SubstanceResolver()
    assert resolver.resolve("3-MMC").key != resolver.resolve("4-MMC").key


@pytest.mark.parametrize("entry", [entry for entry in CATALOGUE if entry.cas], ids=_ids)
def test_cas_check_digit(entry: CatalogueEntry) -> None:
    assert entry.cas is not None
    digits = entry.cas.replace("-", "")
    total = sum(int(digit) * position for position, digit in enumerate(reversed(digits[:-1]), start=1))
    assert total % 10 == int(digits[-1])


@pytest.mark.parametrize("entry", CATALOGUE, ids=_ids)
def test_name_and_structure_resolve_to_the_same_entry(entry: CatalogueEntry) -> None:
    resolver = SubstanceResolver()
    by_name = resolver.resolve(entry.name)
    by_structure = resolver.resolve("", smiles=entry.smiles)
    assert by_name.catalogued and by_name.display_name == entry.name
    assert by_structure.key == by_name.key
    assert by_structure.family == by_name.family == entry.family
    assert by_structure.controlled is by_name.controlled is entry.controlled


def test_the_catalogue_is_parsed_by_libyaml_into_what_the_pure_parser_gives() -> None:
    """libyaml's parser (~5x faster, the catalogue is read at every start) must read the same document."""
    import yaml

    from synthwatch import catalogue

    text = (resources.files("synthwatch") / "data" / catalogue.DEFAULT_CATALOGUE).read_text(encoding="utf-8")
    assert yaml.__with_libyaml__ and catalogue._YAML_LOADER is yaml.CSafeLoader
    assert yaml.load(text, Loader=catalogue._YAML_LOADER) == yaml.safe_load(text)
    assert catalogue.load_catalogue() == tuple(
        CatalogueEntry.model_validate(e) for e in yaml.safe_load(text)["substances"]
    )


def test_without_libyaml_the_catalogue_is_parsed_by_the_pure_parser_into_the_same_entries() -> None:
    """A PyYAML built without libyaml has no ``CSafeLoader``: the pure safe loader then reads the same catalogue."""
    import subprocess
    import sys

    check = (
        "import yaml\n"
        "entries = __import__('synthwatch.catalogue', fromlist=['_']).load_catalogue()\n"
        "del yaml.CSafeLoader\n"
        "import importlib, synthwatch.catalogue as c\n"
        "importlib.reload(c)\n"
        "assert c._YAML_LOADER is yaml.SafeLoader\n"
        "assert [e.model_dump() for e in c.load_catalogue()] == [e.model_dump() for e in entries]\n"
    )
    subprocess.run([sys.executable, "-c", check], check=True, timeout=60)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("substances: !!python/object/apply:os.system ['true']\n", "could not determine a constructor"),
        ("substances:\n" + "".join("  " * depth + "a:\n" for depth in range(1, 2000)), "maximum nesting depth"),
    ],
)
def test_a_hostile_catalogue_file_is_refused_by_the_yaml_parser(tmp_path: Path, text: str, error: str) -> None:
    """No Python object built from a tag; nesting past libyaml's 1,000 levels is a YAML error (the pure parser
    recursed into a RecursionError instead)."""
    import yaml

    from synthwatch.catalogue import load_catalogue

    path = tmp_path / "hostile.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(yaml.YAMLError, match=error):
        load_catalogue(path)
