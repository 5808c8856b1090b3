"""Static tables for the stream simulator: regions, their border points and agencies, and the
structural templates from which never-seen substances are built.

Kept apart from :mod:`synthwatch.producers.simulate` so the engine reads as logic and these tables
read as data an analyst can check (place names, agencies, chemistry) without wading through code.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

# --------------------------------------------------------------------------------------------------
# Regions
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Agency:
    """A reporting agency; ``code`` prefixes its seizure ids (e.g. ``DGD-ML-2026-000123``)."""

    name: str
    code: str


@dataclass(frozen=True)
class BorderPoint:
    """A place where seizures happen; ``agencies`` index the region's agencies that work there."""

    name: str
    conveyance: str
    weight: float
    agencies: tuple[int, ...]


@dataclass(frozen=True)
class Region:
    """One ISO 3166-2 subdivision with its own traffic, sources and substance preferences.

    ``weight`` is the share of all events (busy hubs vs quiet inland regions); ``utc_offset_minutes``
    is a fixed local offset (winter time) that some sources write instead of ``+00:00``;
    ``mass_scale`` makes transit hubs seize bigger loads.
    """

    code: str
    country: str
    name: str
    bloc: str
    weight: float
    utc_offset_minutes: int
    labs: tuple[str, ...]
    agencies: tuple[Agency, ...]
    border_points: tuple[BorderPoint, ...]
    transit_destinations: tuple[str, ...] = ()
    mass_scale: float = 1.0
    drug_checking: bool = False
    affinity_overrides: dict[str, float] = field(default_factory=dict)


#: Relative prevalence of each catalogue family per bloc (1.0 = average); classic drugs are "other".
BLOC_AFFINITY: dict[str, dict[str, float]] = {
    "west_africa": {
        "other": 1.0,
        "other_opioid": 3.0,
        "benzodiazepine": 1.2,
        "synthetic_cannabinoid": 0.6,
        "nitazene": 0.7,
        "fentanyl": 0.1,
        "synthetic_cathinone": 0.3,
        "arylcyclohexylamine": 0.3,
        "tryptamine": 0.2,
        "phenethylamine": 0.6,
    },
    "maghreb": {
        "other": 1.0,
        "other_opioid": 1.5,
        "benzodiazepine": 2.5,
        "synthetic_cannabinoid": 0.8,
        "nitazene": 0.2,
        "fentanyl": 0.1,
        "synthetic_cathinone": 0.4,
        "arylcyclohexylamine": 0.3,
        "tryptamine": 0.2,
        "phenethylamine": 1.0,
    },
    "western_europe": {
        "other": 1.0,
        "other_opioid": 0.6,
        "benzodiazepine": 0.8,
        "synthetic_cannabinoid": 1.0,
        "nitazene": 0.5,
        "fentanyl": 0.2,
        "synthetic_cathinone": 2.0,
        "arylcyclohexylamine": 1.5,
        "tryptamine": 0.8,
        "phenethylamine": 1.5,
    },
    "north_america": {
        "other": 1.0,
        "other_opioid": 1.0,
        "benzodiazepine": 1.2,
        "synthetic_cannabinoid": 0.6,
        "nitazene": 1.5,
        "fentanyl": 3.0,
        "synthetic_cathinone": 0.5,
        "arylcyclohexylamine": 0.6,
        "tryptamine": 0.8,
        "phenethylamine": 1.8,
    },
}

#: How readily a substance spreads between blocs (same country and same bloc are handled apart).
BLOC_LINKS: dict[frozenset[str], float] = {
    frozenset({"west_africa", "maghreb"}): 1.0,
    frozenset({"maghreb", "western_europe"}): 1.0,
    frozenset({"west_africa", "western_europe"}): 0.7,
    frozenset({"western_europe", "north_america"}): 0.6,
}

