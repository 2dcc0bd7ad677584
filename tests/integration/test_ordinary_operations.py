"""Exactly once through ordinary operations, not only crashes.

Each test does something an operator does on an ordinary day (re-creates the
topics under a kept Redis, deletes the consumer groups, rebuilds under other
settings, loses Redis's last writes while the pool is idle) and checks the
aggregate against the truth read back from the log.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition

from workers.clients import make_admin, make_consumer, make_redis, make_registry
from workers.processing import price_cents
from workers.serde import OrderSerde, load_schema
from workers.settings import Settings
from workers.store import AggregateStore, Source, target_field

from ..conftest import isolated_env
from ..pool import (
    LogTruth,
    SupervisedPool,
    check_exact,
    check_invariants,
    read_retries,
    run_orders,
    stack,
    stats,
    status_json,
    wait_until,
)
from .conftest import cleanup

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]



@pytest.fixture
def env():
    env = isolated_env("ops", ORDERS_FAILURE_RATE="0.3", RETRY_BACKOFF_MS="100", PRODUCE_RATE="0.001")
    yield env
    cleanup(Settings.from_env(env))


class Pools:
    """Supervised pools run one after another in one test, each in its own folder."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.current: SupervisedPool | None = None
        self.runs = 0

    def start(self, env: dict) -> SupervisedPool:
        self.runs += 1
        folder = self.tmp_path / f"run{self.runs}"
        folder.mkdir()
        self.current = SupervisedPool(env, folder)
        self.current.start()
        return self.current

    def stop(self) -> None:
        if self.current is not None:
            self.current.stop()
            self.current = None


@pytest.fixture
def pools(tmp_path):
    pools = Pools(tmp_path)
    yield pools
    pools.stop()


def produce(env: dict, count: int, seed: int) -> None:
    run_orders(env, "produce", "--count", str(count), "--seed", str(seed))


def store_of(settings: Settings) -> AggregateStore:
    return AggregateStore(make_redis(settings), settings.redis_prefix)


def recreate_topics(env: dict, settings: Settings) -> None:
    """Delete the pool's topics, wait until Kafka has forgotten them, create them again."""
    admin = make_admin(settings)
    names = [t for t in admin.list_topics(timeout=10).topics if settings.is_pool_topic(t)]
    for future in admin.delete_topics(names, operation_timeout=30).values():
        future.result()
    wait_until(lambda: not set(names) & set(admin.list_topics(timeout=10).topics), "topics deleted", timeout=60)
    wait_until(lambda: run_orders(env, "init", check=False).returncode == 0, "topics created again", timeout=60,
               interval=1)


def test_topics_recreated_under_a_kept_redis(env, pools):
    """`docker compose down && up` drops Kafka's data and keeps Redis's volume."""
    settings = Settings.from_env(env)
    pools.start(env)
    produce(env, 1000, seed=1)
    check_invariants(env, settings)
    pools.stop()
    recreate_topics(env, settings)
    produce(env, 1000, seed=2)
    pools.start(env)
    truth = check_invariants(env, settings)  # the new topics' truth, and nothing of the old
    assert truth.total == 1000


def test_consumer_groups_deleted_then_restart(env, pools):
    """K is gone (deleted, or expired after a quiet week): no retry or dead letter is published twice."""
    settings = Settings.from_env(env)
    pools.start(env)
    produce(env, 1500, seed=3)
    check_invariants(env, settings)
    pools.stop()
    admin = make_admin(settings)
    groups = [g.group_id for g in admin.list_consumer_groups(request_timeout=10).result().valid
              if g.group_id.startswith(settings.group_prefix)]
    assert groups
    for future in admin.delete_consumer_groups(groups, request_timeout=30).values():
        future.result()
    pools.start(env)
    produce(env, 500, seed=4)
    check_invariants(env, settings)


@pytest.mark.parametrize("first_rate,second_rate", [("0.3", "0"), ("0", "0.3")])
def test_rebuild_under_other_settings_keeps_every_decision(env, pools, first_rate, second_rate):
    """Redis is wiped and the pool comes back under another failure rate: decisions already
    published stand, and no order is both counted and dead-lettered."""
    settings = Settings.from_env(env)
    pools.start({**env, "ORDERS_FAILURE_RATE": first_rate})
    produce(env, 1500, seed=5)
    first = check_exact(env, settings)
    pools.stop()
    assert store_of(settings).clear() > 0
    pools.start({**env, "ORDERS_FAILURE_RATE": second_rate})
    produce(env, 500, seed=6)
    truth = check_exact(env, settings)
    assert truth.total == 2000
    assert set(first.dead_origins) <= set(truth.dead_origins)
    retried = read_retries(settings)
    if first_rate != "0":
        assert retried, "the first run should have retried orders"


