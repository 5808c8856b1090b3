"""The learnt part of a new-substance alert in the officers' messages (issue 16), in en/fr/ar.

It must say which neighbours were learnt from reports and as of when, never give them a legal status, and
escape their names (they come from reports: hostile) in the text and in the HTML.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from synthwatch.schemas import Alert
from synthwatch.schemas.records import LearntNeighbours, SimilarSubstance
from synthwatch.stream_apps.delivery.messages import render_alert
from tests.support.delivery_helpers import make_alert

HOSTILE = "Proto<script>alert(1)</script>\u202ePYNE"
AS_OF = datetime(2026, 3, 2, 9, 30, tzinfo=UTC)

# language -> (the section's heading, words saying a learnt structure has no legal status, the cut as written)
EXPECTED = {
    "en": ("Similar structures reported earlier to the network", "no legal status", "2 March 2026 at 09:30 UTC"),
    "fr": ("Structures proches signalées auparavant au réseau", "aucun statut légal", "2 mars 2026 à 09:30 UTC"),
    "ar": ("بنى مشابهة أُبلغت بها الشبكة من قبل", "لا وضع قانوني لها", "09:30"),
}


def _alert(substances: list[SimilarSubstance]) -> Alert:
    return make_alert(
        similar_substances=[
            SimilarSubstance(
                name="Etonitazepyne",
                key="LQZWZCJCEPUKCJ",
                score=0.83,
                family="nitazene",
                controlled=True,
                catalogued=True,
            )
        ],
        learnt_substances=LearntNeighbours(as_of=AS_OF, substances=substances),
    )


@pytest.mark.parametrize("language", sorted(EXPECTED))
def test_learnt_neighbours_are_a_labelled_section_without_a_legal_status(language: str) -> None:
    heading, no_status, when = EXPECTED[language]
    learnt = [
        SimilarSubstance(
            name="Isotonitazepyne", key="VRKDSDBBRNHHCR", score=0.814, family="nitazene", catalogued=False
        ),
        SimilarSubstance(name=HOSTILE, key="KCRWXNIIXGBPID", score=0.8, family=None, catalogued=False),
    ]
    message = render_alert(_alert(learnt), language, "https://grafana.example")
    for body in (message.text, message.html):
        assert heading in body and no_status in body and when in body
        assert "Isotonitazepyne" in body and "Etonitazepyne" in body
    section = message.text[message.text.index(heading) :]
    isoto = next(line for line in section.splitlines() if "Isotonitazepyne" in line)
    # a learnt structure is never said to be under control, or not: it has no legal status
    assert "control" not in isoto and "contrôle" not in isoto and "رقابة" not in isoto
    assert "<script>" not in message.html and "&lt;script&gt;" in message.html
    assert "\u202e" not in message.text and "\u202e" not in message.html  # a bidi override cannot turn text round


@pytest.mark.parametrize("language", sorted(EXPECTED))
def test_no_learnt_section_when_none_was_found_or_looked_up(language: str) -> None:
    heading = EXPECTED[language][0]
    for alert in (_alert([]), make_alert()):
        message = render_alert(alert, language, "https://grafana.example")
        assert heading not in message.text and heading not in message.html