_DM = Agency("Douanes maliennes", "DGD-ML")
_OCS = Agency("Office central des stupéfiants", "OCS-ML")
_GN_ML = Agency("Gendarmerie nationale", "GN-ML")
_ADII = Agency("Administration des douanes et impôts indirects", "ADII")
_DGSN = Agency("Direction générale de la sûreté nationale", "DGSN")
_GR = Agency("Gendarmerie royale", "GR-MA")
_DS = Agency("Douanes sénégalaises", "DGD-SN")
_OCRTIS = Agency("Office central de répression du trafic illicite des stupéfiants", "OCRTIS")
_DCI = Agency("Douanes ivoiriennes", "DGD-CI")
_DPSD = Agency("Direction de la police des stupéfiants et des drogues", "DPSD")
_NDLEA = Agency("NDLEA", "NDLEA")
_NCS = Agency("Nigeria Customs Service", "NCS")
_DF = Agency("Douane française", "DNRED")
_PJ = Agency("Police judiciaire", "PJ-FR")
_OFAST = Agency("OFAST", "OFAST")
_DNL = Agency("Douane Nederland", "DOUANE-NL")
_KMAR = Agency("Koninklijke Marechaussee", "KMAR")
_POL_NL = Agency("Politie", "POL-NL")
_AAD = Agency("Administration générale des douanes et accises", "AGDA")
_PF_BE = Agency("Police fédérale", "PJF-BE")
_ZOLL = Agency("Zoll", "ZOLL")
_BPOL = Agency("Bundespolizei", "BPOL")
_LKA = Agency("LKA Berlin", "LKA-BE")
_SVA = Agency("Vigilancia Aduanera", "SVA")
_GC = Agency("Guardia Civil", "GC-ES")
_ME = Agency("Mossos d'Esquadra", "PG-ME")
_CBP = Agency("CBP", "CBP")
_DEA = Agency("DEA", "DEA")
_HSI = Agency("HSI", "HSI")
_NYPD = Agency("NYPD", "NYPD")

