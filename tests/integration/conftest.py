"""Integration fixtures: the real Kafka, schema registry and Redis of the local stack.

A missing server fails the test (never skips): start the stack with
``scripts/stack up`` (the README test command does it for you).
"""
from __future__ import annotations

import httpx
import pytest
import redis
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from workers.clients import make_admin, make_redis
from workers.store import AggregateStore

from ..conftest import stack_env
from ..pool import SupervisedPool


def _require_stack() -> None:
    env = stack_env()
    problems = []
    try:
        AdminClient({"bootstrap.servers": env["KAFKA_BOOTSTRAP_SERVERS"]}).list_topics(timeout=10)
    except KafkaException as exc:
        problems.append(f"Kafka at {env['KAFKA_BOOTSTRAP_SERVERS']}: {exc}")
    try:
        httpx.get(env["SCHEMA_REGISTRY_URL"] + "/subjects", timeout=5).raise_for_status()
    except httpx.HTTPError as exc:
        problems.append(f"schema registry at {env['SCHEMA_REGISTRY_URL']}: {exc}")
    try:
        redis.Redis.from_url(env["REDIS_URL"], socket_connect_timeout=3).ping()
    except redis.RedisError as exc:
        problems.append(f"Redis at {env['REDIS_URL']}: {exc}")
    if problems:
        pytest.fail("the local stack is not running (scripts/stack up): " + "; ".join(problems), pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def stack():
    _require_stack()


@pytest.fixture
def settings(make_settings, request):
    """Settings with this test's own topics and keys; deletes them afterwards."""
    s = make_settings(request.node.name[:20].replace("[", "-").replace("]", ""))
    yield s
    cleanup(s)


@pytest.fixture
def pool(env, tmp_path):
    """The real supervisor.conf running with the requesting module's ``env`` fixture."""
    pool = SupervisedPool(env, tmp_path)
    pool.start()
    yield pool
    pool.stop()


def cleanup(s) -> None:
    admin = make_admin(s)
    topics = [t for t in admin.list_topics(timeout=10).topics if s.is_pool_topic(t)]
    if topics:
        for future in admin.delete_topics(topics, operation_timeout=30).values():
            try:
                future.result()
            except KafkaException:
                pass  # already gone
    AggregateStore(make_redis(s), s.redis_prefix).clear()
