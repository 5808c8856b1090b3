"""Structural family of a molecule by SMARTS substructure, first match wins.

Families overlap (a fentanyl contains a phenethylamine, bupropion is a beta-keto phenethylamine), so
the patterns are tried in a fixed priority order: the most specific and most dangerous family first.
Family says what a molecule *is*, never whether it is controlled.
"""

from __future__ import annotations

from typing import Any

from rdkit import Chem

from synthwatch.catalogue import Family

# An amine nitrogen that is not an amide, thioamide or amidine nitrogen.
_AMINE = "[NX3;!$(N[CX3]=[O,S,N])]"

FAMILY_SMARTS: tuple[tuple[Family, tuple[str, ...]], ...] = (
    # 2-benzyl-1-(2-aminoethyl)benzimidazoles (etonitazene, isotonitazene, metodesnitazene ...).
    ("nitazene", ("c1ccc2c(c1)nc(-[CH2]-c1ccccc1)n2-[CH2]-[CH2]-[NX3]",)),
    # 4-anilidopiperidines with a substituted ring nitrogen (fentanyl, carfentanil, sufentanil ...).
    ("fentanyl", ("[CX3](=O)[NX3](c1ccccc1)[CX4]1[CX4][CX4][NX3;H0][CX4][CX4]1",)),
    (
        "other_opioid",
        (
            # Morphinan skeleton, any bond orders (morphine, codeine, heroin, oxycodone ...).
            "[#6]1~[#6]~[#6]~[#6]23~[#6]~[#6]~[#7]~[#6](~[#6]~2~[#6]~1)~[#6]~[#6]4~[#6]~[#6]~[#6]~[#6]~[#6]~3~4",
            # 4,4-Diphenyl-6-aminoheptan-3-one type (methadone, isomethadone, dipipanone ...).
            "[CX3](=O)[CX4](c1ccccc1)(c1ccccc1)[CX4][CX4][NX3]",
            # 2-(dimethylaminomethyl)-1-(3-oxyphenyl)cyclohexanol (tramadol, O-desmethyltramadol).
            "[OX2][CX4]1(c2cccc([OX2])c2)[CX4][CX4][CX4][CX4][CX4]1[CH2][NX3]",
            # 1-(piperidin-4-yl)benzimidazol-2-ones with N-substituted piperidine (brorphine and analogues).
            "[#8]=[#6]1[#7][#6]2[#6][#6][#6][#6][#6]2[#7]1[CX4]1[CX4][CX4][NX3;H0][CX4][CX4]1",
            # trans-2-aminocyclohexyl benzamides ("U-drugs": U-47700, U-48800 ...).
            f"{_AMINE}[CX4]1[CX4][CX4][CX4][CX4][CX4]1[NX3][CX3](=O)[$(a),$([CH2]a)]",
        ),
    ),
    # 1-alkyl indole / indazole / 7-azaindole carrying a 3-carbonyl (carboxamides, esters, naphthoyl ketones).
    ("synthetic_cannabinoid", ("[CX3](=O)-c1[c,n]n(-[CX4])c2[c,n]cccc12",)),
    # 5-aryl-1,4-benzodiazepines and their triazolo-, imidazo- and thieno- variants.
    ("benzodiazepine", ("[#6]1(-a)=[#7]-[CX4]-[#6]~[#7]~a:a-1",)),
    # beta-keto phenethylamines (aryl ketone with an alpha amine).
    ("synthetic_cathinone", (f"{_AMINE}[CX4][CX3](=O)a",)),
    # 1-aryl-cyclohexylamines, including the 2-oxo ketamine type.
    ("arylcyclohexylamine", (f"{_AMINE}C1(-a)CCCCC1",)),
    # 3-(2-aminoethyl)indoles, including ergolines such as LSD.
    ("tryptamine", (f"{_AMINE}[CX4][CX4]-c1c[nX3]c2ccccc12",)),
    # 2-phenylethylamines (amphetamines, 2C-x, NBOMe, mescaline ...).
    ("phenethylamine", (f"{_AMINE}[CX4][CX4]-c1ccccc1",)),
)
"""Priority-ordered (family, SMARTS patterns). Edit with care: order decides overlapping matches."""


def _compile(smarts: str) -> Any:
    """Compile once at import; a broken pattern must fail loudly, not silently match nothing."""
    pattern = Chem.MolFromSmarts(smarts)
    if pattern is None:
        raise ValueError(f"invalid family SMARTS: {smarts}")
    return pattern


_COMPILED: tuple[tuple[Family, tuple[Any, ...]], ...] = tuple(
    (family, tuple(_compile(smarts) for smarts in patterns)) for family, patterns in FAMILY_SMARTS
)


def classify(mol: Any) -> Family | None:
    """Return the first family (in priority order) whose pattern the parent molecule contains, else None."""
    for family, patterns in _COMPILED:
        for pattern in patterns:
            if mol.HasSubstructMatch(pattern):
                return family
    return None