REGIONS: tuple[Region, ...] = (
    Region(
        "ML-BKO",
        "ML",
        "Bamako",
        "west_africa",
        0.040,
        0,
        ("LAB-ML-01",),
        (_DM, _OCS, _GN_ML),
        (
            BorderPoint("Aéroport international Modibo Keïta-Sénou", "air", 3, (0, 1)),
            BorderPoint("Gare routière de Sogoniko", "land", 2, (1, 2)),
            BorderPoint("Poste de contrôle de Kati (RN3)", "land", 2, (0, 2)),
            BorderPoint("Centre de tri postal de Bamako", "postal", 1, (0,)),
        ),
        ("BF", "NE", "DZ", "CI"),
    ),
    Region(
        "ML-4",
        "ML",
        "Ségou",
        "west_africa",
        0.010,
        0,
        ("LAB-ML-01",),
        (_DM, _GN_ML),
        (
            BorderPoint("Poste de contrôle de Ségou (RN6)", "land", 3, (0, 1)),
            BorderPoint("Pont de Markala", "land", 1, (1,)),
            BorderPoint("Bureau des douanes de San", "land", 1, (0,)),
        ),
        ("BF", "NE", "MR"),
    ),
    Region(
        "ML-7",
        "ML",
        "Gao",
        "west_africa",
        0.006,
        0,
        ("LAB-ML-01",),
        (_DM, _GN_ML),
        (
            BorderPoint("Poste frontière de Labbezanga", "land", 3, (0, 1)),
            BorderPoint("Aéroport de Gao", "air", 1, (0,)),
            BorderPoint("Poste de contrôle de Gao-Est", "land", 2, (1,)),
        ),
        ("NE", "DZ", "LY"),
    ),
    Region(
        "MA-CAS",
        "MA",
        "Casablanca",
        "maghreb",
        0.050,
        60,
        ("LAB-MA-01",),
        (_ADII, _DGSN, _GR),
        (
            BorderPoint("Aéroport Mohammed V", "air", 3, (0, 1)),
            BorderPoint("Port de Casablanca", "sea", 3, (0,)),
            BorderPoint("Centre de tri Barid Al-Maghrib Casablanca", "postal", 1, (0,)),
            BorderPoint("Autoroute A3, péage de Bouskoura", "land", 1, (1, 2)),
        ),
        ("ES", "FR", "SN"),
        mass_scale=1.5,
    ),
    Region(
        "MA-RAB",
        "MA",
        "Rabat",
        "maghreb",
        0.020,
        60,
        ("LAB-MA-01", "LAB-MA-02"),
        (_ADII, _DGSN),
        (
            BorderPoint("Aéroport de Rabat-Salé", "air", 2, (0, 1)),
            BorderPoint("Gare de Rabat-Agdal", "land", 1, (1,)),
            BorderPoint("Autoroute A1, péage de Rabat", "land", 1, (1,)),
        ),
        ("ES", "FR"),
    ),
    Region(
        "MA-TNG",
        "MA",
        "Tanger-Assilah",
        "maghreb",
        0.050,
        60,
        ("LAB-MA-01",),
        (_ADII, _DGSN, _GR),
        (
            BorderPoint("Port de Tanger Ville", "sea", 4, (0, 1)),
            BorderPoint("Aéroport Tanger Ibn Battouta", "air", 2, (0, 1)),
            BorderPoint("Gare routière de Tanger", "land", 1, (1, 2)),
        ),
        ("ES", "FR", "BE", "NL"),
        mass_scale=3.0,
    ),
    Region(
        "SN-DK",
        "SN",
        "Dakar",
        "west_africa",
        0.040,
        0,
        ("LAB-SN-01",),
        (_DS, _OCRTIS),
        (
            BorderPoint("Port autonome de Dakar", "sea", 4, (0, 1)),
            BorderPoint("Gare des Baux Maraîchers", "land", 2, (1,)),
            BorderPoint("Centre de tri postal de Dakar", "postal", 1, (0,)),
        ),
        ("ML", "GM", "GW", "ES"),
        mass_scale=2.0,
    ),
    Region(
        "CI-AB",
        "CI",
        "Abidjan",
        "west_africa",
        0.040,
        0,
        ("LAB-CI-01",),
        (_DCI, _DPSD),
        (
            BorderPoint("Aéroport Félix-Houphouët-Boigny", "air", 3, (0, 1)),
            BorderPoint("Port autonome d'Abidjan", "sea", 3, (0,)),
            BorderPoint("Gare routière d'Adjamé", "land", 2, (1,)),
        ),
        ("BF", "ML", "GH"),
        mass_scale=2.0,
    ),
    Region(
        "NG-LA",
        "NG",
        "Lagos",
        "west_africa",
        0.060,
        60,
        ("LAB-NG-01",),
        (_NDLEA, _NCS),
        (
            BorderPoint("Murtala Muhammed International Airport", "air", 4, (0, 1)),
            BorderPoint("Apapa Port", "sea", 3, (1, 0)),
            BorderPoint("Tin Can Island Port", "sea", 2, (1,)),
            BorderPoint("Seme border post", "land", 2, (1, 0)),
            BorderPoint("NIPOST Lagos sorting centre", "postal", 1, (0,)),
        ),
        ("GH", "BJ", "GB", "SA"),
        mass_scale=2.0,
    ),
    Region(
        "FR-75C",
        "FR",
        "Paris",
        "western_europe",
        0.100,
        60,
        ("LAB-FR-01", "LAB-FR-02"),
        (_PJ, _OFAST, _DF),
        (
            BorderPoint("Gare du Nord (contrôles Eurostar)", "land", 3, (2, 0)),
            BorderPoint("Gare de Lyon", "land", 2, (2, 0)),
            BorderPoint("Plateforme de fret express Paris-Bercy", "postal", 2, (2,)),
            BorderPoint("Opération de voie publique, Paris 18e", "other", 3, (0, 1)),
        ),
        ("GB", "BE"),
        drug_checking=True,
    ),
    Region(
        "FR-13",
        "FR",
        "Bouches-du-Rhône",
        "western_europe",
        0.060,
        60,
        ("LAB-FR-03",),
        (_DF, _OFAST, _PJ),
        (
            BorderPoint("Aéroport Marseille-Provence", "air", 2, (0, 2)),
            BorderPoint("Grand port maritime de Marseille-Fos", "sea", 4, (0, 1)),
            BorderPoint("Péage de Lançon (A7)", "land", 2, (0, 2)),
            BorderPoint("Opération de voie publique, Marseille", "other", 2, (2, 1)),
        ),
        ("IT", "ES"),
        mass_scale=1.5,
        drug_checking=True,
    ),
    Region(
        "NL-NH",
        "NL",
        "Noord-Holland",
        "western_europe",
        0.080,
        60,
        ("LAB-NL-01", "LAB-NL-02"),
        (_DNL, _KMAR, _POL_NL),
        (
            BorderPoint("Amsterdam Airport Schiphol", "air", 4, (0, 1)),
            BorderPoint("Port of Amsterdam", "sea", 2, (0,)),
            BorderPoint("IJmuiden ferry terminal", "sea", 1, (0, 1)),
            BorderPoint("PostNL sorteercentrum Amsterdam", "postal", 2, (0,)),
            BorderPoint("Straatcontrole Amsterdam-Centrum", "other", 1, (2,)),
        ),
        ("GB", "DE", "FR", "AU", "US"),
        mass_scale=3.0,
        drug_checking=True,
        affinity_overrides={"synthetic_cathinone": 2.5, "phenethylamine": 2.0},
    ),
    Region(
        "BE-BRU",
        "BE",
        "Bruxelles-Capitale",
        "western_europe",
        0.060,
        60,
        ("LAB-BE-01",),
        (_AAD, _PF_BE),
        (
            BorderPoint("Bruxelles-Midi (Eurostar)", "land", 3, (0, 1)),
            BorderPoint("Centre de tri bpost Bruxelles X", "postal", 2, (0,)),
            BorderPoint("Port de Bruxelles", "other", 1, (0,)),
            BorderPoint("Opération de voie publique, Anderlecht", "other", 1, (1,)),
        ),
        ("GB", "FR", "NL"),
        drug_checking=True,
    ),
    Region(
        "DE-BE",
        "DE",
        "Berlin",
        "western_europe",
        0.070,
        60,
        ("LAB-DE-01",),
        (_ZOLL, _BPOL, _LKA),
        (
            BorderPoint("Berlin Hauptbahnhof", "land", 2, (1, 2)),
            BorderPoint("Internationales Postzentrum Berlin", "postal", 3, (0,)),
            BorderPoint("Westhafen Berlin", "other", 1, (0,)),
            BorderPoint("Görlitzer Park (Streife)", "other", 2, (2,)),
        ),
        ("PL", "CZ", "SE"),
        drug_checking=True,
        affinity_overrides={"arylcyclohexylamine": 2.0},
    ),
    Region(
        "ES-B",
        "ES",
        "Barcelona",
        "western_europe",
        0.070,
        60,
        ("LAB-ES-01",),
        (_SVA, _GC, _ME),
        (
            BorderPoint("Aeropuerto Josep Tarradellas Barcelona-El Prat", "air", 3, (0, 1)),
            BorderPoint("Port de Barcelona", "sea", 4, (0, 1)),
            BorderPoint("Estació de Sants", "land", 1, (2,)),
            BorderPoint("Centro de tratamiento automatizado de Correos Barcelona", "postal", 1, (0,)),
        ),
        ("FR", "IT", "GB"),
        mass_scale=2.5,
        drug_checking=True,
    ),
    Region(
        "US-CA",
        "US",
        "California",
        "north_america",
        0.100,
        -480,
        ("LAB-US-01", "LAB-US-02"),
        (_CBP, _DEA, _HSI),
        (
            BorderPoint("San Ysidro Port of Entry", "land", 4, (0,)),
            BorderPoint("Otay Mesa Port of Entry", "land", 3, (0, 2)),
            BorderPoint("Calexico West Port of Entry", "land", 2, (0,)),
            BorderPoint("Los Angeles International Airport", "air", 2, (0, 1, 2)),
            BorderPoint("Port of Long Beach", "sea", 1, (0, 2)),
            BorderPoint("USPS International Service Center San Francisco", "postal", 2, (0,)),
        ),
        ("US",),
        mass_scale=2.0,
        drug_checking=True,
    ),
    Region(
        "US-NY",
        "US",
        "New York",
        "north_america",
        0.090,
        -300,
        ("LAB-US-03", "LAB-US-04"),
        (_CBP, _DEA, _NYPD),
        (
            BorderPoint("John F. Kennedy International Airport", "air", 4, (0, 1)),
            BorderPoint("USPS International Service Center JFK", "postal", 3, (0,)),
            BorderPoint("Red Hook Container Terminal", "sea", 1, (0,)),
            BorderPoint("Champlain Port of Entry", "land", 1, (0,)),
            BorderPoint("Street operation, Bronx", "other", 2, (2, 1)),
        ),
        ("CA",),
        drug_checking=True,
    ),
)
"""All simulated regions. Every ``utc_offset_minutes`` lies in -08:00..+01:00 (the simulator relies
on it: an event at or after 07:00 local time never falls on the previous UTC day)."""

