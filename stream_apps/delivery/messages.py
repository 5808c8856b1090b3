"""Rendering alerts (and daily digests) for people, per language, from the jinja2 templates.

Facts are computed here once (numbers, dates and digits as CLDR says each language writes them, through
Babel, times in the officer's own time zone, place names from ISO 3166 in the reader's language, the
family and why it matters); the wording lives in ``templates/<language>/`` so a translator edits one
folder, with CLDR plural rules (``plural`` in the templates: French "1 signalement", Arabic's six forms)
instead of "(s)". Every message answers the same questions: what was seen, how it was identified and
who reported it, where, how unusual (observed vs expected), what family and why it matters, and where
to look (the Grafana drill-down). The detector's English summary is not shown: every sentence is
rendered from the alert's facts in the reader's language.

The reviewed texts of every alert type in every language are in tests/reference_messages/ (see
tests/delivery/test_reference_messages.py for how to regenerate them; a regenerated text needs a human review).
"""

from __future__ import annotations

import gettext
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

import jinja2
import pycountry
from babel import Locale
from babel.dates import format_date, format_time, get_timezone_location
from babel.lists import format_list
from babel.numbers import format_decimal

from synthwatch.schemas import Alert
from synthwatch.schemas.text import visible

LANGUAGES: tuple[str, ...] = ("en", "fr", "ar")
#: The CLDR locale each language's dates are written in (British English: day before month, as the
#: international bodies officers work with write them).
DATE_LOCALES: dict[str, str] = {"en": "en_GB", "fr": "fr", "ar": "ar"}
#: A family series (spikes of a whole family): its label in the reader's language, then this.
FAMILY_SERIES: dict[str, str] = {
    "en": "every substance of the family {family}",
    "fr": "l'ensemble des substances de la famille {family}",
    "ar": "جميع مواد فصيلة {family}",
}
#: Languages written right to left (their HTML gets ``dir="rtl"``).
RTL_LANGUAGES = frozenset({"ar"})
TEMPLATE_DIR = Path(__file__).parent / "templates"
DASHBOARD_UID = "synthwatch-substance"

TYPE_LABELS: dict[str, dict[str, str]] = {
    "en": {
        "new_substance": "New substance",
        "first_in_region": "First appearance in the region",
        "spike": "Spike",
        "spread": "Spread",
        "correction": "Correction of an earlier alert",
        "identified": "Name identified by its structure",
    },
    "fr": {
        "new_substance": "Nouvelle substance",
        "first_in_region": "Première apparition dans la région",
        "spike": "Pic",
        "spread": "Diffusion",
        "correction": "Rectification d'une alerte antérieure",
        "identified": "Nom identifié par sa structure",
    },
    "ar": {
        "new_substance": "مادة جديدة",
        "first_in_region": "أول ظهور في المنطقة",
        "spike": "ارتفاع مفاجئ",
        "spread": "انتشار",
        "correction": "تصحيح تنبيه سابق",
        "identified": "تحديد اسم ببنيته الكيميائية",
    },
}

SEVERITY_LABELS: dict[str, dict[str, str]] = {
    "en": {"info": "Information", "warning": "Warning", "critical": "CRITICAL"},
    "fr": {"info": "Information", "warning": "Avertissement", "critical": "CRITIQUE"},
    "ar": {"info": "معلومة", "warning": "تحذير", "critical": "حرج"},
}

CONTROL_LABELS: dict[str, dict[bool | None, str]] = {
    "en": {True: "under international control", False: "not under international control", None: "control unknown"},
    "fr": {
        True: "substance sous contrôle international",
        False: "substance non soumise au contrôle international",
        None: "statut au regard du contrôle international inconnu",
    },
    "ar": {
        True: "خاضعة للرقابة الدولية",
        False: "غير خاضعة للرقابة الدولية",
        None: "وضعها الرقابي غير معروف",
    },
}

SAMPLE_LABELS: dict[str, dict[str, str]] = {
    "en": {
        "seized_material": "seized material",
        "biological": "biological sample",
        "wastewater": "wastewater",
        "drug_checking": "drug checking",
        "other": "other",
    },
    "fr": {
        "seized_material": "produit saisi",
        "biological": "échantillon biologique",
        "wastewater": "eaux usées",
        "drug_checking": "analyse de produits (drug checking)",
        "other": "autre",
    },
    "ar": {
        "seized_material": "مادة مضبوطة",
        "biological": "عينة بيولوجية",
        "wastewater": "مياه الصرف الصحي",
        "drug_checking": "فحص المواد (drug checking)",
        "other": "أخرى",
    },
}

