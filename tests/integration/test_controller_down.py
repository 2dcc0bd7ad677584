"""A worker loads its state while the broker its admin client takes for the controller is down.

Found by the nemesis soak (seed 15, run 6, tests/soak/README.md): after kafka-1 was
SIGKILLed, host-b's restarted workers logged ``waiting for kafka and redis ...
Failed while waiting for controller: Local: Timed out`` for 50 s and counted nothing,
although two brokers of three were up, until kafka-1 was back. librdkafka sends
DescribeTopics (the worker's topic ids and partition counts) to the broker its last
Metadata answer named as the controller, and waits for that broker's connection; it
looks the controller up again only when it knows none. A KRaft broker names a random
live broker as the "controller", so a Metadata request first names a live one.

On the bed (tests/bed.py: 3 brokers); the killed broker is the one the worker's
admin client has cached as the controller, and it stays down for the whole wait.
"""
from __future__ import annotations

import time

import pytest

from workers.clients import wait_for
from workers.errors import ServiceUnavailable
from workers.settings import Settings
from workers.store import Source

from ..conftest import isolated_env
from ..pool import run_orders, stack
from .conftest import cleanup
from .test_rewind import make_worker

pytestmark = [pytest.mark.slow, pytest.mark.timeout(480), pytest.mark.xdist_group("cluster-bed")]

# Within it, the old code failed every attempt (each waits its 10 s request timeout for the dead
# broker); a broker is fenced (and no longer named) 9 s after its death (broker.session.timeout.ms).
LOAD_BOUND_S = 40


def describe_and_read_ends(worker, source: Source) -> dict[Source, int]:
    """What the worker's state load asks of Kafka: the topics' ids, then the partition's end."""
    worker._describe_topics([source])
    return worker._end_offsets([source])


def test_topic_ids_are_read_while_the_cached_controller_is_down(bed):
    env = isolated_env("controller-down", ORDERS_PARTITIONS="3", **bed.pool_env)
    settings = Settings.from_env(env)
    source = Source(settings.orders_topic, 0)
    killed = None
    try:
        run_orders(env, "init")
        worker = make_worker(settings)
        worker._describe_topics([source])
        # The broker the admin client will send DescribeTopics to: its last Metadata answer's controller.
        controller = worker.admin.list_topics(timeout=10).controller_id
        killed = f"kafka-{controller - 1}"  # scripts/stack's node i is broker i + 1
        stack("kill", killed, env=bed.env)
        started = time.monotonic()
        try:
            ends = wait_for(lambda: describe_and_read_ends(worker, source), "kafka", deadline_s=LOAD_BOUND_S,
                            max_delay_s=2.0)
        except ServiceUnavailable as exc:
            pytest.fail(f"no topic description within {LOAD_BOUND_S} s with {killed} (the cached controller) "
                        f"down: {exc}")
        assert ends == {source: 0}
        assert time.monotonic() - started < LOAD_BOUND_S
    finally:
        if killed is not None:
            stack("start", killed, env=bed.env)
        cleanup(settings)