#: Where seized goods come from, per family (ISO 3166-1 alpha-2, weights).
ORIGINS: dict[str, tuple[tuple[str, float], ...]] = {
    "other": (("CO", 4), ("BR", 3), ("EC", 3), ("PE", 2), ("NL", 1), ("BE", 1), ("GW", 1)),
    "other_opioid": (("IN", 5), ("AF", 2), ("PK", 2), ("IR", 1), ("TR", 1)),
    "fentanyl": (("MX", 5), ("CN", 3), ("IN", 1)),
    "nitazene": (("CN", 5), ("IN", 1), ("GB", 1), ("NL", 1)),
    "synthetic_cathinone": (("NL", 3), ("IN", 3), ("CN", 2), ("PL", 1)),
    "synthetic_cannabinoid": (("CN", 6), ("NL", 1), ("US", 1)),
    "benzodiazepine": (("IN", 3), ("CN", 2), ("ES", 1), ("DZ", 1)),
    "arylcyclohexylamine": (("IN", 3), ("CN", 2), ("NL", 2)),
    "tryptamine": (("NL", 3), ("CA", 1), ("US", 1)),
    "phenethylamine": (("NL", 4), ("BE", 2), ("MX", 2), ("MM", 1)),
}

#: Seized forms per family: (unit, weight, median amount in that unit, lognormal sigma).
QUANTITY_FORMS: dict[str, tuple[tuple[str, float, float, float], ...]] = {
    "other": (("g", 0.95, 25.0, 1.4), ("tablets", 0.05, 200.0, 1.2)),
    "other_opioid": (("g", 0.5, 15.0, 1.3), ("tablets", 0.5, 2000.0, 1.5)),
    "fentanyl": (("g", 0.7, 5.0, 1.3), ("tablets", 0.25, 300.0, 1.4), ("ml", 0.05, 10.0, 0.8)),
    "nitazene": (("g", 0.55, 2.0, 1.3), ("tablets", 0.3, 100.0, 1.3), ("ml", 0.15, 10.0, 0.8)),
    "synthetic_cathinone": (("g", 0.9, 20.0, 1.3), ("tablets", 0.1, 100.0, 1.0)),
    "synthetic_cannabinoid": (("g", 0.75, 30.0, 1.3), ("ml", 0.2, 20.0, 1.0), ("blotters", 0.05, 20.0, 1.0)),
    "benzodiazepine": (("tablets", 0.8, 500.0, 1.4), ("g", 0.2, 5.0, 1.2)),
    "arylcyclohexylamine": (("g", 0.95, 20.0, 1.4), ("ml", 0.05, 20.0, 1.0)),
    "tryptamine": (("g", 0.6, 2.0, 1.2), ("blotters", 0.3, 20.0, 1.0), ("ml", 0.1, 20.0, 0.8)),
    "phenethylamine": (("g", 0.55, 20.0, 1.4), ("tablets", 0.4, 200.0, 1.4), ("blotters", 0.05, 20.0, 1.0)),
}

