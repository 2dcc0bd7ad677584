"""A rewind re-reads every source's Redis state, not only the sources that reported a loss.

The real partition worker runs in this process with real clients, driven step by
step: it parks a batch of orders (Redis keeps the decisions, the Kafka transaction
carrying them is still open), Redis is wiped, and then the transaction fails, as a
broker error or another source's lost state makes it do. The rewind aborts that
transaction, so the wiped Redis was the only copy of those decisions. A worker that
resumed from the R it remembered skipped those orders for good: neither counted nor
retried (the Redis-wipe fault test saw 3 orders so; a clean-clone run failed on it).
"""
from __future__ import annotations

import time

from confluent_kafka import TopicPartition

from workers.clients import make_admin, make_consumer, make_producer, make_redis, make_registry
from workers.engine import StopFlag
from workers.envelope import PARKED_FROM
from workers.partition_worker import PartitionWorker
from workers.serde import OrderSerde, load_schema
from workers.settings import Settings
from workers.store import AggregateStore, Source

from ..conftest import isolated_env
from ..pool import read_topic, run_orders
from .conftest import cleanup


def make_worker(settings: Settings) -> PartitionWorker:
    """Partition 0's worker, built as `orders consume` builds it."""
    return PartitionWorker(
        settings, "partition-0", partition=0,
        consumer=make_consumer(settings, settings.group_id("partition-0")),
        producer=make_producer(settings, transactional_id=settings.transactional_id("partition-0")),
        admin=make_admin(settings),
        store=AggregateStore(make_redis(settings), settings.redis_prefix),
        serde=OrderSerde(make_registry(settings), load_schema(settings.schema_path)),
        stop=StopFlag(),
    )


def run_until(worker: PartitionWorker, source: Source, end: int, timeout: float = 60) -> None:
    """Drive the worker's loop until it has handled and committed ``source`` to ``end``."""
    deadline = time.monotonic() + timeout
    while worker.committed.get(source) != end:
        assert time.monotonic() < deadline, f"not committed to {end}: {worker.committed}, at {worker.position}"
        messages = worker.poll()
        if messages:
            plan = worker.plan(messages)
            if plan.batches or plan.out:
                worker.checkpoint(plan)
        if worker.position.get(source) == end:
            worker._commit()


def test_a_rewind_finds_state_wiped_since_the_last_batch():
    env = isolated_env("rewind", ORDERS_FAILURE_RATE="1", ORDERS_PARTITIONS="1")  # every attempt fails
    settings = Settings.from_env(env)
    source = Source(settings.orders_topic, 0)
    try:
        run_orders(env, "init")
        run_orders(env, "produce", "--count", "50", "--rate", "0")
        worker = make_worker(settings)
        worker.start()
        _, end = worker.consumer.get_watermark_offsets(TopicPartition(source.topic, 0), timeout=10)
        assert end == 50

        # Park every order: Redis has the decisions, the transaction with them is open.
        messages: list = []
        deadline = time.monotonic() + 30
        while len(messages) < end:
            assert time.monotonic() < deadline, f"read {len(messages)} of {end}"
            messages += worker.poll()
        worker.checkpoint(worker.plan(messages))
        assert worker.known[source] == end and worker.txn.is_open

        assert worker.store.clear() > 0  # Redis is wiped...
        worker._rewind()                 # ...and then the transaction fails.

        run_until(worker, source, end)
        worker.shutdown()
        parked = read_topic(settings.bootstrap_servers, settings.retry_topic)
    finally:
        cleanup(settings)
    # Every order parked exactly once: its first retry is on the retry topic.
    parked_from = sorted(dict(m.headers())[PARKED_FROM].decode() for m in parked)
    assert parked_from == sorted(f"{source.topic}:0:{offset}" for offset in range(end))
