import dataclasses

import pytest
from confluent_kafka.admin import NewTopic

from workers.clients import make_admin, wait_for
from workers.errors import ServiceUnavailable, TopicConfigError
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


def test_bootstrap_rejects_a_different_partition_count(settings):
    admin = make_admin(settings)
    admin.create_topics([NewTopic(settings.orders_topic, num_partitions=2, replication_factor=1)])[
        settings.orders_topic].result()
    # The topic exists: wait until the metadata says so, or ensure_topics takes it for
    # missing, loses the race to create it and reports it as created with 2 partitions.
    wait_until(lambda: settings.orders_topic in partition_counts(admin), "the topic is in the metadata")
    with pytest.raises(TopicConfigError, match=r"has 2 partitions but 3 are configured"):
        ensure_topics(admin, settings)
    assert settings.retry_topic not in partition_counts(admin)  # nothing created after the refusal


def test_kafka_down_is_reported_as_unavailable(settings):
    down = dataclasses.replace(settings, bootstrap_servers="127.0.0.1:1")
    admin = make_admin(down)
    with pytest.raises(ServiceUnavailable, match="kafka"):
        wait_for(lambda: ensure_topics(admin, down), "kafka", deadline_s=1, first_delay_s=0.1)
