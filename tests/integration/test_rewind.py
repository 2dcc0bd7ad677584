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
from ..pool import read_retries, run_orders
from .conftest import cleanup


def make_worker(settings: Settings, name: str = "partition-0") -> PartitionWorker:
    """Partition 0's worker, built as `orders consume` builds it."""
    return PartitionWorker(
        settings, name, partition=0,
        consumer=make_consumer(settings, settings.group_id(name)),
        producer=make_producer(settings, transactional_id=settings.transactional_id(name)),
        admin=make_admin(settings),
        store=AggregateStore(make_redis(settings), settings.redis_prefix),
        serde=OrderSerde(make_registry(settings), load_schema(settings.schema_path)),
        stop=StopFlag(),
    )


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

        drive_to(worker, source, end)
        worker.shutdown()
        parked = read_retries(settings)
    finally:
        cleanup(settings)
    # Every order parked exactly once: its first retry is on the retry topic.
    parked_from = sorted(dict(m.headers())[PARKED_FROM].decode() for m in parked)
    assert parked_from == sorted(f"{source.topic}:0:{offset}" for offset in range(end))


def drive_to(worker: PartitionWorker, source: Source, end: int, timeout: float = 60) -> None:
    """Drive the worker's loop until it has handled ``source`` to ``end``, then commit."""
    deadline = time.monotonic() + timeout
    while worker.position.get(source) != end:
        assert time.monotonic() < deadline, f"not at {end}: {worker.position}"
        messages = worker.poll()
        if messages:
            plan = worker.plan(messages)
            if plan.batches or plan.out:
                worker.checkpoint(plan)
    worker._commit()


def committed_offset(settings: Settings, source: Source) -> int:
    consumer = make_consumer(settings, settings.group_id("partition-0"))
    try:
        return consumer.committed([TopicPartition(source.topic, source.partition)], timeout=10)[0].offset
    finally:
        consumer.close()


def test_a_rebuild_stopped_below_k_leaves_k_where_it_was():
    """A worker rebuilding Redis from the log start commits nothing below the K it found.

    K says "every side effect below this is published". A worker that rebuilds
    (Redis lost, K kept) is below K for a while; a commit there (a revoke, a
    stop, the commit interval) moved K back, and the next owner, finding R = K,
    decided the orders between the new and the old K again: parked twice and
    counted through both retries. The fault test of a pool started on an empty
    Redis with full topics saw it once: 982 orders over.
    """
    env = isolated_env("rebuildk", ORDERS_FAILURE_RATE="0.5", ORDERS_PARTITIONS="1", BATCH_SIZE="20")
    settings = Settings.from_env(env)
    source = Source(settings.orders_topic, 0)
    end = 200
    try:
        run_orders(env, "init")
        run_orders(env, "produce", "--count", str(end), "--rate", "0")
        first = make_worker(settings)
        first.start()
        drive_to(first, source, end)
        first.shutdown()
        assert committed_offset(settings, source) == end

        assert first.store.clear() > 0  # Redis is lost; K stays
        rebuilding = make_worker(settings)
        rebuilding.start()
        assert rebuilding.position[source] is None and rebuilding.committed[source] == end
        messages: list = []
        deadline = time.monotonic() + 30
        while not messages:
            assert time.monotonic() < deadline
            messages = rebuilding.poll()
        rebuilding.checkpoint(rebuilding.plan(messages))  # one batch: 20 orders, far below K
        at = rebuilding.position[source]
        assert at is not None and 0 < at < end
        rebuilding.shutdown()  # commits what it can
        assert committed_offset(settings, source) == end, "K moved back"

        last = make_worker(settings)
        last.start()
        drive_to(last, source, end)
        last.shutdown()
        parked = read_retries(settings)
        counted = last.store.snapshot(1)["total"].count
    finally:
        cleanup(settings)
    parked_from = [dict(m.headers())[PARKED_FROM].decode() for m in parked]
    assert len(parked_from) == len(set(parked_from)), "an order was parked twice"
    assert counted + len(parked_from) == end
