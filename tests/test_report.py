"""``synthwatch report``: the overview's own SQL on real data, rendered to HTML that a real browser draws."""

from __future__ import annotations

import re
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from synthwatch.cli_dashboards import register
from synthwatch.dashboards import overview
from synthwatch.dashboards.macros import ALL, TimeRange, expand, panel_interval
from synthwatch.query import QueryError, QueryResult
from synthwatch.report import REPORT_DATA_POINTS, render_report, write_report
from synthwatch.settings import Settings
from tests.test_dashboards import DAYS, load_simulation

CHART_KINDS = {"timeseries", "bars", "pie", "geomap"}
#: What plotly draws for a bar and for a line: SVG paths with real coordinates.
MARKS = {"stacked": r'<g class="point"><path d="M[\d.]', "line": r'<path class="js-line" d="M[\d.]'}


def _browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def headless(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    """Headless Chromium with everything that would reach the network switched off."""
    return subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=20000",
            *args,
        ],
        capture_output=True,
        timeout=180,
    )


def sections(dom: str) -> dict[str, str]:
    """Each panel's <section> of the page, by panel key."""
    parts = re.split(r'(?=<section id=")', dom)
    found = {}
    for part in parts[1:]:
        key = re.match(r'<section id="([a-z_]+)"', part)
        assert key is not None
        found[key.group(1)] = part.split("</section>")[0]
    return found


@pytest.fixture
def report_file(ch: Any, ch_settings: Settings, tmp_path: Path) -> Path:
    load_simulation(ch)
    out = tmp_path / "out" / "report.html"
    result = write_report(ch_settings, out, timedelta(days=DAYS + 5))
    assert result.failed == []
    assert all(p.rows > 0 for p in result.panels), [(p.key, p.rows) for p in result.panels]
    return out


@pytest.mark.integration
def test_report_is_one_self_contained_page(report_file: Path) -> None:
    text = report_file.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    assert not re.search(r"<script[^>]+src=", text), "no external scripts"
    assert not re.search(r"<link[^>]+href=", text), "no external stylesheets"
    assert "https://cdn" not in text.split("</script>", 1)[1], "nothing loaded from a CDN after plotly itself"
    assert list(sections(text)) == [p.key for p in overview.PANELS]
    assert "Open alerts by severity" in text and "critical" in text


@pytest.mark.integration
@pytest.mark.skipif(_browser() is None, reason="no Chromium: apt-get install chromium")
def test_report_renders_its_charts_in_headless_chromium(report_file: Path, tmp_path: Path) -> None:
    browser = _browser()
    assert browser is not None
    done = headless(browser, tmp_path / "profile-dom", "--dump-dom", report_file.as_uri())
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    dom = done.stdout.decode("utf-8", errors="replace")
    by_key = sections(dom)
    for spec in overview.PANELS:
        body = by_key[spec.key]
        assert "could not be drawn" not in body, spec.key
        if spec.kind in CHART_KINDS:
            # plotly ran: it replaced the placeholder div by SVG with drawn marks
            assert 'class="main-svg"' in body, f"{spec.key}: plotly drew no SVG"
            mark = {"pie": r'<g class="slice"', "timeseries": MARKS["stacked" if spec.stacked else "line"]}.get(
                spec.kind, MARKS["stacked"]
            )
            assert len(re.findall(mark, body)) >= 2, f"{spec.key}: plotly drew no bars, slices or lines"
    screenshot = tmp_path / "report.png"
    done = headless(
        browser, tmp_path / "profile-png", f"--screenshot={screenshot}", "--window-size=1400,2400", report_file.as_uri()
    )
    assert done.returncode == 0 and screenshot.is_file(), done.stderr.decode(errors="replace")[-2000:]
    image_module = pytest.importorskip("PIL.Image")
    with image_module.open(screenshot) as image:
        raw = image.convert("RGB").resize((350, 600)).tobytes()
    pixels = [tuple(raw[i : i + 3]) for i in range(0, len(raw), 3)]
    colours = set(pixels)
    saturated = sum(1 for r, g, b in pixels if max(r, g, b) - min(r, g, b) > 60)
    assert len(colours) > 200, "the screenshot is (nearly) blank"
    assert saturated > 0.01 * len(pixels), "no coloured chart marks in the screenshot"


def test_report_runs_the_dashboards_own_sql() -> None:
    """What the report sends is the overview panel SQL expanded for the range: nothing of its own."""
    time_range = TimeRange(datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 31, tzinfo=UTC))
    sent: list[str] = []

    def runner(sql: str) -> QueryResult:
        sent.append(sql)
        if "LIMIT 200" in sql:
            raise QueryError("Code: 60. Table synthwatch.alerts does not exist")
        return QueryResult([], [])

    result = render_report(runner, time_range)
    expected = [
        expand(
            p.sql,
            time_range,
            interval=panel_interval(time_range, REPORT_DATA_POINTS, p.min_interval),
            variables={"country": ALL, "region": ALL},
        )
        for p in overview.PANELS
    ]
    assert sent == expected
    assert [p.key for p in result.failed] == ["first_appearances"]
    assert "Table synthwatch.alerts does not exist" in result.html
    assert result.html.count("No data in this range.") == len(overview.PANELS) - 3  # two stats, one failure


@pytest.mark.integration
def test_cli_report_and_dashboards_commands(
    ch: Any, ch_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    load_simulation(ch)
    monkeypatch.setenv("SYNTHWATCH_DATA_DIR", str(ch_settings.data_dir))
    monkeypatch.setenv("SYNTHWATCH_CLICKHOUSE_DATABASE", ch_settings.clickhouse_database)
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    out = tmp_path / "r.html"
    done = runner.invoke(app, ["report", "--out", str(out), "--since", f"{DAYS + 5}d"])
    assert done.exit_code == 0, done.output
    panels = len(overview.PANELS)
    assert f"{panels}/{panels} panels" in done.output and out.stat().st_size > 1_000_000
    assert runner.invoke(app, ["report", "--since", "a month"]).exit_code == 2
    done = runner.invoke(app, ["dashboards", "build", "--out", str(tmp_path / "json")])
    assert done.exit_code == 0, done.output
    assert sorted(p.name for p in (tmp_path / "json").iterdir()) == ["overview.json", "pipeline.json", "substance.json"]
    done = runner.invoke(app, ["dashboards", "check"])
    assert done.exit_code == 0, done.output