#: Typical purity of seized material, per family: beta(a, b) on 0..1.
PURITY: dict[str, tuple[float, float]] = {
    "other": (6.0, 4.0),
    "other_opioid": (3.0, 5.0),
    "fentanyl": (1.5, 8.0),
    "nitazene": (1.2, 12.0),
    "synthetic_cathinone": (8.0, 2.0),
    "synthetic_cannabinoid": (1.0, 12.0),
    "benzodiazepine": (1.5, 20.0),
    "arylcyclohexylamine": (8.0, 2.5),
    "tryptamine": (5.0, 3.0),
    "phenethylamine": (5.0, 4.0),
}

#: Counter-ions a lab may report with a basic drug (SMILES fragment).
SALTS: tuple[str, ...] = ("Cl", "Cl", "Cl", "Br", "OC(=O)CC(O)(CC(=O)O)C(=O)O", "OC(=O)C(=O)O")
#: Families that are bases and so plausibly seized as salts (amides and lactams are not).
SALT_FAMILIES: frozenset[str] = frozenset(
    {
        "other",
        "other_opioid",
        "fentanyl",
        "nitazene",
        "synthetic_cathinone",
        "arylcyclohexylamine",
        "tryptamine",
        "phenethylamine",
    }
)

# --------------------------------------------------------------------------------------------------
# Never-seen substances
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """One interchangeable piece of a template; ``rare`` pieces make a combination implausible to
    have been reported before (at least one is required)."""

    smiles: str
    code: str
    rare: bool = False


@dataclass(frozen=True)
class NovelCandidate:
    """A proposed new substance (still to be checked against the catalogue by the caller)."""

    name: str
    smiles: str
    family: str


# Ring-closure digits: each scaffold keeps 1 and 2 for itself; any ring inside a piece that is written
# while the scaffold's rings are still open uses 3 (checked by the core SMARTS below).

