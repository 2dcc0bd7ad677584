"""What anyone who can write to the retry topic can do to it: the retry worker never stalls."""
from __future__ import annotations

import itertools
import time

import pytest
from confluent_kafka import Producer

from workers import envelope as env_headers
from workers.clients import make_redis, make_registry
from workers.engine import Decider
from workers.processing import Downstream, price_cents
from workers.producer import random_orders
from workers.serde import OrderSerde, load_schema
from workers.settings import Settings
from workers.store import AggregateStore

from ..conftest import isolated_env
from ..pool import dead_letters, read_topic, run_orders, stats, wait_until
from .conftest import cleanup
from .test_hostile_input import Workers

pytestmark = pytest.mark.timeout(120)

TEN_YEARS_MS = 10 * 365 * 24 * 3600 * 1000


@pytest.fixture
def env():
    env = isolated_env("retrytopic", ORDERS_FAILURE_RATE="0", RETRY_BACKOFF_MS="200")
    yield env
    cleanup(Settings.from_env(env))


def retry_message(settings: Settings, offset: int, due_at_ms: int) -> list[tuple[str, str | bytes | None]]:
    """Headers of a well-formed retry (attempt 2) of orders partition 0 at ``offset``."""
    origin = env_headers.Provenance(settings.orders_topic, 0, offset, int(time.time() * 1000), 0)
    return [*env_headers.retry_headers(origin, parked_from=f"{settings.orders_topic}:0:{offset}", attempt=2,
                                     due_at_ms=due_at_ms, error_type="DownstreamUnavailable", error_message="x")]


def test_a_due_time_years_ahead_is_dead_lettered_not_waited_for(env, tmp_path):
    """A retry due in ten years would pause its partition for ten years; the ones behind it go on."""
    settings = Settings.from_env(env)
    run_orders(env, "init")
    serde = OrderSerde(make_registry(settings), load_schema(settings.schema_path))
    serde.register(settings.orders_topic)
    poison, good = itertools.islice(random_orders(seed=3), 2)
    now = int(time.time() * 1000)
    producer = Producer({"bootstrap.servers": settings.bootstrap_servers})
    producer.produce(settings.retry_topics[0], key=b"poison", value=serde.encode(poison), partition=0,
                     headers=retry_message(settings, 0, now + TEN_YEARS_MS))
    producer.produce(settings.retry_topics[0], key=b"good", value=serde.encode(good), partition=0,
                     headers=retry_message(settings, 1, now))
    assert producer.flush(30) == 0

    workers = Workers(env, tmp_path, partitions=0)  # the retry worker alone
    try:
        workers.start()
        wait_until(lambda: stats(env)["count"] == 1, "the retry behind the poison is counted", timeout=60)
        letters = wait_until(lambda: dead_letters(env), "the poison is dead-lettered", timeout=30)
        assert round(stats(env)["sum"] * 100) == price_cents(good)
        assert [d["key"] for d in letters] == ["poison"]
        assert letters[0]["error_type"] == "MalformedRetry"
        assert "ahead, beyond the longest backoff" in letters[0]["error_message"]
        workers.assert_alive_and_clean()
    finally:
        assert workers.stop() == {"retry": 0}


def test_waiting_retries_are_bounded_by_bytes(tmp_path):
    """Retries not yet due fill the retry worker's memory up to RETRY_BUFFER_BYTES, not to what the topic holds.

    1,000 retries of 10 KB orders (10 MB) all come due 20 s from now; the bound is
    1 MiB. While they wait, the worker holds at most the bound plus what one poll
    returns (librdkafka's prefetch is capped at the bound too); when they are due,
    every one is counted once.
    """
    env = isolated_env("retrybytes", ORDERS_FAILURE_RATE="0", RETRY_BACKOFF_MS="200",
                       RETRY_BUFFER_BYTES=str(1024 * 1024))
    settings = Settings.from_env(env)
    try:
        run_orders(env, "init")
        serde = OrderSerde(make_registry(settings), load_schema(settings.schema_path))
        serde.register(settings.orders_topic)
        orders = [{**o, "product": "p" * 10_000} for o in itertools.islice(random_orders(seed=4), 1000)]
        due = int(time.time() * 1000) + 20_000
        producer = Producer({"bootstrap.servers": settings.bootstrap_servers})
        for offset, order in enumerate(orders):
            producer.produce(settings.retry_topics[0], key=order["orderId"].encode(), value=serde.encode(order),
                             partition=offset % settings.retry_partitions, headers=retry_message(settings, offset, due))
            producer.poll(0)
        assert producer.flush(30) == 0
        store = AggregateStore(make_redis(settings), settings.redis_prefix)
        member = settings.member("retry", 0)
        workers = Workers(env, tmp_path, partitions=0)
        try:
            workers.start()
            peak = 0
            while time.time() * 1000 < due - 2000:  # sample the buffer until just before the retries are due
                beat = store.snapshot(0, workers=[member])["workers"][member]
                if beat and beat.get("waiting"):
                    peak = max(peak, beat["waiting"])
                time.sleep(0.1)
            held = peak * 10_300  # each: a 10 KB value, its key and its headers
            assert 0 < held <= 3 * 1024 * 1024, f"{peak} retries waiting in memory"
            wait_until(lambda: stats(env)["count"] == len(orders), "every retry is counted", timeout=60)
            assert round(stats(env)["sum"] * 100) == sum(price_cents(o) for o in orders)
            workers.assert_alive_and_clean()
        finally:
            assert workers.stop() == {"retry": 0}
    finally:
        cleanup(settings)