def test_idle_source_that_lost_its_last_writes_is_rebuilt(env, pools):
    """Redis loses the tail of its AOF while the pool is idle: stats are exact again within seconds."""
    settings = Settings.from_env({**env, "ORDERS_FAILURE_RATE": "0"})
    pools.start({**env, "ORDERS_FAILURE_RATE": "0"})
    produce(env, 1000, seed=7)
    truth = check_exact(env, settings)
    # What Redis held before its last 50 writes to partition 0's source: offset and totals back.
    store = store_of(settings)
    client = make_redis(settings)
    source = Source(settings.orders_topic, 0)
    stored = store.positions([source])[source]
    assert stored is not None and stored >= 50
    serde = OrderSerde(make_registry(settings), load_schema(settings.schema_path))
    consumer = make_consumer(settings, "test-lost-tail")
    try:
        consumer.assign([TopicPartition(source.topic, 0, stored - 50)])
        lost = [m for m in consumer.consume(50, 10) if m.error() is None]
    finally:
        consumer.close()
    assert len(lost) == 50
    cents = sum(price_cents(serde.decode(m.value())) for m in lost)
    # The source's slot holds its offset and what it counted (in all, and into partition 0).
    key = store.source_key(source)
    pipe = client.pipeline(transaction=True)
    pipe.hset(key, "offset", stored - 50)
    for count_field, cents_field in (("counted", "cents"), (target_field("count", 0), target_field("cents", 0))):
        pipe.hincrby(key, count_field, -50)
        pipe.hincrby(key, cents_field, -cents)
    # The write's own result shows the loss took effect. Reading stats afterwards would race the
    # worker, whose state check may already have rebuilt the source (a CI run saw exactly that).
    # Without failures every order of partition 0 was counted from its own source.
    _, source_count, _, _, _ = pipe.execute()
    assert source_count == truth.count_by_partition[0] - 50
    # The bound: the worker's state check runs every TOUCH_INTERVAL_S (2 s) when idle.
    wait_until(lambda: stats(env)["count"] == truth.count, "the idle source is rebuilt", timeout=20)
    check_exact(env, settings)


@pytest.fixture
def short_offsets_retention():
    """The broker restarted with a 1-minute offsets retention, checked every 2 s; restored afterwards."""
    short = {"OFFSETS_RETENTION_MINUTES": "1", "OFFSETS_RETENTION_CHECK_MS": "2000"}
    restart_kafka(short)
    try:
        yield
    finally:
        restart_kafka({})


def restart_kafka(extra: dict) -> None:
    stack_env = {k: v for k, v in os.environ.items() if k not in ("OFFSETS_RETENTION_MINUTES",
                                                                 "OFFSETS_RETENTION_CHECK_MS")}
    stack("restart", "kafka", env={**stack_env, **extra})


def committed_offsets(settings: Settings, groups: list[str]) -> dict[str, int]:
    """Committed partitions per group, read with the admin API."""
    admin = make_admin(settings)
    out = {}
    for group in groups:
        request = ConsumerGroupTopicPartitions(group)
        result = admin.list_consumer_group_offsets([request], request_timeout=10)[group].result()
        out[group] = sum(1 for tp in result.topic_partitions if tp.offset >= 0)
    return out


def test_offsets_expired_by_the_broker(env, pools, short_offsets_retention):
    """The broker expires K of a stopped pool (offsets.retention.minutes): nothing is published twice."""
    settings = Settings.from_env(env)
    pools.start(env)
    produce(env, 1000, seed=8)
    check_invariants(env, settings)
    pools.stop()
    groups = [settings.group_id("workers"), settings.group_id("retry-workers")]
    assert all(committed_offsets(settings, groups).values())
    wait_until(lambda: not any(committed_offsets(settings, groups).values()), "the broker expired the offsets",
               timeout=180, interval=5)
    pools.start(env)
    produce(env, 500, seed=9)
    check_invariants(env, settings)


def test_backoff_changed_while_retries_wait(env, pools):
    """Issue 14: RETRY_BACKOFF_MS changes between runs while retries wait in the old delay levels'
    topics. The pool drains those too (none is orphaned), exactly once, and `orders status` shows
    them as levels no longer in use, next to today's."""
    slow = {**env, "RETRY_BACKOFF_MS": "5000"}
    fast = {**env, "RETRY_BACKOFF_MS": "200"}
    old, new = Settings.from_env(slow), Settings.from_env(fast)
    assert not set(old.retry_topics) & set(new.retry_topics)
    pools.start(slow)
    produce(slow, 600, seed=7)
    wait_until(lambda: read_retries(old), "retries wait in the 5 s levels")
    pools.stop()
    expected = LogTruth(old)
    assert stats(slow)["count"] < expected.count, "some retries should still have been waiting at the stop"
    pools.start(fast)
    truth = check_exact(fast, new)  # every order counted or dead-lettered once: none left in the old levels
    assert truth.total == 600
    levels = {level["topic"]: level for level in status_json(fast)["retry"]["levels"]}
    assert set(old.retry_topics) | set(new.retry_topics) <= set(levels)
    assert [t for t, level in levels.items() if level["current"]] == new.retry_topics
