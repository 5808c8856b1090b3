"""Dashboards as code: every panel's SQL runs on the real engine and returns what its panel draws.

A simulated month goes through the real intake, sink and detectors into a database of the session's
embedded ClickHouse; each panel's SQL is expanded exactly as Grafana and the ClickHouse plugin would
(macros, variables, $__conditionalAll) and run there. The committed JSON must equal what the code
generates.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from synthwatch.dashboards import build, overview, pipeline, substance
from synthwatch.dashboards.clickhouse_query import PLUGIN_ID, Dataquery, DataqueryBuilder, QueryType, register
from synthwatch.dashboards.macros import ALL, MacroError, TimeRange, expand, panel_interval
from synthwatch.dashboards.panels import CLICKHOUSE_UID, PROMETHEUS_UID, SqlPanel, sql_text, sql_texts
from synthwatch.producers.metrics import PublisherMetrics
from synthwatch.settings import Settings
from synthwatch.stream_apps.runtime.metrics import WorkerMetrics, metric_names
from synthwatch.stream_apps.storage.clickhouse import connect, migrate

ROOT = Path(__file__).resolve().parents[2]
DAYS = 30
# Recent dates: reports_hourly keeps 400 days (TTL), older simulated reports would be dropped on insert.
START = (datetime.now(UTC) - timedelta(days=DAYS + 2)).date()
RANGE = TimeRange(datetime.combine(START, time(), UTC), datetime.combine(START + timedelta(days=DAYS), time(), UTC))
EMPTY_RANGE = TimeRange(datetime(2031, 1, 1, tzinfo=UTC), datetime(2031, 1, 2, tzinfo=UTC))


@dataclass
class LoadedData:
    client: Any
    settings: Settings
    events: int
    alerts: int


def load_simulation(client: Any, days: int = DAYS, seed: int = 7, start: date = START) -> tuple[int, int]:
    """Migrate, then store a simulated stream's events and its backtest's alerts; returns the counts."""
    from synthwatch.producers.simulate import SimulationConfig, simulate
    from synthwatch.stream_apps.detect.backtest import run_lines
    from synthwatch.stream_apps.detect.intake import Intake, RawMessage
    from synthwatch.stream_apps.detect.region import Detector, Observation
    from synthwatch.stream_apps.storage.sink import ClickHouseSink

    migrate(client)
    sim = simulate(SimulationConfig(days=days, seed=seed, start=start))
    result = Intake().process([RawMessage(f"x:{i}", line) for i, line in enumerate(sim.lines)])
    sink = ClickHouseSink(client)
    detector = Detector()  # flags late reports as the worker does (stored with late = true)
    for item in result.events:
        item.late = detector.observe(Observation.of(item)).late_by_hours is not None
    stored = sink.store_events(result.events)
    alerts = run_lines([(f"x:{i}", line) for i, line in enumerate(sim.lines)]).alerts
    sink.store_alerts(alerts)
    return stored.stored, len(alerts)


@pytest.fixture(scope="module")
def loaded(engine_dir: Path) -> Iterator[LoadedData]:
    """One database with a simulated month, shared by the module's tests (loading takes seconds)."""
    settings = Settings(data_dir=engine_dir, clickhouse_database="dashboards_month")
    client = connect(settings)
    try:
        events, alerts = load_simulation(client)
        yield LoadedData(client, settings, events, alerts)
    finally:
        client.command(f"DROP DATABASE IF EXISTS {settings.clickhouse_database}")
        client.close()


def run_panel(client: Any, spec: SqlPanel, time_range: TimeRange, variables: dict[str, Any]) -> tuple[list[str], list]:
    """Column names (from DESCRIBE: chDB gives none for an empty result) and rows of the expanded SQL."""
    sql = expand(
        spec.sql, time_range, interval=panel_interval(time_range, 1000, spec.min_interval), variables=variables
    )
    names = [row[0] for row in client.query(f"DESCRIBE ({sql})").result_rows]
    result = client.query(sql)
    if result.result_rows:
        assert list(result.column_names) == names
    return names, [list(row) for row in result.result_rows]


