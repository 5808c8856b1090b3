"""The storage layer's back-off loop (:mod:`synthwatch.stream_apps.storage.retries`): pure asyncio, no ClickHouse."""

from __future__ import annotations

import asyncio
import logging

import pytest

from synthwatch.stream_apps.storage import retries

log = logging.getLogger("test.retries")


class Flaky:
    """Fails ``failures`` times, then returns the number of calls."""

    def __init__(self, failures: int) -> None:
        self.failures, self.calls = failures, 0

    def __call__(self) -> int:
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionError(f"ClickHouse down (call {self.calls})")
        return self.calls


@pytest.fixture
def waits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The delays the loop asked to wait, without waiting them."""
    asked: list[float] = []

    async def no_wait(delay: float) -> None:
        asked.append(delay)

    monkeypatch.setattr(retries.asyncio, "sleep", no_wait)
    return asked


def test_retries_with_doubling_delays_until_the_call_works(waits: list[float]) -> None:
    call, retried, recovered = Flaky(9), [], []
    result = asyncio.run(
        retries.retry_until_done("storing events", call, log=log, on_retry=retried.append, on_success=recovered.append)
    )
    assert result == 10 and call.calls == 10
    assert waits == [0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 30.0]
    assert retried == ["storing events"] * 9 and recovered == ["storing events"]


def test_give_up_reraises_the_failure_without_counting_a_retry(waits: list[float]) -> None:
    call, retried = Flaky(5), []
    with pytest.raises(ConnectionError, match="call 3"):
        asyncio.run(
            retries.retry_until_done("storing alerts", call, log=log, give_up=lambda n: n >= 3, on_retry=retried.append)
        )
    assert call.calls == 3 and len(retried) == 2 and waits == [0.2, 0.4]


def test_each_retry_is_logged_on_the_callers_logger(waits: list[float], caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="test.retries"):
        asyncio.run(retries.retry_until_done("checking late events", Flaky(1), log=log))
    assert [r.name for r in caplog.records] == ["test.retries"]
    assert caplog.records[0].getMessage() == "checking late events failed (ClickHouse down (call 1)); retrying in 0.2 s"
