"""Where the latency phase starts reading: after the last record already sent, on a real Tansu broker.

Why: Tansu 0.6 answers ListOffsets "latest" inside the last record batch, so ``seek_to_end`` started the
latency phase's reader in the batch the previous phase's last checkpoint had sent: its spike alerts were
read (and counted) as alerts of the latency phase.
"""

from __future__ import annotations

import asyncio
import uuid

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from synthwatch.bench.latency import start_at_end
from synthwatch.stack.broker import EmbeddedBroker


async def _read_after_start_at_end(servers: str) -> tuple[list[int], list[bytes]]:
    """Send one batch of five records, start a reader at the end, send one more record: what the reader gets."""
    topic = f"latency-start-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=servers)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=servers, acks="all")
    await producer.start()
    consumer = AIOKafkaConsumer(bootstrap_servers=servers, enable_auto_commit=False)
    await consumer.start()
    try:
        batch = producer.create_batch()  # one record batch, as a checkpoint's outbox goes out
        for i in range(5):
            assert batch.append(key=None, value=f"before-{i}".encode(), timestamp=None) is not None
        sent = await (await producer.send_batch(batch, topic, partition=0))
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await start_at_end(consumer, servers, [tp])
        await (await producer.send(topic, b"after", partition=0))
        got: list[bytes] = []
        for _ in range(60):  # a bound, not a retry: the record is read at the first fetch that has it
            records = await consumer.getmany(tp, timeout_ms=1000)
            got.extend(r.value or b"" for r in records.get(tp, []))
            if b"after" in got:
                break
        return [sent.offset], got
    finally:
        await consumer.stop()
        await producer.stop()


def test_the_latency_reader_skips_the_whole_last_batch_sent_before_it_started(broker: EmbeddedBroker) -> None:
    first, got = asyncio.run(_read_after_start_at_end(broker.bootstrap_servers))
    assert first == [0]  # the five records went out as one batch, from offset 0
    assert got == [b"after"]
