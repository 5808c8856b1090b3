"""The worker's line about a healed detector state record: one warning, the record's name escaped (a region is a
sender's text), what moved and what was dropped."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import pytest

from synthwatch.stream_apps.detect.alerting import day_of
from synthwatch.stream_apps.detect.novelty import HealedSubstance
from synthwatch.stream_apps.detect.region import Healed
from synthwatch.stream_apps.runtime.state_tables import latest_event_time, log_healed, log_healed_substance


def test_a_healed_record_is_logged_once_with_its_name_escaped(caplog: pytest.LogCaptureFixture) -> None:
    far = datetime(2099, 6, 1, 10, tzinfo=UTC)
    caplog.set_level(logging.WARNING, logger="synthwatch.stack.worker")
    log_healed("R:ML-BKO\x1b[2J\u2028x", Healed({"border_seizure": (far, None)}, [day_of(far)], day_of(far)))
    (record,) = caplog.records
    text = record.getMessage()
    assert "region ML-BKO\\x1b[2J\\u2028x held" in text and "\x1b" not in text and "\u2028" not in text
    assert "border_seizure watermark 2099-06-01T10:00:00+00:00 -> none" in text
    assert "dropped 1 day(s): 2099-06-01" in text and "pruned as of 2099-06-01" in text
    caplog.clear()
    log_healed("S:ML-BKO|family:opioid", Healed({}, [], day_of(far)))
    assert "series ML-BKO|family:opioid held" in caplog.records[0].getMessage()


def test_the_bound_is_the_clock_plus_the_allowed_time() -> None:
    before = datetime.now(UTC)
    bound = latest_event_time(timedelta(hours=24))
    assert before + timedelta(hours=24) <= bound <= datetime.now(UTC) + timedelta(hours=24)


def test_a_healed_substance_record_is_logged_once_with_its_names_escaped(caplog: pytest.LogCaptureFixture) -> None:
    far, day = day_of(datetime(2099, 6, 1, tzinfo=UTC)), day_of(datetime(2026, 11, 2, tzinfo=UTC))
    caplog.set_level(logging.WARNING, logger="synthwatch.stack.worker")
    healed = HealedSubstance({"ML-BKO\x1b[2J": (far, day)}, ["GH\u2028AA"], [far, far], False)
    log_healed_substance("name:junk\x1b]0;x\x07", healed)
    (record,) = caplog.records
    text = record.getMessage()
    assert "substance name:junk\\x1b]0;x\\x07 held" in text and "\x1b" not in text and "\u2028" not in text
    assert "region ML-BKO\\x1b[2J last seen 2099-06-01 -> 2026-11-02" in text
    assert "dropped 1 region(s) seen only then: GH\\u2028AA" in text and "spread episode 2099-06-01..2099-06-01" in text
    caplog.clear()
    log_healed_substance("NOVEL", HealedSubstance({}, ["ML-BKO"], None, True))
    assert "its next one is a new substance" in caplog.records[0].getMessage()