#: family -> (label, why it matters). ``""`` is an unclassified structure (or a name nobody could resolve).
FAMILIES: dict[str, dict[str, tuple[str, str]]] = {
    "en": {
        "nitazene": (
            "nitazene (benzimidazole opioid)",
            "Nitazenes are synthetic opioids, many often stronger than fentanyl. They are sold as fake oxycodone or "
            "as heroin and have caused clusters of fatal overdoses. Naloxone reverses them, but several doses may "
            "be needed.",
        ),
        "fentanyl": (
            "fentanyl analogue",
            "Fentanyl analogues are potent synthetic opioids: a few milligrams can kill. They are often hidden in "
            "heroin or counterfeit pills. Naloxone reverses them.",
        ),
        "other_opioid": (
            "opioid",
            "Opioids depress breathing and cause fatal overdoses, above all in people without tolerance. Naloxone "
            "reverses them.",
        ),
        "synthetic_cathinone": (
            "synthetic cathinone",
            "Synthetic cathinones are stimulants sold as 'bath salts' or ecstasy substitutes; they cause agitation, "
            "psychosis and heart problems, often in binges.",
        ),
        "synthetic_cannabinoid": (
            "synthetic cannabinoid",
            "Synthetic cannabinoids are far stronger than cannabis; they cause seizures, psychosis and deaths, and "
            "are often smuggled on impregnated paper or herbs, into prisons among other places.",
        ),
        "benzodiazepine": (
            "benzodiazepine",
            "Designer benzodiazepines are sold as fake medicines; mixed with opioids they sharply raise the risk of "
            "a fatal overdose, which naloxone does not fully reverse.",
        ),
        "arylcyclohexylamine": (
            "arylcyclohexylamine (dissociative)",
            "Dissociatives of the ketamine/PCP type cause confusion and injuries and, with repeated use, bladder "
            "damage.",
        ),
        "tryptamine": (
            "tryptamine (psychedelic)",
            "Psychedelic tryptamines rarely cause fatal overdoses but do cause dangerous behaviour; the doses of new "
            "ones are unknown.",
        ),
        "phenethylamine": (
            "phenethylamine",
            "Phenethylamines (amphetamines, 2C-x, NBOMe) include compounds active at microgram doses; NBOMe-type "
            "blotters have caused deaths.",
        ),
        "other": ("other", "Outside the monitored families: its effects and risks are not characterised yet."),
        "": (
            "unclassified structure",
            "Its structure could not be classified (reported by name only, or unknown): its effects and risks are "
            "not known.",
        ),
    },
    "fr": {
        "nitazene": (
            "nitazène (opioïde benzimidazolé)",
            "Les nitazènes sont des opioïdes de synthèse, souvent bien plus puissants que le fentanyl. Vendus comme "
            "de la fausse oxycodone ou comme de l'héroïne, ils ont causé des séries de surdoses mortelles. La "
            "naloxone les neutralise, mais plusieurs doses peuvent être nécessaires.",
        ),
        "fentanyl": (
            "analogue du fentanyl",
            "Les analogues du fentanyl sont des opioïdes de synthèse très puissants : quelques milligrammes peuvent "
            "tuer. Ils sont souvent cachés dans l'héroïne ou dans des comprimés contrefaits. La naloxone les "
            "neutralise.",
        ),
        "other_opioid": (
            "opioïde",
            "Les opioïdes dépriment la respiration et causent des surdoses mortelles, surtout chez les personnes sans "
            "tolérance. La naloxone les neutralise.",
        ),
        "synthetic_cathinone": (
            "cathinone de synthèse",
            "Les cathinones de synthèse sont des stimulants vendus comme « sels de bain » ou substituts d'ecstasy ; "
            "elles provoquent agitation, psychoses et troubles cardiaques, souvent lors de consommations compulsives.",
        ),
        "synthetic_cannabinoid": (
            "cannabinoïde de synthèse",
            "Les cannabinoïdes de synthèse sont bien plus puissants que le cannabis ; ils provoquent convulsions, "
            "psychoses et décès, et circulent souvent sur du papier ou des herbes imprégnés, notamment en prison.",
        ),
        "benzodiazepine": (
            "benzodiazépine",
            "Les benzodiazépines de synthèse sont vendues comme faux médicaments ; associées aux opioïdes, elles "
            "augmentent fortement le risque de surdose mortelle, que la naloxone ne corrige pas entièrement.",
        ),
        "arylcyclohexylamine": (
            "arylcyclohexylamine (dissociatif)",
            "Les dissociatifs de type kétamine/PCP provoquent confusion et blessures et, en usage répété, des lésions "
            "de la vessie.",
        ),
        "tryptamine": (
            "tryptamine (psychédélique)",
            "Les tryptamines psychédéliques causent rarement des surdoses mortelles mais entraînent des comportements "
            "dangereux ; les doses des nouvelles molécules sont inconnues.",
        ),
        "phenethylamine": (
            "phénéthylamine",
            "Les phénéthylamines (amphétamines, 2C-x, NBOMe) comprennent des composés actifs au microgramme ; les "
            "buvards de type NBOMe ont causé des décès.",
        ),
        "other": (
            "autre",
            "Hors des familles surveillées : ses effets et ses risques ne sont pas encore caractérisés.",
        ),
        "": (
            "structure non classée",
            "Sa structure n'a pas pu être classée (signalée par son nom seulement, ou inconnue) : ses effets et ses "
            "risques ne sont pas connus.",
        ),
    },
    "ar": {
        "nitazene": (
            "نيتازين (مادة أفيونية من البنزيميدازولات)",
            "النيتازينات مواد أفيونية اصطناعية، كثير منها أقوى بكثير من الفنتانيل. تُباع على أنها أوكسيكودون مزيَّف "
            "أو على أنها هيروين، وتسبّبت في موجات من الجرعات الزائدة القاتلة. يُبطل النالوكسون مفعولها، لكن قد "
            "يلزم إعطاء عدة جرعات منه.",
        ),
        "fentanyl": (
            "نظير للفنتانيل",
            "نظائر الفنتانيل مواد أفيونية اصطناعية شديدة القوة: بضعة مليغرامات منها قد تقتل. كثيرًا ما تُخفى في "
            "الهيروين أو في أقراص مقلَّدة. يُبطل النالوكسون مفعولها.",
        ),
        "other_opioid": (
            "مادة أفيونية",
            "تُثبِّط المواد الأفيونية التنفس وتسبّب جرعات زائدة قاتلة، ولا سيما لدى من لم يعتادوا عليها. يُبطل "
            "النالوكسون مفعولها.",
        ),
        "synthetic_cathinone": (
            "كاثينون اصطناعي",
            "الكاثينونات الاصطناعية منشِّطات تُباع باسم «أملاح الاستحمام» أو بديلًا عن الإكستاسي؛ وهي تسبّب الهياج "
            "والذهان واضطرابات القلب، وكثيرًا ما تُتعاطى في نوبات متواصلة.",
        ),
        "synthetic_cannabinoid": (
            "قنّبين اصطناعي",
            "القنّبينات الاصطناعية أقوى بكثير من القنّب؛ وهي تسبّب نوبات تشنّج وذهانًا ووفيات، وكثيرًا ما تُهرَّب "
            "على ورق أو أعشاب مشبَّعة بها، ومن ذلك إلى السجون.",
        ),
        "benzodiazepine": (
            "بنزوديازيبين",
            "تُباع البنزوديازيبينات المصمَّمة على أنها أدوية مزيَّفة؛ وإذا اجتمعت مع المواد الأفيونية رفعت كثيرًا خطر "
            "الجرعة الزائدة القاتلة، ولا يُبطل النالوكسون هذا الخطر كاملًا.",
        ),
        "arylcyclohexylamine": (
            "أريل سيكلوهكسيلامين (مادة مُفارِقة)",
            "تسبّب المواد المُفارِقة من نوع الكيتامين والفينسيكليدين (PCP) التشوّش والإصابات، ومع تكرار التعاطي "
            "أضرارًا في المثانة.",
        ),
        "tryptamine": (
            "تريبتامين (مادة مُهلوِسة)",
            "نادرًا ما تسبّب التريبتامينات المُهلوِسة جرعات زائدة قاتلة، لكنها تؤدي إلى سلوك خطِر؛ وجرعات الجديد منها "
            "غير معروفة.",
        ),
        "phenethylamine": (
            "فينيثيلامين",
            "تضم الفينيثيلامينات (الأمفيتامينات و2C-x وNBOMe) مركّبات فعّالة بجرعات من رتبة الميكروغرام؛ وقد تسبّبت "
            "أوراق النشاف المشبَّعة بمواد من نوع NBOMe في وفيات.",
        ),
        "other": (
            "أخرى",
            "خارج الفصائل الخاضعة للرصد: لم تُحدَّد آثارها ومخاطرها بعد.",
        ),
        "": (
            "بنية غير مصنَّفة",
            "تعذّر تصنيف بنيتها (أُبلغ عنها بالاسم فقط، أو أنها مجهولة): آثارها ومخاطرها غير معروفة.",
        ),
    },
}