def _top_substance(client: Any) -> tuple[str, str, list[str]]:
    """The most reported substance, the country with most of its reports, and two of that country's regions."""
    key = client.query(
        "SELECT substance_key FROM reports_daily GROUP BY substance_key ORDER BY sum(reports) DESC LIMIT 1"
    )
    substance_key = key.result_rows[0][0]
    rows = client.query(
        "SELECT toString(country), toString(region) FROM reports_daily WHERE substance_key = {k:String} "
        "GROUP BY country, region ORDER BY sum(reports) DESC",
        parameters={"k": substance_key},
    ).result_rows
    country = rows[0][0]
    regions = [r for c, r in rows if c == country][:2]
    return substance_key, country, regions


# --- the SQL of every panel, on real data --------------------------------------------------------------


EVERYWHERE = {"country": ALL, "region": ALL}


@pytest.mark.integration
@pytest.mark.parametrize("spec", overview.PANELS, ids=lambda s: s.key)
def test_overview_panel_sql_returns_the_panel_shape(loaded: LoadedData, spec: SqlPanel) -> None:
    _, country, regions = _top_substance(loaded.client)
    for variables in (EVERYWHERE, {"country": [country], "region": ALL}, {"country": [country], "region": regions}):
        names, rows = run_panel(loaded.client, spec, RANGE, variables)
        assert rows, f"{spec.key} with {variables}: no rows for a simulated month"
        assert spec.shape_errors(names, rows) == [], variables
    names, rows = run_panel(loaded.client, spec, EMPTY_RANGE, EVERYWHERE)
    assert spec.shape_errors(names, rows) == [], "an empty time range must still give the panel's shape"


@pytest.mark.integration
def test_overview_country_and_region_variables_narrow_every_panel(loaded: LoadedData) -> None:
    """The numbers under a selection are the stored numbers of that place, not of the network."""
    _, country, regions = _top_substance(loaded.client)
    regions = regions[:1]  # one region of the country (the country may have only two)
    figures = next(p for p in overview.PANELS if p.key == "key_figures")
    by_place = {}
    for label, variables in (
        ("all", EVERYWHERE),
        ("country", {"country": [country], "region": ALL}),
        ("regions", {"country": ALL, "region": regions}),
    ):
        by_place[label] = run_panel(loaded.client, figures, RANGE, variables)[1][0][0]
    stored = {
        label: loaded.client.query(
            f"SELECT sum(reports) FROM reports_daily WHERE day >= %(a)s AND day <= %(b)s AND {where}",
            parameters={"a": RANGE.start.date(), "b": RANGE.end.date(), "c": country, "r": regions},
        ).result_rows[0][0]
        for label, where in (("all", "1"), ("country", "country = %(c)s"), ("regions", "region IN %(r)s"))
    }
    assert by_place == stored
    assert stored["all"] > stored["country"] > stored["regions"] > 0
    by_region = next(p for p in overview.PANELS if p.key == "reports_by_region")
    _, rows = run_panel(loaded.client, by_region, RANGE, {"country": ALL, "region": regions})
    assert {row[1] for row in rows} == set(regions)
    latest = next(p for p in overview.PANELS if p.key == "latest_alerts")
    _, rows = run_panel(loaded.client, latest, RANGE, {"country": [country], "region": ALL})
    assert rows and {row[3][:2] for row in rows} == {country}


@pytest.mark.integration
def test_overview_variables_list_countries_and_regions(loaded: LoadedData) -> None:
    _, country, regions = _top_substance(loaded.client)
    countries = [r[0] for r in loaded.client.query(expand(overview.VARIABLES[0].sql, RANGE)).result_rows]
    assert country in countries
    region_sql = expand(overview.VARIABLES[1].sql, RANGE, variables={"country": [country]})
    in_country = [r[0] for r in loaded.client.query(region_sql).result_rows]
    assert set(regions) <= set(in_country) and all(r.startswith(f"{country}-") for r in in_country)


