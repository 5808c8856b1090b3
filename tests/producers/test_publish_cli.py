"""``synthwatch publish`` as a lab runs it: exit codes, the summary's reasons and lines, LIMS CSV files,
and the run's metrics pushed to a real HTTP server standing in for the Pushgateway (then read by promtool)."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from synthwatch.settings import Settings
from synthwatch.stack.broker import EmbeddedBroker, free_port
from tests.conftest import isolated_settings, ndjson, run_cli
from tests.support.factories import lab, seizure

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"
RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "rules" / "synthwatch.yml"


class Pushgateway:
    """A real HTTP server that keeps every push (method, path, body) as the Pushgateway would receive it."""

    def __init__(self) -> None:
        self.pushes: list[tuple[str, str, str]] = []
        pushes = self.pushes

        class Handler(BaseHTTPRequestHandler):
            def _keep(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
                pushes.append((self.command, self.path, body))
                self.send_response(200)
                self.end_headers()

            do_PUT = do_POST = _keep

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def last_samples(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """The last push as {(sample name, labels): value}."""
        _, _, body = self.pushes[-1]
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body)
            for s in family.samples
        }

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def gateway() -> Iterator[Pushgateway]:
    running = Pushgateway()
    try:
        yield running
    finally:
        running.close()


@pytest.fixture
def settings(broker: EmbeddedBroker, tmp_path: Path, gateway: Pushgateway) -> Settings:
    return isolated_settings(broker, tmp_path / "data", pushgateway_url=gateway.url)


def _records(value: dict[tuple[str, tuple[tuple[str, str], ...]], float], outcome: str) -> float:
    return value[("synthwatch_publish_records_total", (("outcome", outcome),))]


def test_exit_codes_reasons_with_lines_and_the_pushed_counts(
    settings: Settings, tmp_path: Path, gateway: Pushgateway
) -> None:
    good = tmp_path / "good.ndjson"
    good.write_text(ndjson([seizure(event_id=f"ok-{i}") for i in range(3)]))
    done = run_cli(settings, "publish", str(good))
    assert done.returncode == 0, done.stdout + done.stderr
    pushed = gateway.last_samples()
    assert (_records(pushed, "sent"), _records(pushed, "failed")) == (3, 0)
    assert gateway.pushes[-1][:2] == ("PUT", "/metrics/job/synthwatch_publish")
    assert pushed[("synthwatch_publish_events_produced_total", (("topic", settings.topic_border_seizures),))] == 3

    mixed = tmp_path / "mixed.ndjson"
    mixed.write_text(
        ndjson([seizure(event_id="m-1"), seizure(event_id="m-2", region="XX-99"), "{not json", lab(event_id="m-4")])
        + ndjson([seizure(event_id="m-5", region="XX-99")])
    )
    done = run_cli(settings, "publish", str(mixed))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "rejected 2× region: 'XX-99' is not an ISO 3166-2 subdivision code" in done.stdout
    assert "    lines 2, 5" in done.stdout and "rejected 1× invalid JSON" in done.stdout and "    line 3" in done.stdout
    pushed = gateway.last_samples()
    assert (_records(pushed, "sent"), _records(pushed, "rejected")) == (2, 3)

    twice = tmp_path / "twice.ndjson"
    twice.write_text(
        ndjson([seizure(event_id="t-1"), seizure(event_id="t-1"), seizure(event_id="t-1", border_point="Kayes")])
    )
    done = run_cli(settings, "publish", str(twice))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "rejected 1× event_id 't-1' is earlier in this file with different content" in done.stdout
    assert "│    3 │    1 │        1 │          1 │      0 │" in done.stdout  # the identical one is a duplicate
    assert gateway.last_samples()[("synthwatch_publish_rejects_total", (("reason", "changed_content"),))] == 1

    bad = tmp_path / "bad.ndjson"
    bad.write_text(
        ndjson([seizure(event_id="b-1", region="XX-99"), seizure(event_id="b-2", occurred_at="2099-01-01T00:00:00Z")])
    )
    done = run_cli(settings, "publish", str(bad))
    assert done.returncode == 2, done.stdout + done.stderr  # nothing sent
    # a date past the send time (the worker would refuse it too): said plainly, counted under its own class
    assert "rejected 1× occurred_at: 2099-01-01T00:00:00+00:00 is " in done.stdout
    assert "days after the report was received" in done.stdout and "    line 2" in done.stdout
    assert gateway.last_samples()[("synthwatch_publish_rejects_total", (("reason", "future_occurred_at"),))] == 1


def test_empty_header_only_directory_and_csv_on_stdin(settings: Settings, tmp_path: Path) -> None:
    empty = tmp_path / "empty.ndjson"
    empty.write_text("")
    done = run_cli(settings, "publish", str(empty))
    assert done.returncode == 2 and "holds no records" in done.stderr
    header_only = tmp_path / "header.csv"
    header_only.write_text("event_id,kind,occurred_at\r\n")
    done = run_cli(settings, "publish", str(header_only))
    assert done.returncode == 2 and "holds no records (only a header row)" in done.stderr
    done = run_cli(settings, "publish", str(tmp_path))
    assert done.returncode == 2 and "is a directory" in done.stderr

    csv_text = (EXAMPLES / "lims_export.csv").read_text(encoding="utf-8-sig")
    done = run_cli(
        settings,
        "publish",
        "-",
        "--format",
        "csv",
        "--aliases",
        str(EXAMPLES / "lims_aliases.toml"),
        "--timezone",
        "Europe/Paris",
        input=csv_text,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "│    4 │    4 │        0 │" in done.stdout


def test_a_latin1_file_names_its_encoding_and_is_read_with_it(settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "douane.csv"
    header = "event_id;kind;occurred_at;country;region;substance.name;agency;seizure_id;border_point;conveyance;"
    header += "quantity.value;quantity.unit\r\n"
    row = "d-1;border_seizure;2026-03-01 10:00;ML;ML-BKO;Tramadol;Douanes maliennes;S-1;Sénou;Air;2,5;KG\r\n"
    path.write_bytes((header + row).encode("latin-1"))
    done = run_cli(settings, "publish", str(path))
    assert done.returncode == 2 and "--encoding cp1252" in done.stdout
    done = run_cli(settings, "publish", str(path), "--encoding", "cp1252", "--timezone", "Africa/Bamako")
    assert done.returncode == 0, done.stdout + done.stderr
    done = run_cli(settings, "publish", str(path), "--delimiter", ",", "--encoding", "cp1252")
    assert done.returncode == 2 and "is the file separated by ';'?" in done.stdout


def test_help_documents_the_exit_codes(tmp_path: Path) -> None:
    done = run_cli(Settings(data_dir=tmp_path), "publish", "--help")
    assert done.returncode == 0 and "Exit codes: 0 every record was sent; 1 some records were rejected" in " ".join(
        done.stdout.split()
    )


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_publish_failed_fires_on_the_series_a_failed_publish_pushed(tmp_path: Path, gateway: Pushgateway) -> None:
    """No broker at the address: every record of the file failed; the pushed series make the rule fire
    (and a good run's pushed series do not)."""
    path = tmp_path / "three.ndjson"
    path.write_text(ndjson([seizure(event_id=f"f-{i}") for i in range(3)]))
    settings = Settings(
        data_dir=tmp_path / "data",
        kafka_bootstrap_servers=f"127.0.0.1:{free_port()}",  # nothing listens there
        publish_connect_timeout_seconds=2,
        pushgateway_url=gateway.url,
    )
    done = run_cli(settings, "publish", str(path))
    assert done.returncode == 2 and "cannot talk to Kafka" in done.stderr
    failed = gateway.last_samples()
    assert _records(failed, "failed") == 3

    def series(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> list[dict[str, str]]:
        out = []
        for (name, labels), value in samples.items():
            if name == "synthwatch_publish_records_total":
                selector = ",".join(f'{k}="{v}"' for k, v in (*labels, ("job", "synthwatch_publish")))
                out.append({"series": f"{name}{{{selector}}}", "values": f"{value:g}x10"})
        return out

    good = {(n, labels): (0.0 if dict(labels).get("outcome") == "failed" else v) for (n, labels), v in failed.items()}
    fired = {
        "alertname": "SynthwatchPublishFailed",
        "eval_time": "5m",
        "exp_alerts": [
            {
                "exp_labels": {"severity": "warning", "job": "synthwatch_publish", "outcome": "failed"},
                "exp_annotations": {
                    "summary": "The last `synthwatch publish` run could not deliver 3 records",
                    "description": "Re-send the file: the publisher lists the records that were not acknowledged "
                    "by Kafka.",
                },
            }
        ],
    }
    quiet = {"alertname": "SynthwatchPublishFailed", "eval_time": "5m", "exp_alerts": []}
    test_file = tmp_path / "pushed_test.yml"
    test_file.write_text(
        yaml.safe_dump(
            {
                "rule_files": [str(RULES)],
                "evaluation_interval": "1m",
                "tests": [
                    {"interval": "1m", "input_series": series(failed), "alert_rule_test": [fired]},
                    {"interval": "1m", "input_series": series(good), "alert_rule_test": [quiet]},
                ],
            }
        )
    )
    done_rules = subprocess.run(
        ["promtool", "test", "rules", str(test_file)], capture_output=True, text=True, timeout=120
    )
    assert done_rules.returncode == 0, done_rules.stdout + done_rules.stderr
    assert json.dumps(series(failed))  # the series were built from the push, not written by hand


def _publish_with_stderr_on(settings: Settings, folder: Path, terminal: bool) -> tuple[str, str]:
    """(stdout, stderr) of ``synthwatch publish reports.ndjson`` run in ``folder``, stderr a pty or a pipe."""
    import os
    import pty
    import sys

    from tests.conftest import cli_env

    command = [sys.executable, "-m", "synthwatch.cli.main", "publish", "reports.ndjson"]
    if not terminal:
        done = subprocess.run(command, cwd=folder, env=cli_env(settings), capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout, done.stderr
    master, slave = pty.openpty()
    shown = bytearray()

    def drain() -> None:  # a full pty would block the child's writes
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the child closed its end
                return
            if not chunk:
                return
            shown.extend(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    with subprocess.Popen(
        command, cwd=folder, env=cli_env(settings), stdout=subprocess.PIPE, stderr=slave, text=True
    ) as child:
        os.close(slave)
        stdout, _ = child.communicate(timeout=120)
    reader.join(timeout=10)
    os.close(master)
    assert child.returncode == 0, stdout + shown.decode(errors="replace")
    return stdout, shown.decode(errors="replace")


def test_publish_shows_a_progress_bar_only_when_stderr_is_a_terminal(settings: Settings, tmp_path: Path) -> None:
    """A large file shows its progress at a terminal; piped, the output is the same as without a bar."""
    outputs = []
    for terminal in (False, True):
        folder = tmp_path / ("terminal" if terminal else "piped")
        folder.mkdir()
        records = [lab(event_id=f"{folder.name}-{i}", sample_id=f"S-{folder.name}-{i}") for i in range(3000)]
        (folder / "reports.ndjson").write_text(ndjson(records), encoding="utf-8")
        outputs.append(_publish_with_stderr_on(settings, folder, terminal))
    (piped_out, piped_err), (shown_out, shown_err) = outputs
    assert "3000/3000" in shown_err and "publishing" in shown_err
    assert "publishing" not in piped_err and "3000" not in piped_err
    assert shown_out == piped_out and "│ 3000 │ 3000 │" in piped_out
