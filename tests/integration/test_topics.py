import dataclasses

import pytest
from confluent_kafka.admin import NewTopic

from workers.clients import make_admin, wait_for
from workers.errors import ServiceUnavailable
from workers.topics import ensure_topics, partition_counts

from ..pool import wait_until


def test_bootstrap_creates_topics_once(settings):
    admin = make_admin(settings)
    created = ensure_topics(admin, settings)
    assert sorted(created) == sorted([settings.orders_topic, settings.retry_topic, settings.dlq_topic])
    counts = partition_counts(admin)
    assert counts[settings.orders_topic] == 3
    assert counts[settings.retry_topic] == 3
    assert counts[settings.dlq_topic] == 1
    assert ensure_topics(admin, settings) == []  # idempotent: nothing new, nothing touched


def test_bootstrap_keeps_an_existing_topics_partition_count(settings):
    """ORDERS_PARTITIONS only matters when the topic is created: partitions may have been added since."""
    admin = make_admin(settings)
    admin.create_topics([NewTopic(settings.orders_topic, num_partitions=5, replication_factor=1)])[
        settings.orders_topic].result()
    wait_until(lambda: settings.orders_topic in partition_counts(admin), "the topic is in the metadata")
    assert sorted(ensure_topics(admin, settings)) == sorted([settings.retry_topic, settings.dlq_topic])
    # A created topic reaches the brokers' metadata a moment after CreateTopics returns.
    def created() -> dict[str, int] | None:
        counts = partition_counts(admin)
        return counts if settings.retry_topic in counts else None

    counts = wait_until(created, "the created topics are in the metadata")
    assert counts[settings.orders_topic] == 5 and counts[settings.retry_topic] == settings.retry_partitions


def test_kafka_down_is_reported_as_unavailable(settings):
    down = dataclasses.replace(settings, bootstrap_servers="127.0.0.1:1")
    admin = make_admin(down)
    with pytest.raises(ServiceUnavailable, match="kafka"):
        wait_for(lambda: ensure_topics(admin, down), "kafka", deadline_s=1, first_delay_s=0.1)