def _substance_selections(client: Any) -> list[dict[str, Any]]:
    substance_key, country, regions = _top_substance(client)
    return [
        {"substance": substance_key, "country": ALL, "region": ALL, "family": ALL},
        {"substance": substance_key, "country": [country], "region": regions, "family": ALL},
    ]


@pytest.mark.integration
@pytest.mark.parametrize("spec", substance.PANELS, ids=lambda s: s.key)
def test_substance_panel_sql_returns_the_panel_shape(loaded: LoadedData, spec: SqlPanel) -> None:
    for variables in _substance_selections(loaded.client):
        names, rows = run_panel(loaded.client, spec, RANGE, variables)
        assert rows, f"{spec.key} with {variables}: no rows"
        assert spec.shape_errors(names, rows) == [], variables
    names, rows = run_panel(loaded.client, spec, EMPTY_RANGE, _substance_selections(loaded.client)[0])
    assert spec.shape_errors(names, rows) == []


@pytest.mark.integration
def test_substance_filters_narrow_the_panels(loaded: LoadedData) -> None:
    """Choosing a country and regions keeps only their rows (the filters are really applied)."""
    everywhere, narrowed = _substance_selections(loaded.client)
    spec = next(p for p in substance.PANELS if p.key == "regions_seen")
    _, all_rows = run_panel(loaded.client, spec, RANGE, everywhere)
    _, some_rows = run_panel(loaded.client, spec, RANGE, narrowed)
    assert {row[1] for row in some_rows} == set(narrowed["region"])
    assert len(all_rows) > len(some_rows)


@pytest.mark.integration
def test_substance_variables_list_what_the_panels_filter_on(loaded: LoadedData) -> None:
    values: dict[str, list[list[str]]] = {}
    for variable in substance.VARIABLES:
        sql = expand(variable.sql, RANGE, variables={"family": ALL, "country": ALL})
        result = loaded.client.query(sql)
        rows = [list(row) for row in result.result_rows]
        assert rows, variable.name
        assert variable.shape_errors(list(result.column_names), rows) == []
        values[variable.name] = rows
    substance_key, country, regions = _top_substance(loaded.client)
    assert [substance_key, values["substance"][0][1]] in values["substance"] or substance_key in {
        r[0] for r in values["substance"]
    }
    assert [country] in values["country"]
    # region list follows the country selection; substance list follows the family selection
    region_var = next(v for v in substance.VARIABLES if v.name == "region")
    in_country = loaded.client.query(expand(region_var.sql, RANGE, variables={"country": [country]})).result_rows
    assert {r[0] for r in in_country} >= set(regions)
    assert len(in_country) < len(values["region"])
    family = values["family"][0][0]
    substance_var = next(v for v in substance.VARIABLES if v.name == "substance")
    of_family = loaded.client.query(expand(substance_var.sql, RANGE, variables={"family": [family]})).result_rows
    assert 0 < len(of_family) < len(values["substance"])


#: Values any viewer can give any variable through the URL (``?var-substance=...``, ``&var-country=...``). Under
#: Grafana's ``singlequote`` format (it escapes the quote only; ClickHouse also reads a backslash as an escape) the
#: first left its string: ``substance_key = '\\' OR 1=1 --'`` showed every substance, and any SELECT could follow.
URL_VALUES = ("\\' OR 1=1 --", "\\", "x') OR 1=1 OR (1 IN ('", "%27) OR 1=1 --")


