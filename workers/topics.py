"""Idempotent topic bootstrap: create what is missing, never touch what exists."""
from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence

from confluent_kafka import KafkaError, KafkaException, TopicCollection, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic, OffsetSpec, TopicDescription

from .errors import ServiceUnavailable, TopicConfigError
from .settings import Settings

log = logging.getLogger(__name__)

METADATA_TIMEOUT_S = 5  # short: a stop request is noticed between attempts
# Retry and DLQ messages carry the original value plus headers: give them room
# for the largest value the orders topic can hold, so no order is too big to park.
PARKING_MAX_MESSAGE_BYTES = 8 * 1024 * 1024


# _NOENT: list_offsets found no leader for the partition: a topic not created yet, or a
# partition just created or moving between brokers (its end is unknown for a moment).
_MISSING = (KafkaError._UNKNOWN_PARTITION, KafkaError._UNKNOWN_TOPIC, KafkaError.UNKNOWN_TOPIC_OR_PART,
            KafkaError.LEADER_NOT_AVAILABLE, KafkaError._NOENT)
# The admin client's cached leader (or its epoch) is out of date: a broker restarted, or leadership moved.
_STALE_LEADER = (KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.FENCED_LEADER_EPOCH, KafkaError.UNKNOWN_LEADER_EPOCH)


def end_offsets(admin: AdminClient, partitions: Sequence[TopicPartition]) -> list[int | None]:
    """Each partition's end, in one request; None where it does not exist (yet) or has no leader.

    The end is the high watermark: it includes open transactions. (A
    ``read_committed`` consumer's watermark is the last stable offset instead,
    which stops at the first open transaction of any producer.) An admin request,
    not a consumer: a consumer has a group, and closing it could wait for ever on
    the group coordinator (``orders status --watch`` hung on Ctrl-C).
    Raises ServiceUnavailable if Kafka does not answer.
    """
    if not partitions:
        return []
    ends, stale = _list_ends(admin, partitions)
    if stale:
        # The admin client sends the leader epochs it cached, and a restarted or
        # re-elected leader fences them; librdkafka does not refresh its cache on
        # that answer (it would keep failing until the cache expires, 15 minutes).
        _refresh_metadata(admin, sorted({tp.topic for tp in stale}))
        ends, stale = _list_ends(admin, partitions)
    return ends


def known_end_offsets(admin: AdminClient, partitions: Sequence[TopicPartition]) -> list[int]:
    """Each partition's end, as ``end_offsets``; raises ServiceUnavailable if any is not known.

    For readers that must not mistake an unknown end for an empty partition (a
    read that ends early would take parked offsets for counted ones).
    """
    found = end_offsets(admin, partitions)
    known = [end for end in found if end is not None and end >= 0]
    if len(known) != len(found):
        raise ServiceUnavailable(f"kafka: end offsets not known yet: {found}")
    return known


def _list_ends(admin: AdminClient, partitions: Sequence[TopicPartition]
               ) -> tuple[list[int | None], list[TopicPartition]]:
    """The ends (None where unknown), and the partitions whose leader the admin client has wrong."""
    futures = admin.list_offsets({tp: OffsetSpec.latest() for tp in partitions}, request_timeout=METADATA_TIMEOUT_S)
    ends: list[int | None] = []
    stale: list[TopicPartition] = []
    for tp in partitions:
        try:
            offset = futures[tp].result().offset
            ends.append(offset if offset >= 0 else None)  # -1: no end known (no leader yet)
        except KafkaException as exc:
            code = exc.args[0].code()
            if code not in _MISSING and code not in _STALE_LEADER:
                raise ServiceUnavailable(f"kafka: {exc.args[0].str()}") from exc
            ends.append(None)
            if code in _STALE_LEADER:
                stale.append(tp)
    return ends, stale


def _refresh_metadata(admin: AdminClient, topics: list[str]) -> None:
    """Have the admin client ask the brokers for these topics' leaders again (a Metadata request)."""
    describe_topics(admin, topics)


def describe_topics(admin: AdminClient, topics: Sequence[str], timeout: float = METADATA_TIMEOUT_S
                    ) -> dict[str, TopicDescription]:
    """The topics' descriptions (topic ids, partitions); raises ServiceUnavailable if Kafka does not answer.

    librdkafka sends DescribeTopics to the broker that its last Metadata answer named
    as the controller, and waits for that broker even after it died: it looks the
    controller up again only when it knows none. A KRaft broker names a random live
    broker, so a Metadata request (answered by any broker that is up) comes first;
    without it a worker starting while one broker of three was down waited until that
    broker came back (the nemesis soak: 50 s; tests/integration/test_controller_down.py).
    """
    try:
        admin.list_topics(timeout=timeout)  # every topic: naming one could auto-create it
        futures = admin.describe_topics(TopicCollection(list(topics)), request_timeout=timeout)
        return {name: future.result() for name, future in futures.items()}
    except KafkaException as exc:
        raise ServiceUnavailable(f"kafka: {exc.args[0].str()}") from exc


