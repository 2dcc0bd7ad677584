import dataclasses
import functools
import subprocess

import pytest
from confluent_kafka import Producer, TopicPartition
from confluent_kafka.admin import NewTopic

from workers.clients import make_admin, wait_for
from workers.errors import ServiceUnavailable
from workers.topics import end_offsets, ensure_topics, partition_counts

from ..pool import STACK, stack, wait_until
from .conftest import cleanup


def test_bootstrap_creates_topics_once(settings):
    admin = make_admin(settings)
    created = ensure_topics(admin, settings)
    # One retry topic per delay level (the tests' base is 200 ms: 200, 400 and 800 ms).
    delays = [settings.retry_delay_ms(n) for n in (1, 2, 3)]
    assert settings.retry_topics == [f"{settings.retry_topic}-{ms}ms" for ms in delays] and len(set(delays)) == 3
    assert sorted(created) == sorted([settings.orders_topic, *settings.retry_topics, settings.dlq_topic])
    # A created topic reaches the broker's metadata a moment after CreateTopics returns (a clean-clone
    # CI run read the counts at once and found the orders topic missing).
    def all_created() -> dict[str, int] | None:
        counts = partition_counts(admin)
        return counts if set(created) <= set(counts) else None

    counts = wait_until(all_created, "the created topics are in the metadata")
    assert counts[settings.orders_topic] == 3
    assert all(counts[topic] == 3 for topic in settings.retry_topics)
    assert counts[settings.dlq_topic] == 1
    assert ensure_topics(admin, settings) == []  # idempotent: nothing new, nothing touched


def test_bootstrap_keeps_an_existing_topics_partition_count(settings):
    """ORDERS_PARTITIONS only matters when the topic is created: partitions may have been added since."""
    admin = make_admin(settings)
    admin.create_topics([NewTopic(settings.orders_topic, num_partitions=5, replication_factor=1)])[
        settings.orders_topic].result()
    wait_until(lambda: settings.orders_topic in partition_counts(admin), "the topic is in the metadata")
    assert sorted(ensure_topics(admin, settings)) == sorted([*settings.retry_topics, settings.dlq_topic])
    # A created topic reaches the brokers' metadata a moment after CreateTopics returns.
    def created() -> dict[str, int] | None:
        counts = partition_counts(admin)
        return counts if set(settings.retry_topics) <= set(counts) else None

    counts = wait_until(created, "the created topics are in the metadata")
    assert counts[settings.orders_topic] == 5 and counts[settings.retry_topics[0]] == settings.retry_partitions


def test_kafka_down_is_reported_as_unavailable(settings):
    down = dataclasses.replace(settings, bootstrap_servers="127.0.0.1:1")
    admin = make_admin(down)
    with pytest.raises(ServiceUnavailable, match="kafka"):
        wait_for(lambda: ensure_topics(admin, down), "kafka", deadline_s=1, first_delay_s=0.1)


def test_end_offsets_after_a_broker_restart(settings):
    """A restarted broker fences the partitions' old leader epoch: the admin client must learn the new one.

    Before, the long-lived admin client kept the epoch it had cached, and every
    ListOffsets after the restart failed with FENCED_LEADER_EPOCH until the cache
    expired (15 minutes): the retry worker, rewinding, waited on the log of
    record for the rest of test_broker_restart.
    """
    admin = make_admin(settings)
    ensure_topics(admin, settings)
    producer = Producer({"bootstrap.servers": settings.bootstrap_servers})
    for _ in range(3):
        producer.produce(settings.orders_topic, value=b"x", partition=0)
    assert producer.flush(30) == 0
    partitions = [TopicPartition(settings.orders_topic, 0), TopicPartition(settings.retry_topics[0], 1)]

    def ends_known() -> list[int | None] | None:
        try:
            ends = end_offsets(admin, partitions)
        except ServiceUnavailable:
            return None
        return ends if ends == [3, 0] else None

    wait_until(ends_known, "the end offsets are read")  # the admin client caches the leaders and their epochs
    stack("restart", "kafka")
    wait_until(ends_known, "the end offsets are read again after the restart", timeout=90)


def test_topics_are_created_while_the_broker_stops_and_starts(make_settings):
    """A KRaft broker fences itself as it shuts down (and is fenced again as it starts):
    CreateTopics then fails with INVALID_REPLICATION_FACTOR, "All brokers are currently
    fenced". A worker, `orders produce` or `orders init` starting at that moment must wait
    for the broker, not stop with a configuration error: test_broker_restart's load producer
    did, in a clean-clone run (its topic bootstrap met the broker's graceful stop).
    """
    tried: list = []
    stopping = subprocess.Popen([STACK, "stop", "kafka"], stdout=subprocess.DEVNULL)
    try:
        # New topics, each time by a new client, until the broker is down: some request
        # meets it while it is fenced.
        while stopping.poll() is None:
            tried.append(make_settings(f"fenced{len(tried)}"))
            try:
                bootstrap(tried[-1])
            except ServiceUnavailable:
                pass  # down (or fenced): waited for below
        assert stopping.returncode == 0
        stack("start", "kafka")
        for s in tried:
            created = wait_for(functools.partial(bootstrap, s), "kafka", deadline_s=60)
            assert set(created) <= {s.orders_topic, *s.retry_topics, s.dlq_topic}
        assert all(partition_counts(make_admin(s)).get(s.orders_topic) for s in tried)
    finally:
        stopping.wait(timeout=240)
        stack("start", "kafka")  # a no-op when it runs
        for s in tried:
            cleanup(s)


def bootstrap(settings) -> list[str]:
    """What a starting program does first: create the topics, with a client of its own."""
    return ensure_topics(make_admin(settings), settings)