#: How the substance of the report that raised the alert was identified (Alert.identified_by).
IDENTIFIED: dict[str, dict[str, str]] = {
    "en": {
        "structure": "Identified from the chemical structure (SMILES or InChIKey) the lab reported.",
        "catalogue_name": "Identified by its name in the synthwatch catalogue; the report gave no structure.",
        "learnt_name": "Identified by a synonym learnt from earlier reports that gave its structure; this report "
        "gave none.",
        "unresolved_name": "Reported by name only and not identified: the name matches no known substance.",
    },
    "fr": {
        "structure": "Identifiée par la structure chimique (SMILES ou InChIKey) transmise par le laboratoire.",
        "catalogue_name": "Identifiée par son nom dans le catalogue synthwatch ; le signalement ne donnait pas "
        "sa structure.",
        "learnt_name": "Identifiée par un synonyme appris de signalements antérieurs qui en donnaient la structure ; "
        "celui-ci ne la donnait pas.",
        "unresolved_name": "Signalée par son nom seulement et non identifiée : ce nom ne correspond à aucune "
        "substance connue.",
    },
    "ar": {
        "structure": "حُدِّدت هويتها من البنية الكيميائية (SMILES أو InChIKey) التي أرسلها المختبر.",
        "catalogue_name": "حُدِّدت هويتها من اسمها في دليل synthwatch، ولم يتضمّن البلاغ بنيتها الكيميائية.",
        "learnt_name": "حُدِّدت هويتها من اسم مرادف تعلّمه النظام من بلاغات سابقة تضمّنت بنيتها، ولم يتضمّنها هذا البلاغ.",
        "unresolved_name": "أُبلغ عنها باسمها فقط ولم تُحدَّد هويتها: لا يطابق هذا الاسم أي مادة معروفة.",
    },
}