@pytest.mark.integration
def test_variables_set_through_the_url_never_leave_their_strings(loaded: LoadedData) -> None:
    """Every panel and variable query that reads a variable, given a hostile value in it, runs and returns exactly
    what it returns for a value that matches nothing."""
    substance_key = _top_substance(loaded.client)[0]
    base = {"substance": substance_key, "country": ALL, "region": ALL, "family": ALL}
    nothing = "NO-SUCH-VALUE"
    cases: list[tuple[str, str, Any]] = [
        *((spec.key, name, spec) for spec in overview.PANELS for name in ("country", "region")),
        *((spec.key, name, spec) for spec in substance.PANELS for name in ("substance", "country", "region")),
        *((v.name, name, v) for v in (*overview.VARIABLES, *substance.VARIABLES) for name in ("country", "family")),
    ]
    checked = 0
    for key, name, item in cases:
        if f"${{{name}:" not in item.sql and f"${name}" not in item.sql:
            continue

        def rows(value: str, item: Any = item, name: str = name) -> list[Any]:
            variables = {**base, name: value if name == "substance" else [value]}
            if isinstance(item, SqlPanel):
                return run_panel(loaded.client, item, RANGE, variables)[1]
            return [list(r) for r in loaded.client.query(expand(item.sql, RANGE, variables=variables)).result_rows]

        expected = rows(nothing)
        for value in URL_VALUES:
            assert rows(value) == expected, f"{key}: ${name} = {value!r}"
        checked += 1
    assert checked >= 20, checked


#: Values as Grafana's ``percentencode`` sends them (its ``encodeURIComponentStrict``: ``encodeURIComponent``, then
#: ``! ' ( ) *`` as %XX; an array as ``{a,b}`` encoded whole), written out by hand from that definition.
GRAFANA_PERCENTENCODE = {
    "N,N-DMT": "N%2CN-DMT",
    "name:2,5-dimethoxy-4-bromophenethylamine": "name%3A2%2C5-dimethoxy-4-bromophenethylamine",
    "Île-de-France": "%C3%8Ele-de-France",
    "القاهرة": "%D8%A7%D9%84%D9%82%D8%A7%D9%87%D8%B1%D8%A9",
    "a b+c~!*()'%": "a%20b%2Bc~%21%2A%28%29%27%25",
}


@pytest.mark.integration
def test_variable_values_reach_clickhouse_whole(loaded: LoadedData) -> None:
    """What Grafana's percentencode sends, ClickHouse's decodeURLComponent gives back exactly: a substance key with
    commas (single-valued, never split), UTF-8 names, ``+`` (not a space: decodeURLComponent is not the form
    decoder). A multi-value arrives as ``{a,b}`` and is split on commas, so a multi-valued variable may only hold
    values without commas or braces: ISO codes and family names, validated at intake; this checks what they list."""
    for value, sent in GRAFANA_PERCENTENCODE.items():
        assert expand("${v:percentencode}", RANGE, variables={"v": value}) == sent
        sql = expand(f"SELECT {sql_text('v')}", RANGE, variables={"v": value})
        assert loaded.client.query(sql).result_rows == [(value,)], value
    assert expand("${v:percentencode}", RANGE, variables={"v": ["FR", "ML-BKO"]}) == "%7BFR%2CML-BKO%7D"
    for multi, expected in ((["FR", "ML-BKO"], ["FR", "ML-BKO"]), (["SN"], ["SN"]), ("ML", ["ML"])):
        sql = expand(f"SELECT {sql_texts('v')}", RANGE, variables={"v": multi})  # a string: one value from a URL
        assert loaded.client.query(sql).result_rows == [(expected,)], multi
    base = {"country": ALL, "region": ALL, "family": ALL}
    listed = 0
    for variable in (*overview.VARIABLES, *substance.VARIABLES):
        if not variable.multi:
            continue
        for value, *_ in loaded.client.query(expand(variable.sql, RANGE, variables=base)).result_rows:
            assert not set(value) & set(",{}"), f"${variable.name} lists {value!r}: sql_texts would split it"
            listed += 1
    assert listed > 10, listed


@pytest.mark.integration
def test_alert_counts_match_the_alerts_stored(loaded: LoadedData) -> None:
    spec = next(p for p in overview.PANELS if p.key == "open_alerts")
    _, rows = run_panel(
        loaded.client, spec, TimeRange(RANGE.start - timedelta(days=2), RANGE.end + timedelta(days=5)), EVERYWHERE
    )
    assert sum(rows[0]) == loaded.alerts


