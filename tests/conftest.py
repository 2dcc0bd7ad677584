"""Fixtures shared by all tests: settings isolated per test, real servers only."""
from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from workers.settings import Settings

from .bed import Bed, running_bed
from .lanes import lane_env, xdist_lane

# Each xdist worker tests against its own lane's stack (tests/lanes.py). This runs when
# pytest imports the conftest, before any fixture, test or child process reads the
# environment, so the lane's servers are the only ones this worker ever sees.
os.environ.update(lane_env(xdist_lane()))


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


@pytest.fixture(scope="session")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    """The lane's scale-out bed (tests/bed.py), started once for the tests that ask for it.

    Those tests (tests/integration/test_scale_out.py, tests/soak) share the xdist group
    "cluster-bed", so one lane runs them all on one bed; it is defined here, above both
    folders, so that they share one instance rather than each starting a bed on its ports.
    """
    with running_bed(tmp_path_factory.mktemp("cluster-stack")) as started:
        yield started


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The long fault scenarios first: a lane never ends the run alone with one of them."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Under ``--dist loadgroup`` every xdist_group test must carry its group in its id.

    That suffix is how pytest-xdist keeps a group in one lane. pytest 9.2 stopped
    honouring it (requirements-dev.txt) and each lane silently started its own bed.
    """
    if not getattr(session.config.option, "loadgroup", False):
        return
    lost = [item.nodeid for item in session.items
            if item.get_closest_marker("xdist_group") and "@" not in item.nodeid]
    if lost:
        raise pytest.UsageError(f"xdist_group ignored by this pytest/pytest-xdist pair, e.g. {lost[0]}")