@dataclass(frozen=True, slots=True)
class Message:
    """A rendered message: what an e-mail carries, and what a webhook receiver can show as is."""

    language: str
    subject: str
    text: str
    html: str
    links: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class NeighbourView:
    """A known substance structurally close to a new one, in the reader's language."""

    name: str
    score: str  # Tanimoto similarity, two decimals as the language writes them
    family: str
    control: str
    learnt: bool  # not in the catalogue: a structure the network learnt from earlier reports


@dataclass(frozen=True, slots=True)
class GuessView:
    """A family guessed from the nearest neighbour (no SMARTS pattern matched): shown as a guess."""

    family: str
    nearest: str
    score: str


@dataclass(slots=True)
class AlertView:
    """An alert's facts, already in the reader's language; the templates only arrange them.

    Counts are kept as numbers too (``*_n``) so the templates choose the CLDR plural form with ``plural``.
    """

    alert_id: str
    type: str
    type_label: str
    severity: str
    severity_label: str
    substance: str
    substance_key: str
    inchikey: str | None
    family_label: str
    family_why: str
    control: str
    methods: str
    samples: str
    place: str
    place_short: str
    network_wide: bool
    regions: str
    family_series: bool
    window_start: str
    window_end: str
    window_days: int
    triggered: str
    triggered_date: str
    triggered_time: str
    zone: str
    observed: str
    observed_n: float
    expected: str
    expected_n: float
    ratio: str | None
    metric: str | None
    score: str | None
    odds: str | None  # "1 in N" for a spike's p-value, N a power of ten as the language writes it
    since: str | None
    other_regions: int
    link: str
    identified: str = ""  # how identity was established, one sentence ("" when not recorded)
    reporters: str = ""  # labs and agencies whose report raised it
    reporters_n: int = 0
    unusual: str = ""
    changed: str = ""  # a correction notice (listed in a digest): which report corrected which, and what changed
    late: str = ""  # why and how late, when a late report raised the alert; "" otherwise
    similar: list[NeighbourView] = field(default_factory=list)  # new substances: nearest known, best first
    guess: GuessView | None = None  # new substances no pattern classified: a family guess
    did_you_mean: str = ""  # unresolved names: catalogue names spelt like it ("A, B or C")
    # new substances: the nearest structures learnt from reports stored before a cut (never catalogue ones), and
    # that cut as the reader's moment; "" when the alert has no such section
    learnt: list[NeighbourView] = field(default_factory=list)
    learnt_as_of: str = ""
    # a new substance first reported by name only, or an ``identified`` follow-up: the name key its name-only
    # reports were alerted under, and the day of the first ("" when not known)
    former_name: str = ""
    former_since: str = ""
    language: str = "en"
    extra: dict[str, Any] = field(default_factory=dict)


