"""The schema registry forgets or restarts: orders that were counted stay counted.

Writer schemas are looked up by the id in each message. A registry restart must
not change those ids (the local stack's registry keeps its data on disk), and a
registry that answers 404 for an id the pool has used before must not turn good
orders into dead letters (the serde keeps a copy of every writer schema in Redis).
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import signal
import struct
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import fastavro
import httpx
import pytest
from confluent_kafka import Producer

from workers.clients import make_redis, make_registry
from workers.errors import ServiceUnavailable, UnknownSchema
from workers.serde import MISS_TTL_S, OrderSerde, load_schema, subject_for
from workers.settings import Settings
from workers.store import AggregateStore

from ..conftest import isolated_env
from ..pool import REPO, STACK, SupervisedPool, check_invariants, dead_letters, run_orders, stack, wait_until
from .conftest import cleanup
from .test_faults import finish_load, start_load, wait_for_count
from .test_operational import Worker, free_port, wait_count

ORDER = {"orderId": "o-1", "product": "desk", "price": 99.95}
# Far above any id a registry hands out in a test run.
NEVER_REGISTERED = 2**31 - 7


def registry_id(url: str, topic: str) -> tuple[int, str]:
    """The id and schema text of the latest version of the topic's value subject."""
    reply = httpx.get(f"{url}/subjects/{subject_for(topic)}/versions/latest", timeout=10)
    reply.raise_for_status()
    return reply.json()["id"], reply.json()["schema"]


def registry_pid() -> int:
    """The pid of the registry that scripts/stack started (the test restarts it)."""
    status = subprocess.run([STACK, "status"], capture_output=True, text=True, timeout=60).stdout
    found = re.search(r"^registry\s+running \(pid (\d+)\)", status, re.MULTILINE)
    assert found, f"this test restarts the registry, so scripts/stack must have started it:\n{status}"
    return int(found.group(1))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_registry_restart_keeps_ids_and_counts_exactly(tmp_path):
    """Registry restart, a worker SIGKILLed, Redis wiped, all under load: still exact."""
    env = isolated_env("registry", ORDERS_FAILURE_RATE="0.2", RETRY_BACKOFF_MS="200", PRODUCE_RATE="0.001")
    settings = Settings.from_env(env)
    store = AggregateStore(make_redis(settings), settings.redis_prefix)
    pool = SupervisedPool(env, tmp_path)
    pool.start()
    try:
        load = start_load(env, tmp_path, count=20_000, rate=1_000)
        wait_for_count(store, 1000)
        before = registry_id(settings.schema_registry_url, settings.orders_topic)
        old_registry = registry_pid()
        stack("restart", "registry")
        assert registry_pid() != old_registry, "the registry was not restarted"
        victim = "consumer:consumer-1"
        old_pid = pool.kill(victim, signal.SIGKILL)
        wait_until(lambda: pool.pid(victim) not in (0, old_pid), "supervisor restarted the worker")
        assert store.clear() > 0
        finish_load(load, tmp_path)
        pool.wait_all_running(timeout=120)
        check_invariants(env, settings)
        assert registry_id(settings.schema_registry_url, settings.orders_topic) == before
    finally:
        pool.stop()
        cleanup(settings)


