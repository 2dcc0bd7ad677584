"""A naive worker written the way the usual tutorials do it, for contrast only.

Per message: ``poll(1.0)``; ``AvroDeserializer``; validate and the injected
failure; on a transient failure ``time.sleep()`` and try again in place; success
is counted with one Redis command per figure (HINCRBYFLOAT, HINCRBY, INCR), no
pipelining, no exactly-once; a message that fails for good goes to the DLQ with
``produce`` + ``flush()``; then a synchronous ``commit`` of that one message.

Three processes join one consumer group (``subscribe``), like the pool's three
workers. Once every process holds exactly one partition (after the group has
settled), each repetition reads the naive counter in Redis, waits ``seconds``
(or until the backlog is drained) and reports the orders counted per second.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import time

import redis
from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext

from workers.clients import make_admin
from workers.errors import PermanentError, TransientError
from workers.processing import Downstream, validate
from workers.settings import Settings, backoff_ms
from workers.topics import ensure_topics

log = logging.getLogger(__name__)

PROCESSES = 3


def counter_key(settings: Settings) -> str:
    return f"{{{settings.redis_prefix}}}:naive:count"


def handle(order: dict, settings: Settings, downstream: Downstream) -> bool:
    """True when the order succeeded (retrying in place with sleeps), False when it must be dead-lettered."""
    for attempt in range(1, settings.max_attempts + 1):
        try:
            validate(order, max_price=settings.max_price)
            downstream.handle(order, attempt)
            return True
        except PermanentError:
            return False
        except TransientError:
            if attempt < settings.max_attempts:
                time.sleep(backoff_ms(attempt, settings.retry_backoff_ms, settings.retry_backoff_multiplier) / 1000)
    return False


def naive_consumer(env: dict, stop, assignments) -> None:
    """Child process: the tutorial loop, until ``stop`` is set."""
    settings = Settings.from_env(env)
    consumer = Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": settings.group_id("naive"),
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([settings.orders_topic],
                       on_assign=lambda c, parts: assignments.put((os.getpid(), len(parts))))
    deserializer = AvroDeserializer(SchemaRegistryClient({"url": settings.schema_registry_url, "timeout": 10}))
    producer = Producer({"bootstrap.servers": settings.bootstrap_servers})
    r = redis.Redis.from_url(settings.redis_url)
    downstream = Downstream(settings.failure_rate)
    try:
        while not stop.is_set():
            msg = consumer.poll(1.0)
            if msg is None or msg.error() is not None:
                continue
            order = deserializer(msg.value(), SerializationContext(msg.topic() or "", MessageField.VALUE))
            if handle(order, settings, downstream):
                key = f"{{{settings.redis_prefix}}}:naive:partition:{msg.partition()}"
                r.hincrbyfloat(key, "sum", order["price"])
                r.hincrby(key, "count", 1)
                r.incr(counter_key(settings))
            else:
                producer.produce(settings.dlq_topic, key=msg.key(), value=msg.value())
                producer.flush()
            try:
                consumer.commit(message=msg, asynchronous=False)
            except KafkaException as exc:  # e.g. during a rebalance
                log.warning("commit failed: %s", exc)
    finally:
        consumer.close()


def wait_settled(assignments, processes: int, timeout: float = 60) -> None:
    """Wait until each process's latest assignment is exactly one partition."""
    latest: dict[int, int] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            pid, count = assignments.get(timeout=0.5)
            latest[pid] = count
        except queue.Empty:
            pass
        if len(latest) == processes and all(n == 1 for n in latest.values()):
            return
    raise TimeoutError(f"naive consumer group did not settle: {latest}")


def rate_window(r: redis.Redis, key: str, seconds: float, total: int) -> float:
    """Orders counted per second over ``seconds`` (ends early when the backlog is drained)."""
    start, start_count = time.monotonic(), int(r.get(key) or 0)
    end, count = start, start_count
    while end - start < seconds and count < total:
        time.sleep(0.1)
        end, count = time.monotonic(), int(r.get(key) or 0)
    return (count - start_count) / (end - start)


def measure_naive(env: dict, total: int, seconds: float, reps: int) -> list[float]:
    """Start the naive consumers, wait for the group to settle, measure ``reps`` windows."""
    settings = Settings.from_env(env)
    ensure_topics(make_admin(settings), settings)  # its DLQ
    ctx = mp.get_context("spawn")
    stop, assignments = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=naive_consumer, args=(env, stop, assignments), daemon=True)
             for _ in range(PROCESSES)]
    for proc in procs:
        proc.start()
    try:
        wait_settled(assignments, PROCESSES)
        r = redis.Redis.from_url(settings.redis_url)
        rates = [rate_window(r, counter_key(settings), seconds, total) for _ in range(reps)]
    finally:
        stop.set()
        for proc in procs:
            proc.join(timeout=15)
            if proc.is_alive():
                proc.kill()
    log.info("naive orders_per_s=%s", [round(x) for x in rates])
    return rates