def number(value: float, language: str) -> str:
    """1234.5 -> '1,234.5' (en), '1 234,5' (fr), digits as CLDR gives each locale; small non-integers keep two
    significant digits, and below 0.01 reads '<0.01'."""
    # Digits are the locale's default numbering system in CLDR: Latin digits for `ar` (CLDR 42 on), as the
    # Maghreb writes them; a locale whose default is Arabic-Indic (ar_EG, ar_SA) would get those.
    if not float(value).is_integer():
        if abs(value) >= 1:
            value = round(value, 1)
        elif abs(value) >= 0.01:
            value = float(f"{value:.2g}")
        else:
            return "<" + format_decimal(0.01, locale=language, numbering_system="default")
    return format_decimal(value, format="#,##0.##", locale=language, numbering_system="default")


def similarity(score: float, language: str) -> str:
    """A Tanimoto score with two decimals, as the language writes them: '0.71' (en), '0,71' (fr)."""
    return format_decimal(score, format="0.00", locale=language, numbering_system="default")


def _family_label(family: str | None, language: str) -> str:
    return FAMILIES[language].get(family or "", FAMILIES[language][""])[0]


def chemistry_views(alert: Alert, language: str) -> tuple[list[NeighbourView], GuessView | None, str]:
    """What a new-substance alert says a chemist would ask: nearest known substances, family guess, spellings."""
    similar = [
        NeighbourView(
            name=visible(n.name),
            score=similarity(n.score, language),
            family=_family_label(n.family, language),
            control=CONTROL_LABELS[language][n.controlled],
            learnt=not n.catalogued,
        )
        for n in alert.similar_substances
    ]
    g = alert.family_guess
    guess = (
        GuessView(_family_label(g.family, language), visible(g.nearest), similarity(g.score, language)) if g else None
    )
    names = [visible(name) for name in alert.did_you_mean]
    return similar, guess, format_list(names, style="or", locale=language) if names else ""


def learnt_views(alert: Alert, language: str) -> list[NeighbourView]:
    """The alert's nearest learnt structures: names from reports (escaped), no legal status (never a control
    label: the templates say it has none), a family from a structural pattern or "not identified"."""
    section = alert.learnt_substances
    return [
        NeighbourView(
            name=visible(n.name),
            score=similarity(n.score, language),
            family=_family_label(n.family, language),
            control="",
            learnt=True,
        )
        for n in (section.substances if section is not None else [])
    ]


def moment_text(moment: datetime, zone: ZoneInfo, language: str) -> str:
    """A moment as the alert's own time reads ("6 December 2026 at 14:03 UTC"), in the reader's zone."""
    local = moment.astimezone(zone)
    parts = {
        "triggered_date": day_text(local.date(), language),
        "triggered_time": format_time(local, format="HH:mm", locale=DATE_LOCALES[language]),
        "zone": _zone_label(zone, language),
    }
    return _render(f"{language}/moment.txt.j2", v=parts).strip()


def plural(count: float, language: str, **forms: str) -> str:
    """The CLDR plural form of ``count`` in ``language`` (``one``, ``two``, ``few``, ``many``, ``zero``,
    ``other``), with ``{n}`` replaced by the count as the language writes it; ``other`` is the fallback."""
    category = Locale.parse(language).plural_form(count)
    text = forms.get(category, forms["other"])
    return text.replace("{n}", number(count, language))


def _capitalise(text: str) -> str:
    """First letter up (a sentence shown on its own), the rest untouched: 'jamais signalée…' -> 'Jamais…'."""
    return text[:1].upper() + text[1:]


@cache
def _country_names(language: str, domain: str = "iso3166-1") -> gettext.NullTranslations:
    """ISO 3166 names in ``language`` (pycountry's catalogues; none for Arabic subdivisions: they stay as
    ISO writes them, with their code)."""
    try:
        return gettext.translation(domain, pycountry.LOCALES_DIR, languages=[language])
    except OSError:
        return gettext.NullTranslations()


def country_name(code: str | None, language: str) -> str:
    country = pycountry.countries.get(alpha_2=code) if code else None
    return _country_names(language).gettext(country.name) if country is not None else (code or "")


def place_names(region: str | None, country: str | None, language: str) -> tuple[str, str]:
    """(long, short) place names: 'Bamako (ML-BKO), Mali' and 'Bamako, Mali'."""
    subdivision = pycountry.subdivisions.get(code=region) if region else None
    nation = country_name(country or (region.split("-", 1)[0] if region else None), language)
    comma = "، " if language == "ar" else ", "
    if subdivision is None:
        return (f"{region}{comma}{nation}" if region else nation), (nation or (region or ""))
    name = _country_names(language, "iso3166-2").gettext(subdivision.name)
    return f"{name} ({region}){comma}{nation}", f"{name}{comma}{nation}"


