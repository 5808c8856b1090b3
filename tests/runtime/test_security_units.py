"""Issue 12's pure-logic defences, fast: what the integration tests in test_security.py exercise end to end."""

from __future__ import annotations

import io
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from synthwatch.producers.readers import read_csv
from synthwatch.redaction import install_log_redaction, redact, redact_url, safe_traceback, write_private
from synthwatch.schemas import Reject, WireError, parse_event
from synthwatch.schemas.reject_reasons import reject_reason, reject_reason_classes
from synthwatch.schemas.text import visible
from synthwatch.schemas.wire import RecordLimits, check_extras, check_size
from synthwatch.stream_apps.delivery.messages import render_alert
from synthwatch.stream_apps.runtime.metrics import WorkerMetrics
from synthwatch.stream_apps.runtime.web_auth import refuse_request
from synthwatch.terminal import plain
from tests.support.delivery_helpers import make_alert
from tests.support.factories import lab, seizure

# --- 3. control characters: refused at ingest, escaped on output ---------------------------------------

HOSTILE_NAMES = [
    "Isotonitazene\nSeverity: CRITICAL - evacuate",
    "x\x1b]8;;https://evil.example\x07click\x1b]8;;\x07",
    "\x1b[2J\x1b[Hcleared",
    "a\u202eevil",
    "nul\x00byte",
    "c1\x9bcontrol",
    "3-MMC\u2028Severity: CRITICAL",  # Unicode's line separator: a line break to splitlines() and many readers
    "3-MMC\u2029Severity: CRITICAL",
]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_control_characters_in_names_are_refused_with_a_reason(name: str) -> None:
    with pytest.raises(WireError) as caught:
        parse_event(json.dumps(lab(substance={"name": name})))
    assert caught.value.reason.startswith("substance.name: contains U+")
    assert "one line of printable text" in caught.value.reason
    # the reason names the character; it does not carry it
    assert not any(ch in caught.value.reason for ch in "\n\x1b\u202e\x00\x9b\u2028\u2029")


@pytest.mark.parametrize("field", ["event_id", "lab_id", "sample_id", "method"])
def test_every_text_field_refuses_control_characters(field: str) -> None:
    with pytest.raises(WireError, match=f"^{field}: contains U\\+000A"):
        parse_event(json.dumps(lab(**{field: "a\nb"})))
    for field_of_seizure in ("agency", "seizure_id", "border_point"):
        with pytest.raises(WireError, match=f"^{field_of_seizure}: contains U\\+0009"):
            parse_event(json.dumps(seizure(**{field_of_seizure: "a\tb"})))


def test_markup_looking_names_are_data_and_accepted() -> None:
    """``[/]``, ``[link=...]`` and ``:x:`` are harmless text; the danger was printing them as markup."""
    for name in ("[/]", "[link=https://evil.example]Isotonitazene[/link]", ":x: fentanyl", "Ñitazène 中文"):
        assert parse_event(json.dumps(lab(substance={"name": name}))).substance.name == name


def test_visible_escapes_controls_and_drops_bidi_marks() -> None:
    assert visible("a\nb\x1b[31m\u202ec\u200f") == "a\\nb\\x1b[31mc"
    assert visible("a\u2028b\u2029c").splitlines() == ["a\\u2028b\\u2029c"]
    assert visible("plain Ñ") == "plain Ñ"


def test_terminal_shows_data_as_text_not_markup_emoji_or_escapes() -> None:
    out = io.StringIO()
    console = Console(file=out, width=200, emoji=False, force_terminal=False, color_system=None)
    for name in ("[/]", "[link=https://evil.example]Isotonitazene[/link]", ":x:", "\x1b]8;;https://e\x07y", "a\u202eb"):
        console.print(plain(name))  # would raise MarkupError on "[/]" if parsed as markup
    text = out.getvalue()
    assert "[/]" in text and "[link=https://evil.example]Isotonitazene[/link]" in text and ":x:" in text
    assert "\x1b" not in text and "\u202e" not in text and "\u274c" not in text
    assert "\\x1b]8;;https://e\\x07y" in text


