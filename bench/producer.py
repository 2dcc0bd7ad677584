"""The order producer (``workers.producer.produce_orders``, in-process) against two baselines.

All use the same configuration (``workers.clients.producer_conf``: idempotent,
acks=all, lz4, linger 5 ms) and a fresh, connected client; all are timed from
the first ``produce`` to the end of the final ``flush``. ``produce_orders``
generates, encodes and tallies its orders as ``orders produce --rate 0`` does.

* The hand-written loop (the target's baseline): what anyone would write to make
  and send random orders: a random order, ``fastavro.schemaless_writer`` into one
  reused buffer, ``produce`` and ``poll(0)``; no delivery tally, no pacing.
* The bare producer: values encoded beforehand (random orders with the same seed,
  so the same sizes), no delivery callback, polling only when its queue is full:
  librdkafka alone, an upper bound no producer that makes its orders can reach.
"""
from __future__ import annotations

import io
import itertools
import logging
import struct
import time

import fastavro
from confluent_kafka import Producer

from workers.clients import make_admin, make_producer, make_registry, producer_conf
from workers.producer import DeliveryTally, IdempotentSender, Sender, TransactionalSender, produce_orders, random_orders
from workers.serde import OrderSerde, load_schema
from workers.settings import Settings
from workers.topics import ensure_topics

from .common import make_serde

log = logging.getLogger(__name__)

SEED = 3


def _connected_producer(settings: Settings) -> Producer:
    producer = Producer(producer_conf(settings))
    producer.list_topics(settings.orders_topic, timeout=10)
    return producer


def time_produce_orders(settings: Settings, count: int, *, transactional: bool = False) -> float:
    """``orders produce --rate 0``'s loop; ``transactional``: in transactions (``--transactional``)."""
    serde = make_serde(settings)
    tally = DeliveryTally()
    sender: Sender
    if transactional:
        transactional_id = settings.transactional_id(f"bench-producer-{time.monotonic_ns()}")
        sender = TransactionalSender(lambda: make_producer(settings, transactional_id=transactional_id),
                                     settings.orders_topic, tally, stop=lambda: False)
        sender.producer.list_topics(settings.orders_topic, timeout=10)
    else:
        sender = IdempotentSender(_connected_producer(settings), settings.orders_topic, tally)
    start = time.perf_counter()
    produce_orders(sender, serde, count=count, rate=0, seed=SEED, stop=lambda: False)
    elapsed = time.perf_counter() - start
    if tally.delivered != count:
        raise RuntimeError(f"produce_orders delivered {tally.delivered} of {count}: {tally.errors}")
    return count / elapsed


def time_hand_loop(settings: Settings, count: int) -> float:
    """The minimal loop: random order, schemaless_writer into a reused buffer, produce, poll(0)."""
    raw = load_schema(settings.schema_path)
    header = struct.pack(">bI", 0, OrderSerde(make_registry(settings), raw).register(settings.orders_topic))
    schema = fastavro.parse_schema(raw)
    producer = _connected_producer(settings)
    topic = settings.orders_topic
    buffer = io.BytesIO()
    orders = random_orders(SEED)
    start = time.perf_counter()
    for order in itertools.islice(orders, count):
        buffer.seek(0)
        buffer.truncate()
        buffer.write(header)
        fastavro.schemaless_writer(buffer, schema, order)
        while True:
            try:
                producer.produce(topic, buffer.getvalue(), order["orderId"].encode())
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
    remaining = producer.flush(60)
    if remaining:
        raise RuntimeError(f"hand-written loop: {remaining} messages not delivered")
    return count / (time.perf_counter() - start)


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
    """One repetition of each, baselines first; returns the three rates."""
    settings = Settings.from_env(env)
    ensure_topics(make_admin(settings), settings)
    bare = time_bare(settings, count)
    loop = time_hand_loop(settings, count)
    orders = time_produce_orders(settings, count)
    in_transactions = time_produce_orders(settings, count, transactional=True)
    log.info("producer count=%d produce_orders_per_s=%.0f transactional_per_s=%.0f hand_loop_per_s=%.0f "
             "bare_per_s=%.0f", count, orders, in_transactions, loop, bare)
    return {"orders_per_s": orders, "transactional_per_s": in_transactions, "loop_per_s": loop, "bare_per_s": bare}