def drilldown_url(grafana_url: str, alert: Alert) -> str:
    """The Grafana substance dashboard on this region and substance, a month before the alert to a day after."""
    start = alert.window_start - timedelta(days=30)
    end = alert.window_end + timedelta(days=1)
    country = alert.country or (alert.region.split("-", 1)[0] if alert.region else None)
    params = {
        "var-country": country or "$__all",  # the dashboard lists only the selected countries' regions
        "var-region": alert.region or "$__all",
        "var-substance": alert.substance.key,
        "from": str(int(start.timestamp() * 1000)),
        "to": str(int(end.timestamp() * 1000)),
    }
    return f"{grafana_url.rstrip('/')}/d/{DASHBOARD_UID}?{urlencode(params)}"


def day_text(day: date, language: str) -> str:
    """A calendar day as the language writes it in full: '5 December 2026', '5 décembre 2026'."""
    return format_date(day, format="long", locale=DATE_LOCALES[language])


def _zone_label(zone: ZoneInfo, language: str) -> str:
    return "UTC" if zone.key in ("UTC", "Etc/UTC") else get_timezone_location(zone, locale=language, return_city=True)


def alert_view(alert: Alert, language: str, grafana_url: str, timezone: str = "UTC") -> AlertView:
    """Everything the templates show about one alert, in ``language``, times in ``timezone`` (the officer's)."""
    if language not in LANGUAGES:
        raise ValueError(f"no templates for language {language!r}; available: {', '.join(LANGUAGES)}")
    zone = ZoneInfo(timezone)
    s = alert.substance
    family_label, family_why = FAMILIES[language].get(s.family or "", FAMILIES[language][""])
    listed = alert.details.get("regions")
    # Every value from the alert is shown through ``visible``: one line each, control characters escaped,
    # so a name with a newline cannot forge a line in the plain-text e-mail or the webhook's text.
    regions = [str(r) for r in listed] if isinstance(listed, list) else []
    separator = "، " if language == "ar" else ", "
    if alert.region:
        place, short = place_names(alert.region, alert.country, language)
    else:
        place = short = separator.join(regions[:12]) + ("…" if len(regions) > 12 else "")
    observed = alert.observed if alert.observed is not None else float(max(1, len(alert.evidence_event_ids)))
    expected = alert.expected if alert.expected is not None else 0.0
    ratio = None
    if alert.alert_type == "spike" and expected > 0:
        ratio = number(round(observed / expected, 1 if observed / expected < 10 else 0), language)
    others = alert.details.get("other_regions")
    first_day = alert.details.get("network_first_day")
    since = None
    if first_day:
        try:
            since = day_text(date.fromisoformat(str(first_day)), language)
        except ValueError:
            since = visible(str(first_day))
    triggered = alert.triggered_at.astimezone(zone)
    view = AlertView(
        alert_id=alert.alert_id,
        type=alert.alert_type,
        type_label=TYPE_LABELS[language][alert.alert_type],
        severity=alert.severity,
        severity_label=SEVERITY_LABELS[language][alert.severity],
        substance=visible(
            FAMILY_SERIES[language].format(family=family_label) if s.key.startswith("family:") else s.name
        ),
        substance_key=visible(s.key),
        inchikey=visible(s.inchikey) if s.inchikey else s.inchikey,
        family_label=family_label,
        family_why=family_why,
        control=CONTROL_LABELS[language][s.controlled],
        methods=visible(separator.join(alert.identification_methods)),
        samples=visible(
            separator.join(SAMPLE_LABELS[language].get(t, t.replace("_", " ")) for t in alert.sample_types)
        ),
        place=visible(place),
        place_short=visible(short),
        network_wide=alert.region is None,
        family_series=s.key.startswith("family:"),
        regions=visible(separator.join(regions)),
        window_start=day_text(alert.window_start.date(), language),
        window_end=day_text((alert.window_end - timedelta(microseconds=1)).date(), language),
        window_days=max(1, (alert.window_end - alert.window_start).days),
        triggered="",
        triggered_date=day_text(triggered.date(), language),
        triggered_time=format_time(triggered, format="HH:mm", locale=DATE_LOCALES[language]),
        zone=_zone_label(zone, language),
        observed=number(observed, language),
        observed_n=observed,
        expected=number(expected, language),
        expected_n=expected,
        ratio=ratio,
        metric=visible(alert.metric) if alert.metric else alert.metric,
        score=number(alert.score, language) if alert.score is not None else None,
        odds=number(10 ** int(alert.score), language) if alert.score is not None and 1 <= alert.score < 13 else None,
        since=since,
        other_regions=len(others) if isinstance(others, list) else 0,
        link=drilldown_url(grafana_url, alert),
        identified=IDENTIFIED[language].get(alert.identified_by or "", ""),
        reporters=visible(separator.join(alert.reported_by)),
        reporters_n=len(alert.reported_by),
        language=language,
    )
    if alert.alert_type in ("identified", "new_substance") and alert.details.get("name_key"):
        view.former_name = visible(str(alert.details.get("name") or alert.details.get("name_key", "")))
        view.former_since = visible(str(alert.details.get("name_first_day", "")))
    view.similar, view.guess, view.did_you_mean = chemistry_views(alert, language)
    if alert.learnt_substances is not None and alert.learnt_substances.substances:
        view.learnt = learnt_views(alert, language)
        view.learnt_as_of = moment_text(alert.learnt_substances.as_of, zone, language)
    view.triggered = _render(f"{language}/moment.txt.j2", v=view).strip()
    view.unusual = _render(f"{language}/unusual.txt.j2", v=view).strip()
    if alert.alert_type == "correction":  # in a digest (held back with the alert it corrects): what changed
        c = correction_view(alert, language, grafana_url)
        quantity = f"; {c.old_quantity or '-'} → {c.new_quantity or '-'}" if c.old_quantity or c.new_quantity else ""
        reports = f"{c.old_event_id} → {c.new_event_id}"
        view.changed = f"{c.alert_id}: {reports}; {c.old_substance} → {c.new_substance}{quantity}"
        view.unusual = ""
    if alert.reported_late and alert.late_by_hours is not None:
        view.late = late_text(alert.late_by_hours, language)
    return view


