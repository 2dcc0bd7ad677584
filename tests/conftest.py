"""Fixtures shared by all tests: settings isolated per test, real servers only."""
from __future__ import annotations

import os
import uuid

import pytest

from workers.settings import Settings


def unique(name: str) -> str:
    return f"t-{name}-{uuid.uuid4().hex[:8]}"


def stack_env() -> dict[str, str]:
    """Where the servers are: the environment, or the local stack's defaults."""
    return {
        "KAFKA_BOOTSTRAP_SERVERS": os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092"),
        "SCHEMA_REGISTRY_URL": os.environ.get("SCHEMA_REGISTRY_URL", "http://127.0.0.1:8081/apis/ccompat/v7"),
        "REDIS_URL": os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
    }


def isolated_env(name: str, **extra: str) -> dict[str, str]:
    """Environment variables giving one test its own topics, groups and Redis keys."""
    tag = unique(name)
    env = {
        **stack_env(),
        "ORDERS_TOPIC": f"{tag}-orders",
        "RETRY_TOPIC": f"{tag}-retry",
        "DLQ_TOPIC": f"{tag}-dlq",
        "REDIS_PREFIX": tag,
        "CONSUMER_GROUP_PREFIX": tag,
        "TRANSACTIONAL_ID_PREFIX": tag,
        "RETRY_BACKOFF_MS": "200",
        "LOG_LEVEL": "INFO",
    }
    env.update(extra)
    return env


@pytest.fixture
def make_settings():
    def build(name: str = "test", **extra: str) -> Settings:
        return Settings.from_env(isolated_env(name, **extra))
    return build