@pytest.mark.integration
def test_report_delay_per_lab_shows_each_labs_delays_and_late_reports(loaded: LoadedData) -> None:
    spec = next(p for p in overview.PANELS if p.key == "report_delay_per_lab")
    _, rows = run_panel(loaded.client, spec, RANGE, EVERYWHERE)
    delays: dict[str, list[float]] = {}
    late: dict[str, int] = {}
    stored = loaded.client.query(
        "SELECT toString(lab_id), occurred_at, reported_at, late FROM lab_detections "
        "WHERE occurred_at >= %(a)s AND occurred_at < %(b)s",
        parameters={"a": RANGE.start, "b": RANGE.end},
    ).result_rows
    for lab_id, occurred, reported, is_late in stored:
        late[lab_id] = late.get(lab_id, 0) + int(is_late)
        if reported is not None:
            delays.setdefault(lab_id, []).append((reported - occurred).total_seconds() / 3600)
    print(f"{len(rows)} labs; late lab reports {sum(late.values())}; slowest {rows[0]}")
    assert {row[0] for row in rows} == set(delays)
    for lab_id, reports, median, p95, longest, late_reports in rows:
        assert reports == sum(1 for r in stored if r[0] == lab_id)
        assert longest == round(max(delays[lab_id]), 1)
        assert min(delays[lab_id]) <= median <= p95 <= longest
        assert late_reports == late[lab_id]
    assert [row[3] for row in rows] == sorted((row[3] for row in rows), reverse=True)
    assert sum(late.values()) > 0, "the simulated month has lab reports stored late"


@pytest.mark.integration
def test_a_corrected_report_counts_once_in_the_overview(ch: Any) -> None:
    """A lab's misidentification corrected (migration 0012 retracts the original): reports, distinct
    substances and regions count the report once, under the right substance, in every panel that counts them."""
    from synthwatch.stream_apps.detect.corrections import corrected_key, judge_corrections, known_reports
    from synthwatch.stream_apps.detect.intake import Intake, RawMessage
    from synthwatch.stream_apps.storage.corrections import stored_reports
    from synthwatch.stream_apps.storage.sink import ClickHouseSink
    from tests.support.factories import lab

    migrate(ch)
    sink = ClickHouseSink(ch)
    day = f"{START + timedelta(days=3)}T09:00:00Z"

    def take(*records: dict[str, Any]) -> None:
        items = Intake().process([RawMessage(f"t:0:{r['event_id']}", json.dumps(r)) for r in records]).events
        named = {k for i in items if (k := corrected_key(i.event)) is not None}
        judged = judge_corrections(items, known_reports(stored_reports(ch, sorted(named)), [], named), str)
        assert not judged.rejects
        sink.store_events(judged.kept)

    wrong = {"name": "isotonitazene"}
    take(lab(event_id="L-0", occurred_at=day), lab(event_id="L-1", occurred_at=day, substance=wrong))
    take(lab(event_id="L-2", occurred_at=day, corrects="L-1", substance={"name": "3-MMC"}))
    panels = {p.key: p for p in overview.PANELS}
    _, ((reports, _grams, substances, regions),) = run_panel(ch, panels["key_figures"], RANGE, EVERYWHERE)
    assert (reports, substances, regions) == (2, 1, 1)  # 3 reports and 2 substances without the retraction
    _, top = run_panel(ch, panels["top_substances"], RANGE, EVERYWHERE)
    assert [(row[0], row[2], row[6]) for row in top] == [("3-MMC", 2, 1)]
    _, by_region = run_panel(ch, panels["regions"], RANGE, EVERYWHERE)
    assert [(row[1], row[2], row[6]) for row in by_region] == [("FR-75C", 2, 1)]


# --- the generated JSON ---------------------------------------------------------------------------------


def test_committed_json_is_up_to_date() -> None:
    stale = build.stale()
    assert stale == [], f"stale dashboards/json: {stale}; run `synthwatch dashboards build`"


def test_stale_detects_an_edited_file(tmp_path: Path) -> None:
    build.write_all(tmp_path)
    assert build.stale(tmp_path) == []
    path = tmp_path / "overview.json"
    path.write_text(path.read_text().replace("Open alerts", "Closed alerts"))
    (tmp_path / "leftover.json").write_text("{}")
    assert build.stale(tmp_path) == ["overview", "leftover"]


