"""A value too large to forward: dead-lettered as a reference, and the partition keeps going.

The orders topic's size limit applies to the compressed record batch, so a 12 MiB
value that lz4 shrinks to a few KiB is accepted. No retry or dead letter can carry
it whole (the workers' producer sends at most message.max.bytes, uncompressed).
It must reach the DLQ as a reference (coordinates, size, sha256, first bytes,
reason), exactly once, while the orders behind it on the same partition are
counted. A 12 MiB order that fails transiently cannot be retried either: it goes
straight to the DLQ the same way. A 3 MiB one still takes the retry path.
"""
from __future__ import annotations

import base64
import hashlib
import itertools
import json
import random

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import NewTopic

from workers import envelope as env_headers
from workers import oversize
from workers.clients import make_admin, make_registry
from workers.processing import attempt_fails, price_cents
from workers.serde import OrderSerde, load_schema, subject_for
from workers.settings import Settings
from workers.topics import ensure_topics

from ..conftest import isolated_env
from ..pool import read_retries, read_topic, run_orders, wait_until, wait_until_quiet
from .conftest import cleanup
from .test_hostile_input import Workers, delete_subjects

MiB = 1024 * 1024
FAILURE_RATE = 0.5
PATTERN = b"0123456789abcdef" * 4


@pytest.fixture
def oversize_env():
    env = isolated_env("oversize", ORDERS_FAILURE_RATE=str(FAILURE_RATE), BATCH_SIZE="20")
    settings = Settings.from_env(env)
    yield env
    cleanup(settings)
    delete_subjects(settings, subject_for(settings.orders_topic))


@pytest.fixture
def workers(oversize_env, tmp_path):
    pool = Workers(oversize_env, tmp_path, Settings.from_env(oversize_env).partitions)
    try:
        yield pool
    finally:
        pool.stop()


def committed_offset(settings: Settings, role: str) -> int:
    """The offset the worker's group has committed on partition 0 of the orders topic (-1: none)."""
    consumer = Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": settings.group_id(role)})
    try:
        return consumer.committed([TopicPartition(settings.orders_topic, 0)], timeout=10)[0].offset
    finally:
        consumer.close()


def order_ids(prefix: str, *, fails: tuple[bool, ...]):
    """Order ids whose first attempts fail (True) or succeed (False) as given, under FAILURE_RATE."""
    for n in itertools.count():
        order_id = f"{prefix}-{n}"
        if all(attempt_fails(order_id, a, FAILURE_RATE) == f for a, f in enumerate(fails, start=1)):
            yield order_id