def test_a_short_retry_is_not_held_behind_a_longer_one_produced_before_it(tmp_path):
    """Issue 14: an attempt due in 200 ms is handled before one due in 800 ms that was published first.

    The retries are made by the workers' own Decider (every attempt fails there), so
    they go wherever the pool would send them; the retry worker then handles them with
    a 0% failure rate. The outcome order is read from Redis, polled until both count.
    """
    env = isolated_env("retryorder", ORDERS_FAILURE_RATE="0", RETRY_BACKOFF_MS="200", ORDERS_PARTITIONS="1",
                       RETRY_PARTITIONS="1")
    settings = Settings.from_env(env)
    try:
        run_orders(env, "init")
        serde = OrderSerde(make_registry(settings), load_schema(settings.schema_path))
        serde.register(settings.orders_topic)
        long_order, short_order = itertools.islice(random_orders(seed=14), 2)
        producer = Producer({"bootstrap.servers": settings.bootstrap_servers})
        for order in (long_order, short_order):
            producer.produce(settings.orders_topic, key=order["orderId"].encode(), value=serde.encode(order),
                             partition=0)
        assert producer.flush(30) == 0
        long_msg, short_msg = read_topic(settings.bootstrap_servers, settings.orders_topic)
        decider = Decider(settings, serde, Downstream(1.0))  # every attempt fails: each becomes a retry

        store = AggregateStore(make_redis(settings), settings.redis_prefix)
        member = settings.member("retry", 0)
        workers = Workers(env, tmp_path, partitions=0)  # the retry worker alone
        try:
            workers.start()
            _, long_retry, _ = decider.attempt(long_msg, 3, None)   # its 3rd retry: due in 800 ms
            _, short_retry, _ = decider.attempt(short_msg, 1, None)  # its 1st retry: due in 200 ms
            assert long_retry is not None and short_retry is not None
            wanted = {f"{long_retry.topic}:0", f"{short_retry.topic}:0"}
            wait_until(lambda: wanted <= set((store.snapshot(0, workers=[member])["workers"][member] or {})
                                              .get("positions", {})),
                       "the retry worker owns the retry partitions", timeout=60, interval=0.1)
            for out in (long_retry, short_retry):  # the long one first
                producer.produce(out.topic, key=out.key, value=out.value, headers=out.headers, partition=0)
            assert producer.flush(30) == 0

            seen: list[tuple[int, int]] = []

            def both_counted() -> bool:
                totals = store.totals()
                if totals.count and (not seen or seen[-1] != (totals.count, totals.cents)):
                    seen.append((totals.count, totals.cents))
                return totals.count >= 2

            wait_until(both_counted, "both retries are counted", timeout=30, interval=0.01)
            short_cents, long_cents = price_cents(short_order), price_cents(long_order)
            assert seen[0] == (1, short_cents), f"first outcome {seen[0]}: the 800 ms retry held the 200 ms one"
            assert seen[-1] == (2, short_cents + long_cents)
            workers.assert_alive_and_clean()
        finally:
            assert workers.stop() == {"retry": 0}
    finally:
        cleanup(settings)


def test_without_retries_the_retry_worker_idles(tmp_path):
    """RETRY_MAX=0: no retry topic exists, so the retry worker has nothing to subscribe to. It
    waits (librdkafka refuses an empty subscription, which would crash-loop it), and every
    failed order goes straight to the DLQ."""
    env = isolated_env("noretry", ORDERS_FAILURE_RATE="1", RETRY_MAX="0", ORDERS_PARTITIONS="1")
    settings = Settings.from_env(env)
    try:
        run_orders(env, "init")
        assert settings.retry_topics == []
        run_orders(env, "produce", "--count", "20")
        workers = Workers(env, tmp_path, partitions=1)
        workers.ready["retry"] = "nothing to consume yet"
        try:
            workers.start()
            wait_until(lambda: len(dead_letters(env)) == 20, "every order is dead-lettered")
            assert {d["attempts"] for d in dead_letters(env)} == {1}
            assert stats(env)["count"] == 0
            workers.assert_alive_and_clean()
        finally:
            assert workers.stop() == {"partition-0": 0, "retry": 0}
    finally:
        cleanup(settings)