# Nitazenes: 2-benzylbenzimidazole opioids, varying the 4'-alkoxy, the amine and the 5-substituent.
_NITAZENE_ALKOXY = (
    Part("OC", "meto"),
    Part("OCC", "eto"),
    Part("OCCC", "proto"),
    Part("OC(C)C", "isoto"),
    Part("OCCCC", "buto"),
    Part("OCC(C)C", "isobuto", True),
    Part("OCCCCC", "pento", True),
    Part("OCC3CC3", "cypro", True),
    Part("OCCF", "fluoreto", True),
    Part("OCC=C", "allo", True),
    Part("OCCOC", "methoxyeto", True),
    Part("OCC(F)(F)F", "trifluoreto", True),
    Part("SCC", "thioeto", True),
    Part("OC3CCC3", "cyclobuto", True),
)
_NITAZENE_AMINE = (  # code: a prefix ("N-desethyl ") or, for cyclic amines, a suffix ("pyne")
    Part("CCN(CC)", ""),
    Part("C1CCCN1", "pyne"),
    Part("C1CCCCN1", "pipne"),
    Part("CCN", "N-desethyl "),
    Part("CN(C)", "N,N-dimethyl "),
    Part("CCN(C)", "N-methyl "),
    Part("C1COCCN1", "morph", True),
    Part("C1CCCCCN1", "pane", True),
    Part("CC(C)N(C)", "N-isopropyl-N-methyl ", True),
)
_NITAZENE_RING5 = (  # code: "<prefix>|<core>"
    Part("[N+](=O)[O-]", "|nitazene"),
    Part("", "|desnitazene"),
    Part("Cl", "5-chloro-|desnitazene", True),
    Part("F", "5-fluoro-|desnitazene", True),
    Part("C#N", "5-cyano-|desnitazene", True),
    Part("C(F)(F)F", "5-trifluoromethyl-|desnitazene", True),
)


def _nitazene(rnd: random.Random) -> tuple[str, str, list[Part]]:
    alkoxy, amine, ring5 = (
        rnd.choice(_NITAZENE_ALKOXY),
        rnd.choice(_NITAZENE_AMINE),
        rnd.choice(_NITAZENE_RING5),
    )
    ring = f"nc2cc({ring5.smiles})ccc21" if ring5.smiles else "nc2ccccc21"
    smiles = f"{amine.smiles}CCn1c(Cc2ccc({alkoxy.smiles})cc2){ring}"
    prefix, core = ring5.code.split("|")
    if amine.code and not amine.code.endswith(" "):  # cyclic amine: "etonitazepyne"
        name = f"{prefix}{alkoxy.code}{core.removesuffix('ne')}{amine.code}"
    else:
        name = f"{amine.code}{prefix}{alkoxy.code}{core}"
    return name, smiles, [alkoxy, amine, ring5]


# Synthetic cathinones: aryl-C(=O)-CH(alkyl)-amine, varying ring substituents, chain and amine.
_CATHINONE_RING = (
    Part("c1ccc(F)cc1", "4-F"),
    Part("c1cccc(Cl)c1", "3-Cl"),
    Part("c1ccc(Cl)c(Cl)c1", "3,4-diCl"),
    Part("c1ccc(CC)cc1", "4-Et", True),
    Part("c1ccc(F)c(C)c1", "3-Me-4-F", True),
    Part("c1ccc(C(F)(F)F)cc1", "4-CF3", True),
    Part("c1ccc(SC)cc1", "4-MeS", True),
    Part("c1ccc2c(c1)OCO2", "3,4-MD"),
    Part("c1ccc2ccccc2c1", "2-Naph", True),
    Part("c1ccc(Br)cc1", "4-Br"),
    Part("c1ccc(OC)cc1", "4-MeO"),
    Part("c1ccc(C)c(C)c1", "3,4-diMe"),
    Part("c1ccc(Cl)c(F)c1", "3-F-4-Cl", True),
    Part("c1ccc2c(c1)CCC2", "5-Ind", True),
    Part("c1cccs1", "Thio", True),
    Part("c1ccc(C)c(Cl)c1", "3-Cl-4-Me", True),
)
_CATHINONE_CHAIN = (
    Part("C", "1"),
    Part("CC", "2"),
    Part("CCC", "3"),
    Part("CCCC", "4"),
    Part("CCCCC", "5", True),
)
_CATHINONE_AMINE = (
    Part("CN", "methyl"),
    Part("CCN", "ethyl"),
    Part("CN(C)", "dimethyl"),
    Part("C1CCCN1", "pyrrolidino"),
    Part("CCCN", "propyl", True),
    Part("CC(C)N", "isopropyl", True),
    Part("CC(C)(C)N", "tert-butyl", True),
    Part("C1CCCCN1", "piperidino", True),
)
_CATHINONE_STEM = {
    "1": "propiophenone",
    "2": "butiophenone",
    "3": "pentiophenone",
    "4": "hexiophenone",
    "5": "heptiophenone",
}
_PYRROLIDINO_CODE = {"1": "α-PPP", "2": "α-PBP", "3": "α-PVP", "4": "α-PHP", "5": "α-PHpP"}