def late_text(late_by_hours: float, language: str) -> str:
    """How late the report that raised an alert was, for a reader of ``language``."""
    hours, days = round(late_by_hours, 1), round(late_by_hours / 24, 1)
    return _render(f"{language}/late.txt.j2", hours=hours, days=days, language=language).strip()


@cache
def _environment() -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE_DIR),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",), default_for_string=False),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    environment.globals["plural"] = plural
    environment.globals["number"] = number
    environment.filters["capitalise"] = _capitalise
    return environment


def _render(template: str, /, **context: Any) -> str:
    return _environment().get_template(template).render(**context)


def _subject(text: str) -> str:
    """One line: a newline in a header would let a substance name inject headers."""
    return " ".join(text.split())


@dataclass(frozen=True, slots=True)
class CorrectionView:
    """A correction notice's facts in the reader's language: which alert, which report, what changed.

    Every value from the alert goes through ``visible`` (one line, control characters escaped); the HTML
    templates escape it again (autoescape)."""

    notice_id: str
    alert_id: str  # the alert whose basis changed
    alert_type_label: str
    severity_label: str
    place: str
    old_event_id: str
    new_event_id: str
    old_substance: str
    new_substance: str
    old_quantity: str
    new_quantity: str
    reporters: str
    counts_recomputed: bool
    link: str


def _quantity_text(text: object, language: str) -> str:
    """``"1.2 kg"`` as the language writes the number (``1,2 kg``); anything else shown as it is."""
    value, _, unit = str(text).partition(" ")
    try:
        amount = float(value)
    except ValueError:
        return visible(text)
    return visible(f"{number(amount, language)} {unit}".strip())


def correction_view(alert: Alert, language: str, grafana_url: str) -> CorrectionView:
    """What a correction notice (``alert_type == "correction"``) shows, in ``language``."""
    if language not in LANGUAGES:
        raise ValueError(f"no templates for language {language!r}; available: {', '.join(LANGUAGES)}")
    d = alert.details
    corrected_type = str(d.get("corrected_alert_type", ""))
    place = place_names(alert.region, alert.country, language)[0] if alert.region else ""
    return CorrectionView(
        notice_id=visible(alert.alert_id),
        alert_id=visible(d.get("corrected_alert_id", "")),
        alert_type_label=TYPE_LABELS[language].get(corrected_type, visible(corrected_type)),
        severity_label=SEVERITY_LABELS[language][alert.severity],
        place=visible(place),
        old_event_id=visible(d.get("corrected_event_id", "")),
        new_event_id=visible(d.get("correction_event_id", "")),
        old_substance=visible(d.get("old_substance", "")),
        new_substance=visible(d.get("new_substance", "")),
        old_quantity=_quantity_text(d.get("old_quantity", ""), language),
        new_quantity=_quantity_text(d.get("new_quantity", ""), language),
        reporters=visible(", ".join(alert.reported_by)),
        counts_recomputed=bool(d.get("counts_recomputed", False)),
        link=drilldown_url(grafana_url, alert),
    )


