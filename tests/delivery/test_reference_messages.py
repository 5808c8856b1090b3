"""Every alert type and the digest, in every language, compared with reviewed reference texts; and the Arabic
e-mail laid out right to left by a real browser (headless Chromium, as the report is tested).

Regenerate after a deliberate change: ``.venv/bin/python -m tests.delivery.reference_messages``, then review
every changed file as a native speaker would (see tests/delivery/reference_messages/__init__.py):
regenerating is not a review.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from synthwatch.stream_apps.delivery.messages import LANGUAGES, plural, render_alert
from tests.dashboards.test_report import _browser, headless
from tests.delivery.reference_messages import GRAFANA, HERE, files, reference_alerts, reference_messages

REGENERATE = "regenerate with `.venv/bin/python -m tests.delivery.reference_messages` and review the diff by hand"


@pytest.mark.parametrize("language", LANGUAGES)
def test_every_alert_type_renders_as_the_reviewed_reference(language: str) -> None:
    rendered = {name: m for (lang, name), m in reference_messages().items() if lang == language}
    assert set(rendered) == {
        *reference_alerts(),
        "digest",
        "digest_held",
        "budget_notice",
        "budget_notice_organisation",
        "correction_budget_notice",
    }
    for name, message in rendered.items():
        for suffix, content in files(message).items():
            path = HERE / language / f"{name}.{suffix}"
            assert path.is_file(), f"missing reference {path}: {REGENERATE}"
            assert content == path.read_text(encoding="utf-8"), f"{path} drifted from the reviewed text: {REGENERATE}"


@pytest.mark.parametrize("language", ["fr", "ar"])
def test_no_english_and_no_parenthesised_plurals_in_translations(language: str) -> None:
    english = re.compile(r"\b(the|reported|report|expected|identified|times|region|days?)\b", re.IGNORECASE)
    for (lang, name), message in reference_messages().items():
        if lang != language:
            continue
        # The link, ids and names are data; every sentence around them must be in the reader's language.
        text = re.sub(r"https?://\S+", "", message.text)
        assert "(s)" not in text and "(e)" not in text, name
        assert not english.search(text), f"{name}: English left in the {language} text: {english.search(text)}"


def test_plural_forms_follow_cldr() -> None:
    forms = {"zero": "z{n}", "one": "o{n}", "two": "t{n}", "few": "f{n}", "many": "m{n}", "other": "x{n}"}
    assert [plural(n, "ar", **forms) for n in (0, 1, 2, 3, 11, 100)] == ["z0", "o1", "t2", "f3", "m11", "x100"]
    assert [plural(n, "fr", one="o{n}", other="x{n}") for n in (0, 1, 1.5, 2)] == ["o0", "o1", "o1,5", "x2"]
    assert [plural(n, "en", one="o{n}", other="x{n}") for n in (0, 1, 2)] == ["x0", "o1", "x2"]


def test_times_are_in_the_officers_zone() -> None:
    alert = reference_alerts()["new_substance"]  # 14:03 UTC
    assert "15:03 (heure de Paris)" in render_alert(alert, "fr", GRAFANA, "Europe/Paris").text
    assert "14:03 UTC" in render_alert(alert, "en", GRAFANA).text


def test_arabic_html_declares_right_to_left() -> None:
    html = reference_messages()["ar", "new_substance"].html
    assert '<html lang="ar" dir="rtl">' in html and "direction: rtl" in html


PROBE = """<script>
const th = document.querySelector("th"), td = document.querySelector("td");
const a = th.getBoundingClientRect(), b = td.getBoundingClientRect();
document.body.insertAdjacentHTML("beforeend", "<pre id=probe>" + JSON.stringify({
  direction: getComputedStyle(document.body).direction,
  align: getComputedStyle(td).textAlign,
  header_right_of_cell: a.left > b.left,
  height: document.body.scrollHeight,
}) + "</pre>");
</script>"""


def _probe(html: str, path: Path, browser: str, profile: Path) -> dict[str, object]:
    path.write_text(html.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    done = headless(browser, profile, "--dump-dom", path.as_uri())
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    found = re.search(r"<pre id=\"probe\">(.*?)</pre>", done.stdout.decode("utf-8", errors="replace"))
    assert found, "the probe did not run"
    return json.loads(found.group(1).replace("&quot;", '"'))


def _ink_centre(png: Path) -> tuple[float, int]:
    """Horizontal centre of the dark (text) pixels, as a fraction of the width, and how many there are."""
    image_module = pytest.importorskip("PIL.Image")
    with image_module.open(png) as image:
        grey = image.convert("L")
        width = grey.size[0]
        data = grey.tobytes()
    xs = [i % width for i in range(0, len(data)) if data[i] < 100]
    return (sum(xs) / len(xs) / width if xs else 0.0), len(xs)


@pytest.mark.skipif(_browser() is None, reason="no Chromium: apt-get install chromium")
def test_arabic_email_is_laid_out_right_to_left_in_chromium(tmp_path: Path) -> None:
    browser = _browser()
    assert browser is not None
    messages = reference_messages()
    ar, fr = messages["ar", "spike_count"].html, messages["fr", "spike_count"].html
    probe_ar = _probe(ar, tmp_path / "ar.html", browser, tmp_path / "profile-ar")
    probe_fr = _probe(fr, tmp_path / "fr.html", browser, tmp_path / "profile-fr")
    assert probe_ar["direction"] == "rtl" and probe_ar["align"] in ("right", "start")
    assert probe_ar["header_right_of_cell"] is True  # the row heading stands on the right, as Arabic reads
    assert probe_fr["direction"] == "ltr" and probe_fr["header_right_of_cell"] is False
    assert int(str(probe_ar["height"])) > 300  # the whole message is laid out, not an empty page
    centres = {}
    for language, html in (("ar", ar), ("fr", fr)):
        page, png = tmp_path / f"{language}-shot.html", tmp_path / f"{language}.png"
        page.write_text(html, encoding="utf-8")
        done = headless(
            browser,
            tmp_path / f"profile-png-{language}",
            f"--screenshot={png}",
            "--window-size=1000,900",
            page.as_uri(),
        )
        assert done.returncode == 0 and png.is_file(), done.stderr.decode(errors="replace")[-2000:]
        centres[language], ink = _ink_centre(png)
        assert ink > 2000, f"{language}: the screenshot is (nearly) blank"
    # The 640-pixel message sits on the right of a 1000-pixel window in Arabic and on the left in French.
    assert centres["ar"] > 0.5 > centres["fr"], centres
