"""Rendering alerts (and daily digests) for people, per language, from the jinja2 templates.

Facts are computed here once (numbers formatted the way each language writes them, place names from
ISO 3166 in the reader's language, the family and why it matters); the wording lives in
``templates/<language>/`` so a translator edits one folder. Every message answers the same questions:
what was seen, where, how unusual (observed vs expected), what family and why it matters, and where to
look (the Grafana drill-down).
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

import jinja2
import pycountry

from synthwatch.schemas import Alert

LANGUAGES: tuple[str, ...] = ("en", "fr")
TEMPLATE_DIR = Path(__file__).parent / "templates"
DASHBOARD_UID = "synthwatch-substance"

TYPE_LABELS: dict[str, dict[str, str]] = {
    "en": {
        "new_substance": "New substance",
        "first_in_region": "First appearance in the region",
        "spike": "Spike",
        "spread": "Spread",
    },
    "fr": {
        "new_substance": "Nouvelle substance",
        "first_in_region": "Première apparition dans la région",
        "spike": "Pic",
        "spread": "Diffusion",
    },
}

SEVERITY_LABELS: dict[str, dict[str, str]] = {
    "en": {"info": "Information", "warning": "Warning", "critical": "CRITICAL"},
    "fr": {"info": "Information", "warning": "Avertissement", "critical": "CRITIQUE"},
}

CONTROL_LABELS: dict[str, dict[bool | None, str]] = {
    "en": {True: "under international control", False: "not under international control", None: "control unknown"},
    "fr": {
        True: "sous contrôle international",
        False: "non soumise au contrôle international",
        None: "statut de contrôle inconnu",
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
            "faux oxycodone ou comme héroïne, ils ont causé des séries de surdoses mortelles. La naloxone les "
            "neutralise, mais plusieurs doses peuvent être nécessaires.",
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
}


@dataclass(frozen=True, slots=True)
class Message:
    """A rendered message: what an e-mail carries, and what a webhook receiver can show as is."""

    language: str
    subject: str
    text: str
    html: str
    links: tuple[str, ...] = ()


@dataclass(slots=True)
class AlertView:
    """An alert's facts, already in the reader's language; the templates only arrange them."""

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
    window_start: str
    window_end: str
    window_days: int
    triggered: str
    observed: str
    expected: str
    ratio: str | None
    metric: str | None
    score: str | None
    since: str | None
    other_regions: int
    summary: str
    link: str
    unusual: str = ""
    late: str = ""  # why and how late, when a late report raised the alert; "" otherwise
    extra: dict[str, Any] = field(default_factory=dict)


def number(value: float, language: str) -> str:
    """1234.5 -> '1,234.5' (en) or '1 234,5' (fr); small non-integers keep two significant digits."""
    if float(value).is_integer():
        text = f"{int(value):,}"
    elif abs(value) >= 10:
        text = f"{value:,.1f}"
    elif abs(value) >= 0.01:
        text = f"{value:.2g}" if abs(value) < 1 else f"{value:.1f}"
    else:
        text = "<0.01"
    if language == "fr":
        text = text.replace(",", "\u202f").replace(".", ",")
    return text


@cache
def _country_names(language: str) -> gettext.NullTranslations:
    try:
        return gettext.translation("iso3166-1", pycountry.LOCALES_DIR, languages=[language])
    except OSError:
        return gettext.NullTranslations()


def country_name(code: str | None, language: str) -> str:
    country = pycountry.countries.get(alpha_2=code) if code else None
    return _country_names(language).gettext(country.name) if country is not None else (code or "")


def place_names(region: str | None, country: str | None, language: str) -> tuple[str, str]:
    """(long, short) place names: 'Bamako (ML-BKO), Mali' and 'Bamako, Mali'."""
    subdivision = pycountry.subdivisions.get(code=region) if region else None
    nation = country_name(country or (region.split("-", 1)[0] if region else None), language)
    if subdivision is None:
        return (f"{region}, {nation}" if region else nation), (nation or (region or ""))
    return f"{subdivision.name} ({region}), {nation}", f"{subdivision.name}, {nation}"


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


def _moment(value: datetime) -> str:
    return value.strftime("%Y-%m-%d %H:%M UTC")


def alert_view(alert: Alert, language: str, grafana_url: str) -> AlertView:
    """Everything the templates show about one alert, in ``language``."""
    if language not in LANGUAGES:
        raise ValueError(f"no templates for language {language!r}; available: {', '.join(LANGUAGES)}")
    s = alert.substance
    family_label, family_why = FAMILIES[language].get(s.family or "", FAMILIES[language][""])
    listed = alert.details.get("regions")
    regions = [str(r) for r in listed] if isinstance(listed, list) else []
    if alert.region:
        place, short = place_names(alert.region, alert.country, language)
    else:
        place = short = ", ".join(regions[:12]) + ("…" if len(regions) > 12 else "")
    observed = alert.observed if alert.observed is not None else float(max(1, len(alert.evidence_event_ids)))
    expected = alert.expected if alert.expected is not None else 0.0
    ratio = None
    if alert.alert_type == "spike" and expected > 0:
        ratio = number(round(observed / expected, 1 if observed / expected < 10 else 0), language)
    others = alert.details.get("other_regions")
    view = AlertView(
        alert_id=alert.alert_id,
        type=alert.alert_type,
        type_label=TYPE_LABELS[language][alert.alert_type],
        severity=alert.severity,
        severity_label=SEVERITY_LABELS[language][alert.severity],
        substance=s.name,
        substance_key=s.key,
        inchikey=s.inchikey,
        family_label=family_label,
        family_why=family_why,
        control=CONTROL_LABELS[language][s.controlled],
        methods=", ".join(alert.identification_methods),
        samples=", ".join(SAMPLE_LABELS[language].get(t, t.replace("_", " ")) for t in alert.sample_types),
        place=place,
        place_short=short,
        network_wide=alert.region is None,
        regions=", ".join(regions),
        window_start=alert.window_start.date().isoformat(),
        window_end=(alert.window_end - timedelta(microseconds=1)).date().isoformat(),
        window_days=max(1, (alert.window_end - alert.window_start).days),
        triggered=_moment(alert.triggered_at),
        observed=number(observed, language),
        expected=number(expected, language),
        ratio=ratio,
        metric=alert.metric,
        score=number(alert.score, language) if alert.score is not None else None,
        since=str(alert.details.get("network_first_day")) if alert.details.get("network_first_day") else None,
        other_regions=len(others) if isinstance(others, list) else 0,
        summary=alert.summary,
        link=drilldown_url(grafana_url, alert),
    )
    view.unusual = _render(f"{language}/unusual.txt.j2", v=view).strip()
    if alert.reported_late and alert.late_by_hours is not None:
        view.late = late_text(alert.late_by_hours, language)
    return view


def late_text(late_by_hours: float, language: str) -> str:
    """How late the report that raised an alert was, for a reader of ``language``."""
    hours, days = number(round(late_by_hours, 1), language), number(round(late_by_hours / 24, 1), language)
    if language == "fr":
        return (
            f"le signalement date de {hours} h ({days} jours) avant le plus récent de son type déjà reçu "
            "de la région ; il est enregistré à sa date, sans compter dans les pics déjà évalués."
        )
    return (
        f"the report occurred {hours} h ({days} days) before the newest report of its kind already received "
        "from the region; it is stored on its own day and left out of spike decisions already made."
    )


@cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE_DIR),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",), default_for_string=False),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def _render(template: str, /, **context: Any) -> str:
    return _environment().get_template(template).render(**context)


def _subject(text: str) -> str:
    """One line: a newline in a header would let a substance name inject headers."""
    return " ".join(text.split())


def render_alert(alert: Alert, language: str, grafana_url: str) -> Message:
    """Subject, plain text and HTML of one alert for a reader of ``language``."""
    view = alert_view(alert, language, grafana_url)
    return Message(
        language=language,
        subject=_subject(_render(f"{language}/alert_subject.txt.j2", v=view)),
        text=_render(f"{language}/alert.txt.j2", v=view),
        html=_render(f"{language}/alert.html.j2", v=view),
        links=(view.link,),
    )


_SEVERITY_ORDER = {"critical": 0, "warning": 1, "info": 2}


def render_digest(alerts: Sequence[Alert], language: str, grafana_url: str, day: date, name: str) -> Message:
    """One message listing ``alerts`` (most severe first) for the reader ``name`` on ``day``."""
    ordered = sorted(alerts, key=lambda a: (_SEVERITY_ORDER[a.severity], a.triggered_at, a.alert_id))
    views = [alert_view(alert, language, grafana_url) for alert in ordered]
    context = {"views": views, "day": day.isoformat(), "name": name, "count": len(views)}
    return Message(
        language=language,
        subject=_subject(_render(f"{language}/digest_subject.txt.j2", **context)),
        text=_render(f"{language}/digest.txt.j2", **context),
        html=_render(f"{language}/digest.html.j2", **context),
        links=tuple(v.link for v in views),
    )