def _targets(board: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            yield panel, target


def test_clickhouse_targets_carry_the_plugin_fields() -> None:
    for name in ("overview", "substance"):
        board = build.as_dict(name)
        targets = list(_targets(board))
        assert targets
        for panel, target in targets:
            assert target["datasource"] == panel["datasource"] == {"type": PLUGIN_ID, "uid": "${datasource}"}
            assert target["editorType"] == "sql"
            assert int(target["pluginVersion"].split(".")[0]) >= 4  # else the plugin migrates it as v3
            expected = (0, "timeseries") if panel["type"] == "timeseries" else (1, "table")
            assert (target["format"], target["queryType"]) == expected, panel["title"]
            assert target["rawSql"].strip() and target["refId"] == "A"
        ids = [panel["id"] for panel in board["panels"]]
        assert len(ids) == len(set(ids))


def test_panels_follow_the_time_picker() -> None:
    """Every panel filters on the dashboard range, except the substance's all-time profile tables."""
    all_time = {"profile", "regions_seen"}
    for spec in (*overview.PANELS, *substance.PANELS):
        uses_range = re.search(r"\$__(timeFilter|dateFilter|dateTimeFilter|dt|fromTime|toTime)\b", spec.sql)
        assert bool(uses_range) != (spec.key in all_time), spec.key
        if spec.kind == "timeseries":
            assert "$__timeInterval(" in spec.sql, spec.key


def test_substance_dashboard_has_its_uid_and_variables() -> None:
    board = build.as_dict("substance")
    assert board["uid"] == "synthwatch-substance"
    names = [v["name"] for v in board["templating"]["list"]]
    assert names == ["datasource", "family", "substance", "country", "region"]
    assert [v["name"] for v in build.as_dict("overview")["templating"]["list"]] == ["datasource", "country", "region"]
    for name in ("overview", "substance", "pipeline"):
        # a variable is defined before any variable whose query (or datasource) uses it
        variables = build.as_dict(name)["templating"]["list"]
        for i, variable in enumerate(variables):
            for later in variables[i + 1 :]:
                assert f"${later['name']}" not in json.dumps([variable["query"], variable.get("datasource")])
    link = overview.SUBSTANCE_LINK
    assert link.startswith("/d/synthwatch-substance/") and "var-substance=" in link
    url = substance.substance_url("http://grafana:3000/", "name:foo bar", region="FR-75C")
    assert url == "http://grafana:3000/d/synthwatch-substance/substance?var-substance=name%3Afoo+bar&var-region=FR-75C"


def test_dashboards_read_back_with_the_sdk() -> None:
    """The ClickHouse dataquery is a proper SDK variant: the SDK parses our JSON back into it."""
    from grafana_foundation_sdk.models.dashboard import Dashboard

    register()
    parsed = Dashboard.from_json(build.as_dict("overview"))
    assert parsed.panels
    first = parsed.panels[0]
    target = first.targets[0]  # type: ignore[union-attr]
    assert isinstance(target, Dataquery)
    assert "$__timeFilter(triggered_at)" in target.raw_sql
    built = DataqueryBuilder().raw_sql("SELECT 1").query_type(QueryType.TIME_SERIES).ref_id("B").build()
    assert built.to_json()["format"] == 0 and Dataquery.from_json(built.to_json()).to_json() == built.to_json()


@pytest.mark.parametrize("name", sorted(build.DASHBOARDS))
def test_dashboards_import_into_a_grafana_with_other_datasource_uids(name: str) -> None:
    """No datasource uid is written in the JSON: a datasource variable picks it, its default asked on import.

    What Grafana's import does is done here: each ``${DS_...}`` of ``__inputs`` replaced by the uid the user
    chose; every panel, target and query variable must then reach that datasource through the variable.
    """
    text = build.render(name)
    assert CLICKHOUSE_UID not in text and PROMETHEUS_UID not in text
    board = json.loads(text)
    inputs = {i["name"]: i for i in board["__inputs"]}
    placeholders = set(re.findall(r"\$\{(DS_[A-Z_]+)\}", text))
    assert placeholders == set(inputs) and inputs, "every placeholder is asked for on import, nothing more"
    chosen = {key: f"their-{key.lower()}-uid" for key in inputs}
    imported = json.loads(re.sub(r"\$\{(DS_[A-Z_]+)\}", lambda m: chosen[m.group(1)], text))
    variables = {v["name"]: v for v in imported["templating"]["list"]}
    by_plugin = {}
    for key, item in inputs.items():
        assert item["type"] == "datasource"
        source = next(v for v in variables.values() if v["type"] == "datasource" and v["query"] == item["pluginId"])
        assert source["current"]["value"] == chosen[key]
        by_plugin[item["pluginId"]] = "${" + source["name"] + "}"
    refs = [panel["datasource"] for panel in imported["panels"]]
    refs += [target["datasource"] for _, target in _targets(imported)]
    refs += [v["datasource"] for v in variables.values() if v["type"] == "query"]
    assert refs and all(ref == {"type": ref["type"], "uid": by_plugin[ref["type"]]} for ref in refs), refs
    required = {(r["type"], r["id"]) for r in board["__requires"]}
    assert ("grafana", "grafana") in required
    assert {("panel", p["type"]) for p in board["panels"]} <= required
    if PLUGIN_ID in by_plugin:
        plugin = next(r for r in board["__requires"] if r["id"] == PLUGIN_ID)
        assert int(plugin["version"].split(".")[0]) >= 4


def test_required_grafana_is_the_one_deployed() -> None:
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    images = [s.get("image", "") for s in compose["services"].values()]
    assert f"grafana/grafana-oss:{build.GRAFANA_VERSION}" in images


def test_uids_match_provisioning() -> None:
    provisioning = ROOT / "deploy" / "grafana" / "provisioning"
    datasources = yaml.safe_load((provisioning / "datasources" / "datasources.yaml").read_text())["datasources"]
    by_uid = {d["uid"]: d for d in datasources}
    assert by_uid[CLICKHOUSE_UID]["type"] == PLUGIN_ID
    assert by_uid[PROMETHEUS_UID]["type"] == "prometheus"
    uids = {build.as_dict(name)["uid"] for name in build.DASHBOARDS}
    assert uids == {"synthwatch-overview", "synthwatch-substance", "synthwatch-pipeline"}


# --- Prometheus panels ----------------------------------------------------------------------------------


def test_pipeline_panels_read_metrics_that_exist() -> None:
    from faust.sensors.prometheus import FaustMetrics
    from prometheus_client import CollectorRegistry

    faust_registry = CollectorRegistry()
    FaustMetrics.create(faust_registry, "faust")  # the names attach_metrics' Faust sensor exports
    known = metric_names(WorkerMetrics().registry) | metric_names(PublisherMetrics().registry) | {"up"}
    known |= metric_names(faust_registry)
    for spec in pipeline.PANELS:
        text = " ".join(t.expr for t in spec.targets)
        used = set(re.findall(r"\b(synthwatch_\w+|faust_\w+|up)\b(?=[{\[ )])", text + " "))
        assert used, spec.key
        assert used <= known, f"{spec.key}: unknown metrics {used - known}"
        assert set(spec.metrics) <= used | {m for m in spec.metrics if m in text}
    board = build.as_dict("pipeline")
    for panel, target in _targets(board):
        assert target["datasource"] == panel["datasource"] == {"type": "prometheus", "uid": "${prometheus}"}


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_pipeline_promql_parses(tmp_path: Path) -> None:
    rules = [
        {"record": f"synthwatch:check_{spec.key}_{i}", "expr": t.expr.replace("$__rate_interval", "5m")}
        for spec in pipeline.PANELS
        for i, t in enumerate(spec.targets)
    ]
    path = tmp_path / "exprs.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard-exprs", "rules": rules}]}))
    done = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