def _cathinone(rnd: random.Random) -> tuple[str, str, list[Part]]:
    ring, chain, amine = (
        rnd.choice(_CATHINONE_RING),
        rnd.choice(_CATHINONE_CHAIN),
        rnd.choice(_CATHINONE_AMINE),
    )
    smiles = f"{amine.smiles}C({chain.smiles})C(=O){ring.smiles}"
    if amine.code == "pyrrolidino":
        name = f"{ring.code}-{_PYRROLIDINO_CODE[chain.code]}"
    elif amine.code == "piperidino":
        name = f"{ring.code}-α-Pip{_PYRROLIDINO_CODE[chain.code][3:]}"
    else:
        name = f"{ring.code}-α-{amine.code}amino-{_CATHINONE_STEM[chain.code]}"
    return name, smiles, [ring, chain, amine]


# Synthetic cannabinoids: head-NHC(=O)-core(N-tail), EMCDDA-style codes (e.g. MDMB-4en-PINACA).
_SCRA_HEAD = (
    Part("COC(=O)C(C(C)(C)C)", "MDMB"),
    Part("COC(=O)C(C(C)C)", "MMB"),
    Part("CCOC(=O)C(C(C)(C)C)", "EDMB", True),
    Part("NC(=O)C(C(C)(C)C)", "ADB"),
    Part("NC(=O)C(C(C)C)", "AB"),
    Part("COC(=O)C(Cc1ccccc1)", "MPP", True),
    Part("CC(C)(c1ccccc1)", "CUMYL"),
    Part("CCCOC(=O)C(C(C)(C)C)", "PDMB", True),
)
_SCRA_TAIL = (
    Part("CCCCC", "P"),
    Part("CCCCCF", "5F-P"),
    Part("CCCC=C", "4en-P"),
    Part("CCCC", "BUT"),
    Part("CCCCCC", "HEX"),
    Part("Cc3ccc(F)cc3", "FUB"),
    Part("CC3CCCCC3", "CHM"),
    Part("CCCCC#N", "4CN-B"),
    Part("CCCCCCl", "5Cl-P", True),
    Part("CC3CCOCC3", "OXAN", True),
    Part("CCCCC(F)(F)F", "5,5,5-F3-P", True),
    Part("CCC=C(C)C", "3-Me-2en-B", True),
)
_SCRA_CORE = (
    Part("c1nn({})c2ccccc12", "INACA"),
    Part("c1cn({})c2ccccc12", "ICA"),
    Part("c1nn({})c2ncccc12", "7N-INACA", True),
    Part("c1cn({})c2ncccc12", "7N-ICA", True),
)


def _cannabinoid(rnd: random.Random) -> tuple[str, str, list[Part]]:
    head, tail, core = rnd.choice(_SCRA_HEAD), rnd.choice(_SCRA_TAIL), rnd.choice(_SCRA_CORE)
    smiles = f"{head.smiles}NC(=O){core.smiles.format(tail.smiles)}"
    prefix = "" if "-" not in tail.code else tail.code.rsplit("-", 1)[0] + "-"
    tail_letter = tail.code.rsplit("-", 1)[-1]
    if core.code.startswith("7N-"):
        name = f"{prefix}{head.code}-{tail_letter}-7N-{core.code[3:]}"
    else:
        name = f"{prefix}{head.code}-{tail_letter}{core.code}"
    return name, smiles, [head, tail, core]


# Designer benzodiazepines: 1,4-benzodiazepin-2-ones and their triazolo analogues.
_BZD_X7 = (
    Part("Cl", "clo"),
    Part("Br", "bromo"),
    Part("[N+](=O)[O-]", "nitro"),
    Part("F", "fluoro", True),
    Part("C(F)(F)F", "trifluoro", True),
    Part("I", "iodo", True),
    Part("C#N", "cyano", True),
)
_BZD_ARYL = (
    Part("c3ccccc3", ""),
    Part("c3ccccc3F", "flu"),
    Part("c3ccccc3Cl", "chlor"),
    Part("c3ccccn3", "pyr", True),
    Part("c3cccs3", "thi", True),
    Part("c3ccc(F)cc3F", "diflu", True),
)
_BZD_CORE = (
    Part("O=C1CN=C({aryl})c2cc({x})ccc2N1C", "azepam"),
    Part("O=C1CN=C({aryl})c2cc({x})ccc2N1", "nordazepam"),
    Part("Cc1nnc2n1-c1ccc({x})cc1C({aryl})=NC2", "azolam"),
    Part("CCc1nnc2n1-c1ccc({x})cc1C({aryl})=NC2", "etazolam", True),
    Part("O=C1CN=C({aryl})c2cc({x})ccc2N1CC(F)(F)F", "trifluoroethazepam", True),
)


