"""Schema evolution on the real stack (registry compatibility BACKWARD).

(a) A producer with v2 of the Order schema (an added optional field with a
    default) registers it while workers that only know v1 run: they count v2
    orders and the v1 orders after them, exactly.
(b) A backward-incompatible schema is rejected by the registry: ``orders
    produce`` exits 1 with the rejection on stderr and produces nothing.
"""
from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import httpx
import pytest
from confluent_kafka import Producer

from workers.clients import make_registry
from workers.serde import OrderSerde, load_schema, subject_for
from workers.settings import Settings

from ..conftest import isolated_env
from ..pool import Truth, dead_letters, read_topic, run_orders, wait_until_quiet
from .conftest import cleanup
from .test_hostile_input import Workers, delete_subjects, end_offsets

DATA = Path(__file__).resolve().parent.parent / "data"
V2 = DATA / "order-v2.avsc"


def schema_id_of(msg) -> int:
    magic, schema_id = struct.unpack(">bI", msg.value()[:5])
    assert magic == 0
    return schema_id


def subject_versions(settings: Settings) -> list:
    url = f"{settings.schema_registry_url.rstrip('/')}/subjects/{subject_for(settings.orders_topic)}/versions"
    response = httpx.get(url, timeout=10)
    response.raise_for_status()
    return response.json()


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture
def evolution_env():
    env = isolated_env("evolve", ORDERS_FAILURE_RATE="0")
    settings = Settings.from_env(env)
    yield env
    cleanup(settings)
    delete_subjects(settings, subject_for(settings.orders_topic))


@pytest.fixture
def workers(evolution_env, tmp_path):
    pool = Workers(evolution_env, tmp_path, Settings.from_env(evolution_env).partitions)
    try:
        yield pool
    finally:
        pool.stop()


@pytest.mark.timeout(300)  # a hang guard: about 35 s on a loaded 2-core machine
def test_v1_workers_count_orders_written_with_a_compatible_v2_schema(evolution_env, workers, tmp_path):
    settings = Settings.from_env(evolution_env)
    assert settings.schema_path.name == "order.avsc"  # the workers read with v1
    v1_records, v2_records, v1_again = tmp_path / "v1.jsonl", tmp_path / "v2.jsonl", tmp_path / "v1-again.jsonl"

    run_orders(evolution_env, "produce", "--count", "40", "--seed", "1", "--record", str(v1_records))
    assert subject_versions(settings) == [1]
    workers.start()

    # v2 appears while the workers run: registered by the producer itself.
    run_orders(evolution_env, "produce", "--schema", str(V2), "--count", "60", "--seed", "2",
               "--record", str(v2_records))
    assert subject_versions(settings) == [1, 2]  # it registered v2
    # v2 orders that use the new field (the CLI's random orders leave it null).
    v2 = load_schema(V2)
    v2_serde = OrderSerde(make_registry(settings), v2)
    v2_id = v2_serde.register(settings.orders_topic)
    coupons: list[dict] = [{"orderId": f"coupon-{i}", "product": "dock", "price": 10 + i / 4, "coupon": f"SAVE{i}"}
               for i in range(9)]
    producer = Producer({"bootstrap.servers": settings.bootstrap_servers, "enable.idempotence": True})
    for order in coupons:
        producer.produce(settings.orders_topic, key=order["orderId"].encode(), value=v2_serde.encode(order))
    assert producer.flush(30) == 0
    # Then v1 producers again, as during a rolling upgrade.
    run_orders(evolution_env, "produce", "--count", "30", "--seed", "3", "--record", str(v1_again))
    assert subject_versions(settings) == [1, 2]

    serde = OrderSerde(make_registry(settings), load_schema(settings.schema_path))
    messages = read_topic(settings.bootstrap_servers, settings.orders_topic)
    truth = Truth(messages, serde, settings)
    produced = read_records(v1_records) + read_records(v2_records) + read_records(v1_again)
    assert truth.total == len(produced) + len(coupons) == 139
    assert truth.undecodable == 0 and truth.count == truth.total  # v1 reads all of them

    # The topic really holds two writer schemas, v2's in the middle.
    v1_id = serde.register(settings.orders_topic)  # already registered: its id
    assert v2_id != v1_id
    ids_by_order = {}
    for msg in messages:
        ids_by_order[serde.decode(msg.value())["orderId"]] = schema_id_of(msg)
    assert {ids_by_order[o["orderId"]] for o in read_records(v1_records) + read_records(v1_again)} == {v1_id}
    assert {ids_by_order[o["orderId"]] for o in read_records(v2_records) + coupons} == {v2_id}

    stats, dlq = wait_until_quiet(evolution_env, truth.count, 0)
    assert dlq == []
    assert stats["count"] == truth.count == 139
    assert round(stats["sum"] * 100) == truth.cents
    assert truth.cents == round(sum(o["price"] * 100 for o in produced + coupons))
    for p in stats["partitions"]:
        assert p["count"] == truth.count_by_partition.get(p["partition"], 0)

    workers.assert_alive_and_clean()
    assert workers.stop() == {role: 0 for role in workers.roles}, workers.logs()


@pytest.mark.timeout(180)  # a hang guard
@pytest.mark.parametrize("schema_file, diff", [
    ("order-incompatible.avsc", r"currency"),                 # an added required field without a default
    ("order-incompatible-price.avsc", r"price|/fields/2\b"),   # price: double -> string
], ids=["required-field-without-default", "price-double-to-string"])
def test_backward_incompatible_schema_is_rejected_and_nothing_is_produced(evolution_env, schema_file, diff):
    settings = Settings.from_env(evolution_env)
    run_orders(evolution_env, "produce", "--count", "3", "--seed", "4")
    before = end_offsets(settings, settings.orders_topic)
    assert sum(before.values()) == 3
    assert subject_versions(settings) == [1]

    result = run_orders(evolution_env, "produce", "--schema", str(DATA / schema_file), "--count", "1",
                        check=False, timeout=60)

    assert result.returncode == 1, result.stderr
    subject = subject_for(settings.orders_topic)
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, result.stderr
    assert error_lines[0].startswith(f"error: registry rejected the schema for subject {subject}: ")
    assert "409" in error_lines[0] and "incompatible" in error_lines[0].lower(), error_lines[0]
    assert re.search(diff, error_lines[0]), error_lines[0]  # it says what is incompatible
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    # Nothing was produced and the subject still has only v1.
    assert end_offsets(settings, settings.orders_topic) == before
    assert subject_versions(settings) == [1]
    assert dead_letters(evolution_env) == []
