"""Checkpoint ordering: records delivered, then rows and state written, then offsets acknowledged.

The Kafka side is exercised end to end by the pipeline and reliability tests; these pin the order
and the bookkeeping with plain objects standing in for Faust's app and events.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from synthwatch.stream_apps.runtime.checkpoints import Checkpoint


@dataclass
class _Message:
    generation_id: int


@dataclass
class _Event:
    message: _Message
    log: list[str]
    name: str

    def ack(self) -> bool:
        self.log.append(f"ack {self.name}")
        return True


@dataclass
class _App:
    consumer_generation_id: int = 1


@dataclass
class _Order:
    log: list[str] = field(default_factory=list)

    def event(self, name: str, generation: int = 1) -> Any:
        return _Event(_Message(generation), self.log, name)

    async def send(self, name: str) -> None:
        await asyncio.sleep(0.01)
        self.log.append(f"sent {name}")

    async def write(self, name: str) -> None:
        await asyncio.sleep(0.01)
        self.log.append(f"write {name}")


def test_a_checkpoint_acknowledges_only_after_its_records_and_its_write() -> None:
    order = _Order()

    async def run() -> None:
        held = Checkpoint(cast(Any, _App()), every=0.0, most=100)
        held.hold([order.event("e1"), order.event("e2")], [asyncio.ensure_future(order.send("alert"))])
        assert held.due()
        await held.start(order.write("rows"))
        order.log.append("agent goes on")  # the checkpoint runs in the background
        await held.wait()

    asyncio.run(run())
    assert order.log == ["agent goes on", "sent alert", "write rows", "ack e1", "ack e2"]


def test_events_of_an_older_consumer_generation_are_not_acknowledged() -> None:
    order = _Order()
    app = _App(consumer_generation_id=1)

    async def run() -> None:
        held = Checkpoint(cast(Any, app), every=0.0, most=100)
        held.hold([order.event("before", generation=1), order.event("after", generation=2)], [])
        app.consumer_generation_id = 2  # a rebalance happened while they were held
        await held.start(order.write("rows"))
        await held.wait()

    asyncio.run(run())
    assert order.log == ["write rows", "ack after"]


def test_checkpoints_run_one_at_a_time_and_a_failure_reaches_the_agent() -> None:
    order = _Order()

    async def fails() -> None:
        await asyncio.sleep(0.01)
        raise RuntimeError("ClickHouse said no")

    async def run() -> None:
        held = Checkpoint(cast(Any, _App()), every=0.0, most=100)
        held.hold([order.event("e1")], [])
        await held.start(order.write("first"))
        held.hold([order.event("e2")], [])
        await held.start(order.write("second"))  # waits for the first before it takes e2
        assert order.log == ["write first", "ack e1"]
        held.hold([order.event("e3")], [])
        await held.start(fails())
        held.hold([order.event("e4")], [])
        with pytest.raises(RuntimeError, match="ClickHouse said no"):
            await held.start(order.write("third"))

    asyncio.run(run())
    assert "ack e3" not in order.log and "ack e4" not in order.log
    assert order.log == ["write first", "ack e1", "write second", "ack e2"]


def test_due_after_the_interval_or_once_enough_is_held() -> None:
    async def run() -> None:
        held = Checkpoint(cast(Any, _App()), every=60.0, most=3)
        order = _Order()
        assert not held.due()  # nothing held
        held.hold([order.event("a"), order.event("b")], [])
        assert not held.due()  # two of three, well within the minute
        assert held.due(quiet=True)  # nothing new arrived: no reason to wait
        held.hold([order.event("c")], [])
        assert held.due()
        quick = Checkpoint(cast(Any, _App()), every=0.01, most=1000)
        quick.hold([order.event("d")], [])
        await asyncio.sleep(0.02)
        assert quick.due()

    asyncio.run(run())