# --- macro expansion ------------------------------------------------------------------------------------

_R = TimeRange(datetime(2022, 10, 21, 16, 25, 33, 123000, tzinfo=UTC), datetime(2022, 10, 23, 8, 0, tzinfo=UTC))


def test_plugin_macros_expand_like_the_plugin() -> None:
    """Expected strings follow the plugin's Go macros (toDateTime(unix s), fromUnixTimestamp64Milli(ms))."""
    interval = timedelta(minutes=5)
    cases = {
        "$__timeFilter(t)": "t >= toDateTime(1666369533) AND t <= toDateTime(1666512000)",
        "$__timeFilter_ms(t)": (
            "t >= fromUnixTimestamp64Milli(1666369533123) AND t <= fromUnixTimestamp64Milli(1666512000000)"
        ),
        "$__dateFilter(d)": "d >= toDate('2022-10-21') AND d <= toDate('2022-10-23')",
        "$__dateTimeFilter(d, t)": (
            "(d >= toDate('2022-10-21') AND d <= toDate('2022-10-23')) AND "
            "(t >= toDateTime(1666369533) AND t <= toDateTime(1666512000))"
        ),
        "$__fromTime": "toDateTime(1666369533)",
        "$__toTime_ms": "fromUnixTimestamp64Milli(1666512000000)",
        "$__timeInterval(t)": "toStartOfInterval(toDateTime(t), INTERVAL 300 second)",
        "$__timeInterval_ms(t)": "toStartOfInterval(toDateTime64(t, 3), INTERVAL 300000 millisecond)",
        "$__interval_s": "300",
        "$__from-$__to $__interval": "1666369533123-1666512000000 5m",
    }
    for macro, expected in cases.items():
        assert expand(macro, _R, interval=interval) == expected, macro


