"""The order producer (``workers.producer.produce_orders``, in-process) against a bare producer.

Both use the same configuration (``workers.clients.producer_conf``: idempotent,
acks=all, lz4, linger 5 ms) and a fresh, connected client; both are timed from
the first ``produce`` to the end of the final ``flush``. ``produce_orders``
generates, encodes and tallies its orders as ``orders produce --rate 0`` does; the
bare producer sends values encoded beforehand (random orders with the same seed,
so the same sizes) with no delivery callback, polling only when its queue is full.
"""
from __future__ import annotations

import itertools
import logging
import time

from confluent_kafka import Producer

from workers.clients import make_admin, producer_conf
from workers.producer import DeliveryTally, produce_orders, random_orders
from workers.settings import Settings
from workers.topics import ensure_topics

from .common import make_serde

log = logging.getLogger(__name__)

SEED = 3


def _connected_producer(settings: Settings) -> Producer:
    producer = Producer(producer_conf(settings))
    producer.list_topics(settings.orders_topic, timeout=10)
    return producer


def time_produce_orders(settings: Settings, count: int) -> float:
    serde = make_serde(settings)
    producer = _connected_producer(settings)
    tally = DeliveryTally()
    start = time.perf_counter()
    produce_orders(producer, serde, settings.orders_topic, count=count, rate=0, seed=SEED,
                   stop=lambda: False, tally=tally)
    elapsed = time.perf_counter() - start
    if tally.delivered != count:
        raise RuntimeError(f"produce_orders delivered {tally.delivered} of {count}: {tally.errors}")
    return count / elapsed


def encoded_orders(settings: Settings, count: int) -> list[tuple[bytes, bytes]]:
    """``count`` random orders as (key, value), encoded with the schema id registered for the settings' topic."""
    serde = make_serde(settings)
    return [(o["orderId"].encode(), serde.encode(o)) for o in itertools.islice(random_orders(SEED), count)]


def send_all(settings: Settings, values: list[tuple[bytes, bytes]]) -> None:
    """Send pre-encoded values to the orders topic as fast as librdkafka takes them, then flush."""
    producer = _connected_producer(settings)
    topic = settings.orders_topic
    for key, value in values:
        while True:
            try:
                producer.produce(topic, value=value, key=key)
                break
            except BufferError:
                producer.poll(0.1)
    remaining = producer.flush(60)
    if remaining:
        raise RuntimeError(f"bare producer: {remaining} messages not delivered")


def time_bare(settings: Settings, count: int) -> float:
    values = encoded_orders(settings, count)
    start = time.perf_counter()
    send_all(settings, values)
    return count / (time.perf_counter() - start)


def measure_producer(env: dict, count: int) -> dict:
    """One repetition of each, bare first; returns both rates and their ratio."""
    settings = Settings.from_env(env)
    ensure_topics(make_admin(settings), settings)
    bare = time_bare(settings, count)
    orders = time_produce_orders(settings, count)
    log.info("producer count=%d produce_orders_per_s=%.0f bare_per_s=%.0f", count, orders, bare)
    return {"orders_per_s": orders, "bare_per_s": bare, "ratio": orders / bare}
