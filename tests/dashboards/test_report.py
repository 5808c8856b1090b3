"""``synthwatch report``: the overview's own SQL on real data, rendered to HTML that a real browser draws."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from synthwatch.cli.dashboards import register
from synthwatch.dashboards import overview
from synthwatch.dashboards.macros import ALL, TimeRange, expand, panel_interval
from synthwatch.dashboards.panels import SqlPanel, num_col, text_col, time_col
from synthwatch.dashboards.report import (
    REPORT_DATA_POINTS,
    bucket_grid,
    pie_slices,
    render_report,
    time_series,
    top_series,
    write_report,
    zero_filled,
)
from synthwatch.settings import Settings
from synthwatch.stream_apps.storage.query import QueryError, QueryResult
from tests.dashboards.test_dashboards import DAYS, load_simulation

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


# --- readable charts: empty buckets, single points, many series, small slices ------------------------------

_DAY = timedelta(days=1)
_WEEK = TimeRange(datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 3, 8, tzinfo=UTC))


def test_bucket_grid_holds_the_empty_buckets_clickhouse_leaves_out() -> None:
    grid = bucket_grid(_WEEK, _DAY)
    assert grid == [datetime(2026, 3, d) for d in range(1, 8)]  # naive UTC, one per day (Mar 8 00:00 is the end)
    hours = bucket_grid(
        TimeRange(datetime(2026, 3, 1, 10, 30, tzinfo=UTC), datetime(2026, 3, 1, 13, tzinfo=UTC)), timedelta(hours=1)
    )
    assert hours == [datetime(2026, 3, 1, h) for h in (10, 11, 12)]  # aligned like toStartOfInterval


def test_zero_filled_series_and_top_regions_with_the_rest_averaged() -> None:
    spec = SqlPanel("x", "x", "timeseries", "", (time_col(), text_col("region_code"), num_col("reports")))
    rows = [
        [datetime(2026, 3, 2, tzinfo=UTC), "ML-BKO", 1],  # a single point
        [datetime(2026, 3, 1, tzinfo=UTC), "FR-75C", 4],
        [datetime(2026, 3, 5, tzinfo=UTC), "FR-75C", 2],
    ]
    axis, filled = zero_filled(time_series(spec, rows), bucket_grid(_WEEK, _DAY))
    assert len(axis) == 7
    assert filled["ML-BKO"] == [0, 1, 0, 0, 0, 0, 0]
    assert filled["FR-75C"] == [4, 0, 0, 0, 2, 0, 0]  # no line from 4 straight to 2 across empty days
    many = {f"R-{i:02d}": [float(i), float(2 * i)] for i in range(17)}
    shown = top_series(many, 5, "other regions")
    assert [name for name, _ in shown] == ["R-16", "R-15", "R-14", "R-13", "R-12", "other regions: average of 12"]
    assert shown[-1][1] == [sum(range(12)) / 12, 2 * sum(range(12)) / 12]
    assert top_series(dict(list(many.items())[:6]), 5) == sorted(
        dict(list(many.items())[:6]).items(), key=lambda kv: -sum(kv[1])
    ), "six series are shown as they are: an 'others' of one would hide a name for nothing"


def test_small_pie_slices_are_grouped() -> None:
    rows = [["opioid", 500], ["cathinone", 300], ["tryptamine", 170], ["a", 10], ["b", 10], ["c", 10]]
    assert pie_slices(rows) == [("opioid", 500), ("cathinone", 300), ("tryptamine", 170), ("others (3)", 30)]
    assert pie_slices([["x", 99], ["y", 1]]) == [("x", 99), ("y", 1)]  # one small slice stays itself


def _crafted_report(tmp_path: Path) -> Path:
    """A report of a week with a one-point series, 17 regions and a family mix with tiny shares."""
    lines = SqlPanel(
        "regions_lines",
        "Reports per region",
        "timeseries",
        "SELECT 'lines' -- $__timeInterval(t)",
        (time_col(), text_col("region_code"), num_col("reports")),
        width=24,
        min_interval="1d",
    )
    lone = SqlPanel(
        "lone_point",
        "One report in the week",
        "timeseries",
        "SELECT 'lone'",
        (time_col(), text_col("region_code"), num_col("reports")),
        width=12,
        min_interval="1d",
    )
    pie = SqlPanel(
        "families", "Reports by family", "pie", "SELECT 'pie'", (text_col("family_name"), num_col("reports"))
    )
    days = [(_WEEK.start + n * _DAY).isoformat() for n in range(7)]
    answers = {
        "'lines'": QueryResult(
            ["time", "region_code", "reports"],
            [
                [day, f"R{r:02d}", (r * 7 + d * 3) % 11 + r]
                for d, day in enumerate(days)
                for r in range(17)
                if (d + r) % 4
            ],
        ),
        "'lone'": QueryResult(["time", "region_code", "reports"], [[days[3], "ML-BKO", 1]]),
        "'pie'": QueryResult(
            ["family_name", "reports"],
            [["other_opioid", 900], ["phenethylamine", 700], ["nitazene", 400], ["fentanyl", 300]]
            + [[f"rare_{i}", 5 + i] for i in range(6)],
        ),
    }
    result = render_report(
        lambda sql: next(a for key, a in answers.items() if key in sql), _WEEK, panels=(lines, lone, pie)
    )
    assert result.failed == []
    out = tmp_path / "crafted.html"
    out.write_text(result.html, encoding="utf-8")
    return out


@pytest.mark.integration
@pytest.mark.skipif(_browser() is None, reason="no Chromium: apt-get install chromium")
def test_crafted_report_draws_points_top_regions_and_grouped_slices(tmp_path: Path) -> None:
    browser = _browser()
    assert browser is not None
    page = _crafted_report(tmp_path)
    done = headless(browser, tmp_path / "profile-dom", "--dump-dom", page.as_uri())
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    by_key = sections(done.stdout.decode("utf-8", errors="replace"))
    lines, lone, pie = by_key["regions_lines"], by_key["lone_point"], by_key["families"]
    # six legend entries: the five busiest regions, and the average of the twelve others
    assert len(re.findall(r'class="traces"', lines)) == 6 and "other regions: average of 12" in lines
    # the lone report: a line at zero through the week's seven days, a marker on each, and its name
    assert len(re.findall(r'<path class="point"', lone)) == 7 and "ML-BKO" in lone
    # small families grouped into one slice; four families plus "others"
    assert len(re.findall(r'<g class="slice"', pie)) == 5 and "others (6)" in pie
    screenshot = tmp_path / "crafted.png"
    done = headless(
        browser, tmp_path / "profile-png", f"--screenshot={screenshot}", "--window-size=1400,900", page.as_uri()
    )
    assert done.returncode == 0 and screenshot.is_file()
    shutil.copy(screenshot, Path(tempfile.gettempdir()) / "synthwatch-crafted-report.png")  # for a person to look at