def wanted_topics(settings: Settings) -> dict[str, int]:
    """Topic name -> partition count this configuration needs: one retry topic per delay level."""
    return {
        settings.orders_topic: settings.partitions,
        **{topic: settings.retry_partitions for topic in settings.retry_topics},
        settings.dlq_topic: 1,
    }


def retry_family(settings: Settings, existing: Iterable[str]) -> list[str]:
    """The retry topics to drain: today's levels and every other topic of RETRY_TOPIC's family
    in ``existing`` (levels of earlier backoff settings, the single retry topic of earlier
    versions), shortest delay first. Nothing is orphaned: a retry worker consumes them all."""
    family = set(settings.retry_topics) | {name for name in existing if settings.is_retry_topic(name)}
    return sorted(family, key=lambda name: (retry_delay_of(name), name))


def retry_delay_of(name: str) -> int:
    """The delay a retry topic's name gives (``orders-retry-200ms``: 200); -1 for the single retry topic."""
    match = _LEVEL.search(name)
    return int(match.group(1)) if match else -1


_LEVEL = re.compile(r"-([0-9]+)ms$")


def existing_retry_topics(admin: AdminClient, settings: Settings) -> list[str]:
    """The retry family's topics that exist now (one metadata request); raises ServiceUnavailable."""
    existing = partition_counts(admin)
    return [name for name in retry_family(settings, existing) if name in existing]


def partition_counts(admin: AdminClient) -> dict[str, int]:
    """Every topic's partition count; raises ServiceUnavailable if Kafka does not answer."""
    try:
        metadata = admin.list_topics(timeout=METADATA_TIMEOUT_S)
    except KafkaException as exc:
        raise ServiceUnavailable(f"kafka: {exc.args[0].str()}") from exc
    return {name: len(topic.partitions) for name, topic in metadata.topics.items() if topic.error is None}


def topic_config(settings: Settings, name: str) -> dict[str, str]:
    config = {"retention.ms": str(settings.retention_ms)}
    if name != settings.orders_topic:
        config["max.message.bytes"] = str(PARKING_MAX_MESSAGE_BYTES)
    return config


def ensure_topics(admin: AdminClient, settings: Settings) -> list[str]:
    """Create the missing topics; returns their names.

    The partition counts only matter for topics created here: an existing topic
    keeps its own (partitions may have been added; the consumer groups spread
    whatever the topics have). Raises ServiceUnavailable if Kafka does not answer.
    """
    wanted = wanted_topics(settings)
    existing = partition_counts(admin)
    for name, partitions in wanted.items():
        if name in existing and existing[name] != partitions:
            log.debug("topic=%s has partitions=%d (configured for creation: %d)", name, existing[name], partitions)
    missing = [name for name in wanted if name not in existing]
    if not missing:
        return []
    new = [NewTopic(name, num_partitions=wanted[name], replication_factor=settings.replication_factor,
                    config=topic_config(settings, name))
           for name in missing]
    created = []
    for name, future in admin.create_topics(new, operation_timeout=METADATA_TIMEOUT_S).items():
        try:
            future.result()
            created.append(name)
            log.info("created topic=%s partitions=%d", name, wanted[name])
        except KafkaException as exc:
            err = exc.args[0]
            if err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                continue  # another worker won the race
            raise create_error(name, err) from exc
    return created


# Creating a topic while every broker is fenced (a KRaft broker that has just
# started and not yet registered) fails with INVALID_REPLICATION_FACTOR, "All
# brokers are currently fenced.": the broker is starting, not misconfigured.
_UNAVAILABLE_CODES = (KafkaError._TRANSPORT, KafkaError._TIMED_OUT, KafkaError._ALL_BROKERS_DOWN,
                      KafkaError.REQUEST_TIMED_OUT, KafkaError.NOT_CONTROLLER, KafkaError.BROKER_NOT_AVAILABLE)


def create_error(name: str, err: KafkaError) -> ServiceUnavailable | TopicConfigError:
    """What a failed topic creation means: Kafka not (yet) able to answer, or a configuration to fix."""
    fenced = err.code() == KafkaError.INVALID_REPLICATION_FACTOR and "fenced" in err.str()
    if err.code() in _UNAVAILABLE_CODES or fenced:
        return ServiceUnavailable(f"kafka: cannot create topic {name} yet: {err.str()}")
    return TopicConfigError(f"cannot create topic {name}: {err.str()}")
