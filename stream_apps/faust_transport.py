"""A Faust app whose Kafka consumer waits ``fetch_max_wait_ms`` for data instead of Faust's fixed 1.5 s.

Why: Faust builds its aiokafka consumer with ``fetch_max_wait_ms=1500`` and no setting to change it.
A broker may hold a fetch until that wait ends when less than ``fetch_min_bytes`` is there; Tansu
(the embedded broker) answers a waiting fetch only when the wait ends, not when data arrives. Every
hop of the pipeline (input topics, then sightings) then cost up to 1.5 s of alert latency at a low
rate (docs/performance.md). Everything else is Faust's own aiokafka driver.
"""

from __future__ import annotations

from typing import Any, ClassVar

import aiokafka
import faust
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TransportT


class ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    """Faust's consumer thread, with the app's ``fetch_max_wait_ms`` on the consumer it creates."""

    fetch_max_wait_ms: ClassVar[int] = 1500

    def _create_worker_consumer(self, transport: Any) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        # aiokafka keeps the constructor argument here and hands it to its Fetcher in start().
        if not hasattr(consumer, "_fetch_max_wait_ms"):
            raise RuntimeError("aiokafka changed: AIOKafkaConsumer._fetch_max_wait_ms is gone")
        consumer._fetch_max_wait_ms = getattr(self.app, "fetch_max_wait_ms", self.fetch_max_wait_ms)
        return consumer


class Consumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class Transport(faust_aiokafka.Transport):
    Consumer = Consumer


class App(faust.App):
    """``faust.App`` with ``fetch_max_wait_ms`` (milliseconds) for its worker consumer."""

    def __init__(self, *args: Any, fetch_max_wait_ms: int = 1500, **kwargs: Any) -> None:
        self.fetch_max_wait_ms = fetch_max_wait_ms
        super().__init__(*args, **kwargs)

    def _new_transport(self) -> TransportT:
        return Transport(self.conf.broker_consumer, self)