def test_variables_and_conditional_all() -> None:
    sql = "WHERE $__conditionalAll(c IN (${c:singlequote}), $c) AND r = $r AND s IN ($m) AND x = ${q:sqlstring}"
    got = expand(sql, _R, variables={"c": ALL, "r": "FR-75C", "m": ["a", "b"], "q": "it's"})
    assert got == "WHERE 1=1 AND r = FR-75C AND s IN ('a','b') AND x = 'it''s'"
    got = expand(sql, _R, variables={"c": ["FR", "N'L"], "r": "x", "m": ["a"], "q": "y"})
    assert got.startswith("WHERE c IN ('FR','N\\'L') AND")
    with pytest.raises(MacroError, match="unknown macro"):
        expand("$__timeFiltr(t)", _R)
    with pytest.raises(MacroError, match="unknown template variable"):
        expand("x = $nope", _R)
    with pytest.raises(MacroError, match="conditionalAll"):
        expand("c IN (${c:singlequote})", _R, variables={"c": ALL})
    with pytest.raises(MacroError, match="expects 1 argument"):
        expand("$__timeFilter()", _R)
    # The plugin splits $__conditionalAll's arguments on commas and counts parentheses, strings or not
    got = expand("$__conditionalAll(c IN splitByChar(',', f('{}')), $c)", _R, variables={"c": ["FR"]})
    assert got == "c IN splitByChar(',', f('{}'))"  # the comma nested in a call: one argument there too
    for cut_apart in (
        "$__conditionalAll(c = ',', $c)",
        "$__conditionalAll(c = ')', $c)",
        "$__conditionalAll(c = '(', $c)",
    ):
        with pytest.raises(MacroError, match=r"conditionalAll|unbalanced"):
            expand(cut_apart, _R, variables={"c": ["FR"]})


def test_panel_interval_rounds_like_grafana() -> None:
    month = TimeRange(datetime(2025, 1, 1, tzinfo=UTC), datetime(2025, 1, 31, tzinfo=UTC))
    assert panel_interval(month, 1000) == timedelta(hours=1)
    assert panel_interval(month, 1000, "1d") == timedelta(days=1)
    assert panel_interval(TimeRange.last(timedelta(hours=1)), 1000) == timedelta(seconds=5)


def test_json_files_are_valid_json() -> None:
    for path in sorted(build.JSON_DIR.glob("*.json")):
        board = json.loads(path.read_text())
        assert board["title"].startswith("synthwatch")