@pytest.mark.timeout(180)
def test_a_value_too_large_to_forward_is_dead_lettered_as_a_reference(oversize_env, workers):
    settings = Settings.from_env(oversize_env)
    ensure_topics(make_admin(settings), settings)
    serde = OrderSerde(make_registry(settings), load_schema(settings.schema_path))
    serde.register(settings.orders_topic)

    good_ids = order_ids("good", fails=(False,))
    good = [{"orderId": next(good_ids), "product": "desk", "price": round(1 + n * 0.37, 2)} for n in range(60)]
    garbage = PATTERN * (12 * MiB // len(PATTERN))      # not an order: dead-lettered at once
    big_order = {"orderId": next(order_ids("big", fails=(True,))), "product": "lamp " * (12 * MiB // 5),
                 "price": 12.5}                        # fails its first attempt: cannot be retried
    mid_order = {"orderId": next(order_ids("mid", fails=(True, False))), "product": "rug " * (3 * MiB // 4),
                 "price": 7.25}                        # fails once, fits a retry: counted on attempt 2
    big_value = serde.encode(big_order)
    assert len(garbage) == 12 * MiB and len(big_value) > 12 * MiB
    sequence = ([(o["orderId"], serde.encode(o)) for o in good[:20]] + [("garbage", garbage)]
                + [(o["orderId"], serde.encode(o)) for o in good[20:40]] + [(big_order["orderId"], big_value)]
                + [(mid_order["orderId"], serde.encode(mid_order))]
                + [(o["orderId"], serde.encode(o)) for o in good[40:]])

    workers.start()
    # A producer allowed to send 12 MiB (uncompressed); lz4 makes each batch small enough for the topic.
    producer = Producer({"bootstrap.servers": settings.bootstrap_servers, "enable.idempotence": True,
                         "compression.type": "lz4", "message.max.bytes": 20 * MiB, "linger.ms": 5})
    offsets: dict[str, int] = {}
    errors: list[str] = []

    def report(err, msg):
        if err is not None:
            errors.append(err.str())
        else:
            offsets[msg.key().decode()] = msg.offset()

    for key, value in sequence:
        producer.produce(settings.orders_topic, key=key.encode(), value=value, partition=0, on_delivery=report)
        producer.poll(0)
    assert producer.flush(60) == 0 and not errors, errors
    assert len(offsets) == len(sequence)

    counted = good + [mid_order]
    stats, dlq = wait_until_quiet(oversize_env, len(counted), 2, timeout=90)

    # The partition kept counting: every order behind the big values, exactly once.
    assert stats["count"] == len(counted)
    assert round(stats["sum"] * 100) == sum(price_cents(o) for o in counted)
    assert [p["count"] for p in stats["partitions"]] == [len(counted), 0, 0]

    # The DLQ holds exactly the two references, with what identifies the original.
    assert len(dlq) == 2, dlq
    by_key = {d["key"]: d for d in dlq}
    for key, value, error_type in (("garbage", garbage, "UndecodableMessage"),
                                   (big_order["orderId"], big_value, "DownstreamUnavailable")):
        d = by_key[key]
        assert (d["original_topic"], d["original_partition"], d["original_offset"]) == \
            (settings.orders_topic, 0, offsets[key])
        assert (d["error_type"], d["attempts"]) == (error_type, 1)
        assert d["order"] is None and d["raw"] is None
        ref = d["reference"]
        assert ref["value_size"] == len(value)
        assert ref["value_sha256"] == hashlib.sha256(value).hexdigest()
        assert base64.b64decode(ref["value_head"]) == value[:oversize.HEAD_BYTES]
        assert "too large" in ref["reason"]
    # On the topic: no value, the headers say it all.
    parked = read_topic(settings.bootstrap_servers, settings.dlq_topic)
    assert len(parked) == 2
    for msg in parked:
        h = env_headers.header_dict(msg.headers())
        assert msg.value() is None
        assert int(h[oversize.VALUE_SIZE]) >= 12 * MiB
    # Only the 3 MiB order went through the retry topic, whole.
    retried = read_retries(settings)
    assert [m.key().decode() for m in retried] == [mid_order["orderId"]]
    assert retried[0].value() == serde.encode(mid_order)

    # `orders dlq` says what happened, in one line each.
    shown = run_orders(oversize_env, "dlq").stdout.splitlines()
    assert len(shown) == 2
    for line in shown:
        assert "value not kept" in line and "sha256=" in line, line
    assert any(f"{len(garbage)} bytes" in line for line in shown), shown
    replay = run_orders(oversize_env, "dlq", "replay", "--dry-run")
    assert "0 dead letter(s) would be replayed" in replay.stdout, replay.stdout
    assert "2 cannot be replayed" in replay.stdout, replay.stdout
    assert json.loads(run_orders(oversize_env, "dlq", "--json", "--limit", "1").stdout)["reference"]

    workers.assert_alive_and_clean()
    codes = workers.stop()
    assert codes == {role: 0 for role in workers.roles}, f"{codes}\n{workers.logs()}"


@pytest.mark.timeout(180)
def test_a_dlq_topic_that_takes_less_than_expected_does_not_stall_the_partition(oversize_env, workers):
    """A DLQ topic created elsewhere with a small max.message.bytes: the broker rejects the dead
    letter (its transaction aborts); the worker learns that size is too large and keeps a reference."""
    settings = Settings.from_env(oversize_env)
    admin = make_admin(settings)
    for future in admin.create_topics([NewTopic(settings.dlq_topic, num_partitions=1, replication_factor=-1,
                                                config={"max.message.bytes": str(300_000)})]).values():
        future.result()
    ensure_topics(admin, settings)
    serde = OrderSerde(make_registry(settings), load_schema(settings.schema_path))
    serde.register(settings.orders_topic)

    good_ids = order_ids("good", fails=(False,))
    good = [{"orderId": next(good_ids), "product": "desk", "price": round(2 + n * 0.41, 2)} for n in range(30)]
    noise = b"\x07" + random.Random(7).randbytes(600_000)  # incompressible, and not an order
    sequence = ([(o["orderId"], serde.encode(o)) for o in good[:15]] + [("noise", noise)]
                + [(o["orderId"], serde.encode(o)) for o in good[15:]])

    workers.start()
    producer = Producer({"bootstrap.servers": settings.bootstrap_servers, "enable.idempotence": True,
                         "linger.ms": 5})
    offsets: dict[str, int] = {}

    def report(err, msg):
        assert err is None, err
        offsets[msg.key().decode()] = msg.offset()

    def send(part):
        for key, value in part:
            producer.produce(settings.orders_topic, key=key.encode(), value=value, partition=0, on_delivery=report)
            producer.poll(0)
        assert producer.flush(60) == 0

    # The worker has committed its progress (K) before the big value comes: the aborted
    # transaction is then replayed from K.
    send(sequence[:15])
    wait_until(lambda: committed_offset(settings, "partition-0") == 15, "the worker committed offset 15")
    send(sequence[15:])
    assert len(offsets) == len(sequence)

    stats, dlq = wait_until_quiet(oversize_env, len(good), 1, timeout=90)
    assert stats["count"] == len(good)
    assert round(stats["sum"] * 100) == sum(price_cents(o) for o in good)
    assert len(dlq) == 1, dlq
    d = dlq[0]
    assert (d["key"], d["original_partition"], d["original_offset"]) == ("noise", 0, offsets["noise"])
    assert d["error_type"] == "UndecodableMessage"
    assert d["reference"]["value_size"] == len(noise)
    assert d["reference"]["value_sha256"] == hashlib.sha256(noise).hexdigest()
    assert "rejected" in d["reference"]["reason"]
    assert "transaction failed" in workers.log("partition-0")  # once: then it knew
    workers.assert_alive_and_clean()