def test_a_newline_in_a_stored_name_cannot_forge_a_line_in_an_email() -> None:
    """Alerts from older rows or a forged alerts record never met the ingest check: rendering escapes too."""
    alert = make_alert(
        substance=make_alert().substance.model_copy(update={"name": "Pentyl\nSeverity: CRITICAL - evacuate"}),
        summary="x\r\nFrom: boss@example.org",
    )
    for language in ("en", "fr"):
        message = render_alert(alert, language, "https://grafana.example")
        lines = message.text.splitlines()
        assert not any(line.startswith(("Severity: CRITICAL", "From: boss")) for line in lines)
        assert "Pentyl\\nSeverity" in message.text
        assert "\n" not in message.subject and "\r" not in message.subject


# --- 4. secrets --------------------------------------------------------------------------------------


def test_redaction_hides_passwords_in_urls_texts_and_query_strings() -> None:
    assert redact_url("https://synthwatch:pa55@ch.example:8443/db") == "https://synthwatch:***@ch.example:8443/db"
    assert redact_url("https://hooks.example/x?token=abc&x=1") == "https://hooks.example/x?token=***&x=1"
    assert redact_url("https://user@hooks.example/x") == "https://user@hooks.example/x"
    text = "POST https://officer:hunter2@hooks.example/in failed; password=hunter2 token: abc Authorization: Bearer xyz"
    cleaned = redact(text)
    assert "hunter2" not in cleaned and "abc" not in cleaned and "xyz" not in cleaned
    assert "https://officer:***@hooks.example/in" in cleaned
    assert redact("smtp_password=hunter2 next") == "smtp_password=*** next"


def test_log_records_are_redacted(caplog: pytest.LogCaptureFixture) -> None:
    install_log_redaction()
    with caplog.at_level(logging.WARNING, logger="synthwatch.test"):
        logging.getLogger("synthwatch.test").warning("cannot reach %s", "http://u:s3cret@host:8123/db")
    assert "s3cret" not in caplog.text and "u:***@host" in caplog.text


def test_log_lines_cannot_be_forged_by_report_fields() -> None:
    """A newline (or ESC, CR) inside a report field that reaches a log line started a line of its own:
    an attacker could forge ``... [ERROR] ...`` records or drive the terminal of whoever tails the log.
    Arguments are escaped for every logger, whole messages for synthwatch's own; one record, one line."""
    install_log_redaction()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    # the formatter the worker's logging uses (mode's): it formats a record's arguments again
    from mode.utils.logging import ExtensionFormatter

    handler.setFormatter(ExtensionFormatter(stream, fmt="[%(levelname)s] %(name)s: %(message)s"))
    hostile = "Isotonitazene\n[2026-12-06 03:00:00,000] [1] [ERROR] forged line\r\x1b]8;;https://evil\x07"
    # the second: Faust's Recovery, subclassed in faust_transport, logs its tables under our module's name
    loggers = [
        logging.getLogger("synthwatch.stack.worker"),
        logging.getLogger("synthwatch.stream_apps.runtime.transport"),
    ]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.propagate = False
        logger.setLevel(logging.INFO)
    try:
        loggers[0].warning("delivery gave up: %s", hostile)
        loggers[0].error("not an alert (%s)", ValueError(hostile))
        loggers[0].warning("dict args %(name)s", {"name": hostile})
        loggers[0].info(f"an f-string of our own: {hostile}")  # what a careless call site does
        loggers[1].warning("Error in recovery %s", hostile)
        loggers[1].warning("a table of Faust's own\n+---+\n| x |")  # libraries keep their own layout
        loggers[0].warning("redacted: %s", "http://u:s3cret@h/")  # a changed message keeps no arguments
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(handler)
            logger.propagate = True
            logger.setLevel(level)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 9, lines  # six one-line records, and Faust's three-line table
    assert all("\x1b" not in line and "\r" not in line and "\x07" not in line for line in lines)
    assert not any(line.startswith("[2026") for line in lines)
    assert lines[-1] == "[WARNING] synthwatch.stack.worker: redacted: http://u:***@h/"
    assert lines[0] == (
        "[WARNING] synthwatch.stack.worker: delivery gave up: "
        "Isotonitazene\\n[2026-12-06 03:00:00,000] [1] [ERROR] forged line\\r\\x1b]8;;https://evil\\x07"
    )