def _benzodiazepine(rnd: random.Random) -> tuple[str, str, list[Part]]:
    x7, aryl, core = rnd.choice(_BZD_X7), rnd.choice(_BZD_ARYL), rnd.choice(_BZD_CORE)
    smiles = core.smiles.format(aryl=aryl.smiles, x=x7.smiles)
    return f"{aryl.code}{x7.code}{core.code}", smiles, [x7, aryl, core]


# Fentanyl analogues: acyl-N(aryl)-4-piperidyl-N-(2-arylethyl).
_FENT_ACYL = (
    Part("CC(=O)", "acetyl"),
    Part("CCC(=O)", ""),
    Part("CCCC(=O)", "butyr"),
    Part("CC(C)C(=O)", "isobutyr"),
    Part("C=CC(=O)", "acryl"),
    Part("COCC(=O)", "methoxyacetyl"),
    Part("O=C(C1CC1)", "cyclopropyl"),
    Part("O=C(c1ccco1)", "furanyl"),
    Part("O=C(C1CCCO1)", "THF-"),
    Part("O=C(C1CCC1)", "cyclobutyl", True),
    Part("CCCCC(=O)", "valeryl"),
    Part("O=C(C1CCOC1)", "3-THF-", True),
    Part("FCC(=O)", "fluoroacetyl", True),
)
_FENT_ANILIDE = (
    Part("c1ccccc1", ""),
    Part("c1ccc(F)cc1", "4-fluoro-"),
    Part("c1ccccc1F", "2-fluoro-"),
    Part("c1cccc(F)c1", "3-fluoro-"),
    Part("c1ccc(Cl)cc1", "4-chloro-"),
    Part("c1ccc(OC)cc1", "4-methoxy-"),
    Part("c1ccccc1C", "2-methyl-"),
    Part("c1ccc(C(F)(F)F)cc1", "4-trifluoromethyl-", True),
    Part("c1ccc(F)cc1F", "2,4-difluoro-", True),
)
_FENT_ARYL = (
    Part("c2ccccc2", ""),
    Part("c2cccs2", "thio"),
    Part("c2ccc(F)cc2", "4''-fluoro-", True),
    Part("c2ccccc2O", "2''-hydroxy-", True),
    Part("c2cccnc2", "3''-pyridyl-", True),
)


def _fentanyl(rnd: random.Random) -> tuple[str, str, list[Part]]:
    acyl, anilide, aryl = rnd.choice(_FENT_ACYL), rnd.choice(_FENT_ANILIDE), rnd.choice(_FENT_ARYL)
    smiles = f"{acyl.smiles}N({anilide.smiles})C1CCN(CC{aryl.smiles})CC1"
    return f"{anilide.code}{aryl.code}{acyl.code}fentanyl", smiles, [acyl, anilide, aryl]


_TEMPLATES = {
    "nitazene": _nitazene,
    "synthetic_cathinone": _cathinone,
    "synthetic_cannabinoid": _cannabinoid,
    "benzodiazepine": _benzodiazepine,
    "fentanyl": _fentanyl,
}

#: Which families new substances come from, weighted like the real NPS market of the 2020s.
NOVEL_FAMILY_WEIGHTS: tuple[tuple[str, float], ...] = (
    ("nitazene", 0.30),
    ("synthetic_cathinone", 0.25),
    ("synthetic_cannabinoid", 0.20),
    ("benzodiazepine", 0.15),
    ("fentanyl", 0.10),
)


#: The scaffold every member of a family must keep (SMARTS); guards the templates' SMILES assembly.
NOVEL_CORES: dict[str, str] = {
    "nitazene": "c1ccc2c(c1)nc(Cc1ccccc1)n2CC[NX3]",
    "synthetic_cathinone": "aC(=O)[CX4;!R][NX3]",
    "synthetic_cannabinoid": "O=C(N[CX4])c1[c,n]n([CX4])c2aaaac12",
    "benzodiazepine": "c12ccccc1C(a)=NC[#6]~[#7]2",
    "fentanyl": "O=CN(c)C1CCN(CCa)CC1",
}


def propose_novel(family: str, rnd: random.Random) -> NovelCandidate | None:
    """One combination from ``family``'s template, or None when it uses no rare piece (such
    combinations may well be known substances: the caller simply draws again)."""
    name, smiles, parts = _TEMPLATES[family](rnd)
    if not any(part.rare for part in parts):
        return None
    return NovelCandidate(name=name, smiles=smiles, family=family)