def render_alert(alert: Alert, language: str, grafana_url: str, timezone: str = "UTC") -> Message:
    """Subject, plain text and HTML of one alert for a reader of ``language`` living in ``timezone``."""
    # a correction notice has its own templates (what changed in the report an alert rested on)
    view: AlertView | CorrectionView
    if alert.alert_type == "correction":
        view, name = correction_view(alert, language, grafana_url), "correction"
    else:
        view, name = alert_view(alert, language, grafana_url, timezone), "alert"
    return Message(
        language=language,
        subject=_subject(_render(f"{language}/{name}_subject.txt.j2", v=view)),
        text=_render(f"{language}/{name}.txt.j2", v=view),
        html=_render(f"{language}/{name}.html.j2", v=view),
        links=(view.link,),
    )


_SEVERITY_ORDER = {"critical": 0, "warning": 1, "info": 2}

#: Alerts a digest lists at most (the most severe first); the rest are counted in one line. One report of a junk
#: name raises an info alert, so a lab sending 100,000 names filled every officer's digest with 100,000 alerts:
#: ~18 CPU s of rendering on the worker's event loop per officer (0.18 ms an alert) and a ~130 MB e-mail that
#: SMTP servers refuse, refused again after every hold, so the officer got no digest at all.
DIGEST_MAX_LISTED = 200


def digest_listed(alerts: Sequence[Alert]) -> tuple[list[Alert], int]:
    """The alerts a digest lists (most severe first, at most :data:`DIGEST_MAX_LISTED`) and how many it leaves out."""
    ordered = sorted(alerts, key=lambda a: (_SEVERITY_ORDER[a.severity], a.triggered_at, a.alert_id))
    return ordered[:DIGEST_MAX_LISTED], max(0, len(ordered) - DIGEST_MAX_LISTED)


def render_digest(
    alerts: Sequence[Alert],
    language: str,
    grafana_url: str,
    day: date,
    name: str,
    timezone: str = "UTC",
    held: int = 0,
    followed: int = 0,
) -> Message:
    """One message listing ``alerts`` (most severe first, at most :data:`DIGEST_MAX_LISTED`, the rest counted) for
    the reader ``name`` on ``day`` (their local day); ``held`` of them were not below the reader's threshold but
    beyond a reporter's immediate budget of their day (the digest says so); ``followed`` are corrections that
    followed an alert held so (no notice for them, but not below the threshold either: the first sentence does not
    say they were)."""
    listed, more = digest_listed(alerts)
    views = [alert_view(alert, language, grafana_url, timezone) for alert in listed]
    context = {
        "views": views,
        "day": day_text(day, language),
        "name": visible(name),
        "count": len(views) + more,
        "more": more,
        "held": held,
        "neutral": bool(held or followed),
    }
    return Message(
        language=language,
        subject=_subject(_render(f"{language}/digest_subject.txt.j2", **context)),
        text=_render(f"{language}/digest.txt.j2", **context),
        html=_render(f"{language}/digest.html.j2", **context),
        links=tuple(v.link for v in views),
    )


@dataclass(frozen=True, slots=True)
class BudgetNoticeView:
    """What an immediate-budget notice says: which reporter, on which day, how many alerts went at once.

    ``reporter`` comes from a report (hostile): through ``visible``, and the HTML templates escape it again."""

    notice_id: str
    reporter: str
    day: str
    sent: int
    budget: int


#: How a budget notice names an organisation (the budget's unit when the keys file gives a reporter one): its id and
#: what it is, so an officer does not take it for a lab id.
ORGANISATION_NAMED = {"en": "{name} (organisation)", "fr": "{name} (organisation)", "ar": "{name} (منظمة)"}


def render_budget_notice(
    notice_id: str,
    reporter: str,
    day: date,
    sent: int,
    budget: int,
    language: str,
    *,
    organisation: bool = False,
    corrections: bool = False,
) -> Message:
    """The one notice an officer gets when ``reporter``'s first-sighting alerts of ``day`` (the officer's day)
    passed the immediate budget: ``sent`` went at once, the next ones of that day go to the daily digest.
    ``organisation``: ``reporter`` is an organisation's id (all the lab ids and agencies it reports as);
    ``corrections``: the notice that its correction notices passed their budget (``correction_budget_notice``)."""
    if language not in LANGUAGES:
        raise ValueError(f"no templates for language {language!r}; available: {', '.join(LANGUAGES)}")
    name = visible(reporter)
    if organisation:
        name = ORGANISATION_NAMED[language].format(name=name)
    view = BudgetNoticeView(visible(notice_id), name, day_text(day, language), sent, budget)
    template = "correction_budget_notice" if corrections else "budget_notice"
    return Message(
        language=language,
        subject=_subject(_render(f"{language}/{template}_subject.txt.j2", v=view)),
        text=_render(f"{language}/{template}.txt.j2", v=view),
        html=_render(f"{language}/{template}.html.j2", v=view),
    )