def test_tracebacks_in_logs_keep_each_message_on_one_line_and_hide_passwords() -> None:
    """``log.exception`` printed the exception's message as Python does: a report field in it started
    forged lines, and a URL in it kept its password. Frames stay; each message (causes too) is redacted
    and one line, through the formatter the worker uses."""
    install_log_redaction()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    from mode.utils.logging import ExtensionFormatter

    handler.setFormatter(ExtensionFormatter(stream, fmt="[%(levelname)s] %(name)s: %(message)s"))
    logger = logging.getLogger("synthwatch.test.tracebacks")
    logger.addHandler(handler)
    logger.propagate = False
    hostile = "Isotonitazene\n[2026-12-06 03:00:00,000] [1] [ERROR] forged line\x1b]8;;https://evil\x07"

    def store() -> None:
        raise ConnectionError("cannot reach http://synthwatch:s3cret@ch.example:8443/db")

    try:
        try:
            store()
        except ConnectionError as error:
            raise ValueError(f"not an alert: {hostile}") from error
    except ValueError:
        logger.exception("delivery failed")
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    text = stream.getvalue()
    lines = text.splitlines()
    assert lines[0] == "[ERROR] synthwatch.test.tracebacks: delivery failed"
    assert "s3cret" not in text and "http://synthwatch:***@ch.example:8443/db" in text
    assert "\x1b" not in text and "\x07" not in text
    assert not any(line.startswith("[2026") for line in lines)
    # what Python prints, message lines apart: both tracebacks, the link between them, the frames
    assert lines.count("Traceback (most recent call last):") == 2
    assert "The above exception was the direct cause of the following exception:" in lines
    assert any(line.strip() == "store()" for line in lines)
    assert lines[-1] == (
        "ValueError: not an alert: Isotonitazene\\n[2026-12-06 03:00:00,000] [1] [ERROR] forged line"
        "\\x1b]8;;https://evil\\x07"
    )


def test_exception_groups_in_logs_keep_their_members_tracebacks_each_message_cleaned() -> None:
    """asyncio's TaskGroup raises ExceptionGroups: the hand-written traceback printed only the group's
    own message and frames, dropping each member's traceback and message. Every member is shown as
    Python shows it, its message redacted and on one line, its notes too."""
    hostile = "Isotonitazene\n[2026-12-06 03:00:00,000] [1] [ERROR] forged line"

    def deliver() -> None:
        raise ConnectionError("cannot reach https://officer:hunter2@hook.example/alerts")

    def parse() -> None:
        raise ValueError(f"bad name {hostile}")

    members: list[Exception] = []
    for step in (deliver, parse):
        try:
            step()
        except Exception as error:
            members.append(error)
    members[1].add_note(f"seen in {hostile}")
    try:
        raise ExceptionGroup("unhandled errors in a TaskGroup", members)
    except ExceptionGroup as group:
        text = safe_traceback(group)
    lines = text.splitlines()
    assert "hunter2" not in text and "https://officer:***@hook.example/alerts" in text
    assert not any(line.lstrip(" |").startswith("[2026") for line in lines)
    # both members' own frames and messages, under the group's
    assert any(line.strip(" |") == 'raise ExceptionGroup("unhandled errors in a TaskGroup", members)' for line in lines)
    assert any(line.strip(" |").endswith(", in deliver") for line in lines)
    assert any(line.strip(" |").endswith(", in parse") for line in lines)
    assert any(
        line.strip(" |").endswith(
            "ValueError: bad name Isotonitazene\\n[2026-12-06 03:00:00,000] [1] [ERROR] forged line"
        )
        for line in lines
    )
    assert any(
        line.strip(" |") == "seen in Isotonitazene\\n[2026-12-06 03:00:00,000] [1] [ERROR] forged line"
        for line in lines
    )