@contextmanager
def fresh_registry(tmp_path: Path) -> Iterator[str]:
    """A second registry with empty storage, on its own ports; yields its URL.

    It reuses the unpacked registry of the running stack (no download), and is
    stopped by scripts/stack, which knows it by its pid file.
    """
    stack_dir = tmp_path / "fresh-stack"
    (stack_dir / "registry").mkdir(parents=True)
    main_stack = Path(os.environ.get("STACK_DIR", REPO / ".stack"))
    for app in (main_stack / "registry").glob("app-*"):
        (stack_dir / "registry" / app.name).symlink_to(app.resolve())
    port = free_port()
    env = {**os.environ, "STACK_DIR": str(stack_dir), "REGISTRY_PORT": str(port),
           "REGISTRY_MANAGEMENT_PORT": str(free_port())}
    try:
        subprocess.run([STACK, "start", "registry"], env=env, check=True, stdout=subprocess.DEVNULL, timeout=300)
        yield f"http://127.0.0.1:{port}/apis/ccompat/v7"
    finally:
        subprocess.run([STACK, "stop", "registry"], env=env, stdout=subprocess.DEVNULL, timeout=120)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_schema_the_registry_forgot_is_read_from_the_copy_kept_in_redis(tmp_path):
    """A worker reads orders of a schema id its registry no longer knows: counted, not dead-lettered."""
    env = isolated_env("forgot", ORDERS_PARTITIONS="1")
    settings = Settings.from_env(env)
    try:
        run_orders(env, "produce", "--count", "30")
        schema_id, _ = registry_id(settings.schema_registry_url, settings.orders_topic)
        worker = Worker(env, tmp_path / "first.log")
        try:
            wait_count(env, 30)
        finally:
            assert worker.stop() == 0
        # A producer that registered before the registry forgot keeps writing that id.
        writer = OrderSerde(make_registry(settings), load_schema(settings.schema_path))
        assert writer.register(settings.orders_topic) == schema_id
        producer = Producer({"bootstrap.servers": settings.bootstrap_servers})
        for i in range(30):
            producer.produce(settings.orders_topic, key=f"later-{i}".encode(), partition=0,
                             value=writer.encode({**ORDER, "orderId": f"later-{i}"}))
        assert producer.flush(30) == 0
        with fresh_registry(tmp_path) as forgetful:
            assert httpx.get(f"{forgetful}/schemas/ids/{schema_id}", timeout=10).status_code == 404
            forgot_env = {**env, "SCHEMA_REGISTRY_URL": forgetful}
            worker = Worker(forgot_env, tmp_path / "second.log")
            try:
                wait_count(env, 60)
            finally:
                assert worker.stop() == 0
        assert dead_letters(env) == []
    finally:
        cleanup(settings)


def wire(schema_id: int, schema: dict, order: dict) -> bytes:
    out = io.BytesIO()
    out.write(struct.pack(">BI", 0, schema_id))
    fastavro.schemaless_writer(out, fastavro.parse_schema(schema), order)
    return out.getvalue()


def test_a_miss_is_remembered_for_a_bounded_time(settings):
    """A 404 for a never-seen id is permanent for MISS_TTL_S, then the id is looked up again."""
    store = AggregateStore(make_redis(settings), settings.redis_prefix)
    schema = load_schema(settings.schema_path)
    now = [1000.0]
    serde = OrderSerde(make_registry(settings), schema, copies=store, clock=lambda: now[0])
    value = wire(NEVER_REGISTERED, schema, ORDER)
    serde.prefetch([value])
    with pytest.raises(UnknownSchema, match=f"schema id {NEVER_REGISTERED}"):
        serde.decode(value)
    # The schema turns up for that id: here as the copy another worker of the pool kept.
    store.keep_schema(NEVER_REGISTERED, json.dumps(schema))
    now[0] += MISS_TTL_S / 2
    serde.prefetch([value])
    with pytest.raises(UnknownSchema):
        serde.decode(value)  # still the remembered miss: no lookup per message
    now[0] += MISS_TTL_S
    serde.prefetch([value])
    assert serde.decode(value) == ORDER


def test_a_404_that_is_not_about_the_id_is_an_outage(settings):
    """A registry URL with a wrong path answers 404 to everything: that must stall, not dead-letter."""
    wrong = dataclasses.replace(settings, schema_registry_url=settings.schema_registry_url + "/not-the-api")
    serde = OrderSerde(make_registry(wrong), load_schema(settings.schema_path))
    value = wire(NEVER_REGISTERED, load_schema(settings.schema_path), ORDER)
    with pytest.raises(ServiceUnavailable, match="schema registry"):
        serde.prefetch([value])