def test_private_files_are_0600_from_the_start(tmp_path: Path) -> None:
    target = tmp_path / "secret.json"
    old = os.umask(0)  # even with a permissive umask
    try:
        write_private(target, "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_webhook_target_in_the_deliveries_table_has_no_password() -> None:
    from synthwatch.stream_apps.delivery.subscriptions import WebhookChannel

    channel = WebhookChannel(
        type="webhook", url="https://officer:hunter2@hooks.example/in?token=t0k", secret_env="OFFICER_HOOK_SECRET"
    )
    assert channel.target == "https://officer:***@hooks.example/in"


# --- 1. who may call /sql (the real endpoint is tested in test_security.py) -----------------------------


def _headers(**changes: str) -> dict[str, str]:
    headers = {"Host": "127.0.0.1:6066", "Content-Type": "application/json", "Authorization": "Bearer tok"}
    headers.update(changes)
    return {k: v for k, v in headers.items() if v}


def test_request_checks() -> None:
    assert refuse_request(_headers(), "tok") is None
    assert refuse_request(_headers(Host="[::1]:6066"), "tok") is None
    assert refuse_request(_headers(Host="localhost"), "tok") is None
    assert refuse_request(_headers(), None) is not None  # a worker without a token serves nothing
    assert refuse_request(_headers(Authorization=""), "tok")[0] == 401  # type: ignore[index]
    assert refuse_request(_headers(Authorization="Bearer other"), "tok")[0] == 401  # type: ignore[index]
    assert refuse_request(_headers(Authorization="Basic tok"), "tok")[0] == 401  # type: ignore[index]
    assert refuse_request(_headers(Host="rebind.evil.example:6066"), "tok")[0] == 403  # type: ignore[index]
    assert refuse_request(_headers(Host="worker.internal:6066"), "tok", ["worker.internal"]) is None
    assert refuse_request(_headers(Origin="http://127.0.0.1:6066"), "tok")[0] == 403  # type: ignore[index]
    assert refuse_request(_headers(**{"Content-Type": "text/plain"}), "tok")[0] == 415  # type: ignore[index]


# --- 7. size caps ------------------------------------------------------------------------------------


def test_record_size_and_extra_field_caps() -> None:
    limits = RecordLimits(max_bytes=1000, max_extra_fields=3, max_extra_bytes=100)
    check_size(b"x" * 1000, limits)
    with pytest.raises(WireError, match="record too large: 1,001 bytes"):
        check_size(b"x" * 1001, limits)
    with pytest.raises(WireError, match="record too large: 1,002 bytes") as caught:  # 'é' is 2 bytes
        check_size('{"event_id": "e-1", "x": "' + "é" * 487 + '"}', limits)
    assert caught.value.event_id == "e-1"  # a reject can still be traced
    event = parse_event(json.dumps(lab(a=1, b=2, substance={"name": "x", "c": 3})))
    check_extras(event, limits)
    many = parse_event(json.dumps(lab(a=1, b=2, d={"e": 1}, substance={"name": "x", "c": 3})))
    with pytest.raises(WireError, match="extra_fields: 5 unknown fields, at most 3"):
        check_extras(many, limits)
    big = parse_event(json.dumps(lab(note="x" * 200)))
    with pytest.raises(WireError, match=r"extra_fields: .* bytes of unknown fields"):
        check_extras(big, limits)


def test_csv_rows_that_cannot_be_read_become_records_with_a_reason() -> None:
    huge = "x" * (200 * 1024)
    text = f"event_id,kind,substance.name\ne1,lab_detection,a\ne2,lab_detection,{huge}\ne3,lab_detection,c\n"
    records = list(read_csv(io.StringIO(text), "f.csv", max_field=128 * 1024))
    assert [r.source for r in records] == ["f.csv:2", "f.csv:3", "f.csv:4"]
    assert records[0].problem is None and records[2].problem is None
    assert records[1].problem is not None and "field larger than field limit" in records[1].problem


def test_a_header_nested_60000_levels_deep_rejects_its_rows_and_nothing_recurses() -> None:
    deep = ".".join(["a"] * 60_000)
    text = f"event_id,{deep}\ne1,x\ne2,y\n"
    records = list(read_csv(io.StringIO(text), "f.csv", max_depth=8))
    assert len(records) == 2
    assert all(r.problem and "nests 60,000 levels, at most 8" in r.problem for r in records)
    assert all(len(r.problem or "") < 300 for r in records)


# --- 8. metric label cardinality ---------------------------------------------------------------------


def _bad_messages(n: int) -> list[str]:
    """``n`` distinct bad records whose reasons all differ: each names a field of its own (an unknown key
    inside ``quantity``, as the issue's 300 series came from), some with other faults as well."""
    out = []
    for i in range(n):
        record = seizure(event_id=f"b{i}", quantity={"value": 1, "unit": "g", f"k{i}": 1})
        if i % 3 == 1:
            record["region"] = f"XX-{i}"
        if i % 3 == 2:
            record["substance"] = {"name": f"n\n{i}"}
        out.append(json.dumps(record))
    return out


def test_300_distinct_bad_messages_make_a_few_series() -> None:
    metrics = WorkerMetrics(app_id="cardinality")
    rejects: list[Reject] = []
    for i, raw in enumerate(_bad_messages(300)):
        with pytest.raises(WireError) as caught:
            parse_event(raw)
        rejects.append(Reject.of(raw, source=f"t:0:{i}", reason=caught.value.reason, stage="worker"))
    assert len({r.reason for r in rejects}) == 300  # the reasons really differ
    metrics.rejected(rejects)
    series: list[dict[str, Any]] = [
        sample.labels
        for family in text_string_to_metric_families(metrics.exposition().decode())
        if family.name == "synthwatch_rejects"
        for sample in family.samples
        if sample.name == "synthwatch_rejects_total"
    ]
    assert sum(1 for _ in series) <= 10
    assert {s["reason"] for s in series} <= reject_reason_classes()


def test_reason_classes_are_a_fixed_set() -> None:
    classes = reject_reason_classes()
    assert len(classes) < 80
    for reason in ("quantity.k9999: Extra inputs are not permitted", "zzz.yyy: whatever", "a" * 300 + ": b"):
        assert reject_reason(reason) in classes
    assert reject_reason("quantity.value: must be > 0") == "invalid_quantity_value"
    assert reject_reason("record too large: 5 bytes") == "too_large"
    assert reject_reason("extra_fields: 70 unknown fields") == "too_many_extra_fields"


# --- worker signatures on alerts and sightings ----------------------------------------------------------


def test_a_worker_signature_holds_only_for_the_same_topic_key_value_and_key(tmp_path: Path) -> None:
    from synthwatch.stream_apps.runtime.worker_signature import HEADER, WorkerKeyError, WorkerSigner, worker_key

    key = worker_key(None, tmp_path)
    assert worker_key(None, tmp_path) == key  # kept in the data directory, made once
    assert stat.S_IMODE((tmp_path / "worker-key").stat().st_mode) == 0o600
    signer = WorkerSigner(key)
    own_key = tmp_path / "worker-key"
    for loose in (0o644, 0o660, 0o604):  # loosened or copied since it was made: others read or change it
        own_key.chmod(loose)
        with pytest.raises(WorkerKeyError, match="other users can read or change it: `chmod 600"):
            worker_key(None, tmp_path)
    own_key.chmod(0o640)  # group read stays allowed, as for every key file (a Kubernetes Secret's fsGroup)
    assert worker_key(None, tmp_path) == key
    headers = signer.headers("alerts", b"k", b"v")
    assert signer.valid("alerts", b"k", b"v", headers)
    assert not signer.valid("sightings", b"k", b"v", headers)  # moved to another topic
    assert not signer.valid("alerts", b"k2", b"v", headers)
    assert not signer.valid("alerts", b"k", b"v2", headers)
    assert not signer.valid("alerts", b"k", b"v", None)
    assert not signer.valid("alerts", b"k", b"v", [(HEADER, b"\0" * 32)])
    other = WorkerSigner(worker_key("ab" * 16, tmp_path))  # the configured key wins over the file
    assert not other.valid("alerts", b"k", b"v", headers)
    assert "ab" not in repr(other)


def test_state_record_signatures_bind_the_partition_and_keys_rotate(tmp_path: Path) -> None:
    from synthwatch.stream_apps.runtime.worker_signature import WorkerSigner

    old, new = bytes.fromhex("ab" * 32), bytes.fromhex("cd" * 32)
    before = WorkerSigner([old]).headers("t-changelog", b'"S:x"', b"{}", 2)
    rotating = WorkerSigner([new, old])  # the new key signs, the old one is still accepted
    assert rotating.valid("t-changelog", b'"S:x"', b"{}", before, 2)
    assert not rotating.valid("t-changelog", b'"S:x"', b"{}", before, 3)  # replayed onto another partition
    assert not rotating.valid("t-changelog", b'"S:x"', b"{}", before)  # nor is it an unbound record
    assert not rotating.valid("t-changelog", b'"S:x"', None, before, 2)  # a forged deletion
    after = rotating.headers("t-changelog", b'"S:x"', b"{}", 2)
    assert WorkerSigner([new]).valid("t-changelog", b'"S:x"', b"{}", after, 2)
    assert not WorkerSigner([old]).valid("t-changelog", b'"S:x"', b"{}", after, 2)  # the old key signs no more
    assert "ab" not in repr(rotating) and "cd" not in repr(rotating)


def test_worker_keys_come_from_the_variable_a_file_or_the_data_dir_but_several_workers_need_one(
    tmp_path: Path,
) -> None:
    from synthwatch.stream_apps.runtime.worker_signature import WorkerKeyError, worker_keys

    assert worker_keys(f"{'cd' * 32}, {'ab' * 32}", None, tmp_path) == [b"\xcd" * 32, b"\xab" * 32]
    key_file = tmp_path / "keys"
    key_file.write_text(f"# newest first\n{'cd' * 32}\n\n{'ab' * 32}  # previous\n")
    key_file.chmod(0o644)
    with pytest.raises(WorkerKeyError, match="chmod 600"):
        worker_keys(None, key_file, tmp_path)
    key_file.chmod(0o640)  # a Kubernetes secret mount with fsGroup
    assert worker_keys(None, key_file, tmp_path) == [b"\xcd" * 32, b"\xab" * 32]
    own = worker_keys(None, None, tmp_path / "one")
    assert len(own) == 1 and (tmp_path / "one" / "worker-key").exists()
    with pytest.raises(WorkerKeyError) as refused:
        worker_keys(None, None, tmp_path / "three", workers=3)
    assert "SYNTHWATCH_WORKERS=3" in str(refused.value) and "\n" not in str(refused.value)
    assert not (tmp_path / "three").exists()  # no key made for itself
    with pytest.raises(WorkerKeyError, match="SYNTHWATCH_WORKER_KEY"):
        worker_keys("CHANGE-ME", None, tmp_path, workers=3)


def test_a_publisher_uses_the_worker_key_it_finds_and_never_makes_one(tmp_path: Path) -> None:
    """The publisher signs the rejects it sends with the worker key; it must not invent one (a lab's machine
    would then hold a key nobody checks against, and a stray file)."""
    from synthwatch.schemas.worker_keys import existing_worker_keys, worker_key
    from synthwatch.settings import Settings

    assert existing_worker_keys(Settings(data_dir=tmp_path / "lab")) is None
    assert not (tmp_path / "lab").exists()
    made = worker_key(None, tmp_path / "stack")  # what the embedded stack's worker made at its start
    assert existing_worker_keys(Settings(data_dir=tmp_path / "stack")) == [made]
    configured = Settings(data_dir=tmp_path / "lab", worker_key="ab" * 32)
    assert existing_worker_keys(configured) == [b"\xab" * 32]
