"""The one place where Kafka, schema registry and Redis clients are built.

Explicit keys set by a role win over extra librdkafka settings from the
environment; librdkafka rejects unknown keys by name and we turn that into a
ConfigError.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import redis
from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.schema_registry import SchemaRegistryClient
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException

from .errors import ConfigError, ServiceUnavailable, StopRequested
from .settings import Settings, is_sensitive, redact_url

log = logging.getLogger(__name__)

T = TypeVar("T")

RedisClient = redis.Redis | RedisCluster
# What redis-py says when no node of a cluster answers (an outage, not a configuration error).
CLUSTER_UNREACHABLE = "Redis Cluster cannot be connected"
_NOT_A_CLUSTER = "Cluster mode is not enabled"  # ...and what it says when the node is a single server

# librdkafka settings a role may not have overridden from the environment,
# because the exactly-once design depends on them.
_PINNED = {
    "enable.auto.commit", "enable.auto.offset.store", "isolation.level",
    "enable.idempotence", "transactional.id", "group.id",
}


def _base_conf(settings: Settings) -> dict:
    extra = dict(settings.kafka_extra)
    pinned = _PINNED & extra.keys()
    if pinned:
        raise ConfigError(f"these Kafka settings are managed by orders and cannot be set: {sorted(pinned)}")
    return {**extra, "bootstrap.servers": settings.bootstrap_servers}


def _build(factory: Callable[[dict], T], conf: dict, what: str) -> T:
    try:
        return factory(conf)
    except KafkaException as exc:
        reason = exc.args[0].str()
        for key, value in conf.items():  # librdkafka may quote the value it rejects
            if is_sensitive(key) and isinstance(value, str) and value:
                reason = reason.replace(value, "***")
        raise ConfigError(f"cannot build the Kafka {what}: {reason}") from exc


def producer_conf(settings: Settings, *, transactional_id: str | None = None, **explicit) -> dict:
    conf = _base_conf(settings)
    conf.update({
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "compression.type": "lz4",
        "batch.num.messages": 10000,
        "queue.buffering.max.messages": 500000,
        # room for a dead-lettered value at the orders topic's size limit plus headers
        "message.max.bytes": 9 * 1024 * 1024,
    })
    if transactional_id:
        conf["transactional.id"] = transactional_id
        conf["transaction.timeout.ms"] = settings.transaction_timeout_ms
    conf.update(explicit)
    return conf


def make_producer(settings: Settings, *, transactional_id: str | None = None, **explicit) -> Producer:
    """An idempotent producer; transactional when ``transactional_id`` is given."""
    return _build(Producer, producer_conf(settings, transactional_id=transactional_id, **explicit), "producer")


def produce_one(producer: Producer, topic: str, key: bytes | None, value: bytes | None, on_delivery: Callable | None,
                *, headers: list | None = None, partition: int = -1) -> None:
    """Hand one message to the client, waiting for room in its queue when it is full."""
    while True:
        try:
            producer.produce(topic, key=key, value=value, headers=headers, partition=partition,
                             on_delivery=on_delivery)
            return
        except BufferError:
            producer.poll(0.1)  # local queue full: let deliveries drain


def consumer_conf(settings: Settings, group_id: str, **explicit) -> dict:
    conf = _base_conf(settings)
    conf.update({
        "group.id": group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        # Only committed retry/DLQ transactions are real; aborted ones are replays.
        "isolation.level": "read_committed",
        "enable.partition.eof": False,
        "fetch.wait.max.ms": 50,
        "queued.min.messages": 20000,
        # Once the local queue holds queued.min.messages, librdkafka stops fetching
        # for fetch.queue.backoff.ms (default 1000): a worker that drains 20000
        # messages in well under a second would then sit idle (profiled: 65% idle).
        "fetch.queue.backoff.ms": 10,
    })
    conf.update(explicit)
    return conf


def make_consumer(settings: Settings, group_id: str, **explicit) -> Consumer:
    """A consumer for explicit assignment; offsets are committed by the caller only."""
    return _build(Consumer, consumer_conf(settings, group_id, **explicit), "consumer")


def make_admin(settings: Settings) -> AdminClient:
    return _build(AdminClient, _base_conf(settings), "admin client")


def make_registry(settings: Settings) -> SchemaRegistryClient:
    conf = {"url": settings.schema_registry_url, "timeout": 10}
    if settings.schema_registry_user_info:
        conf["basic.auth.user.info"] = settings.schema_registry_user_info
    return SchemaRegistryClient(conf)


def make_redis(settings: Settings) -> RedisClient:
    """A Redis client: for one server, connections are made lazily on the first command.

    With REDIS_CLUSTER, REDIS_URL names a seed node of a Redis Cluster. redis-py's
    RedisCluster asks it for the cluster's layout at once, so building one is a
    connection: ServiceUnavailable if no node answers, ConfigError if the server
    refuses the cluster client (not in cluster mode, a db other than 0).
    """
    options = {"socket_connect_timeout": 3, "socket_timeout": 10, "health_check_interval": 15,
               "decode_responses": False}
    if not settings.redis_cluster:
        return redis.Redis.from_url(settings.redis_url, **options)
    try:
        return RedisCluster.from_url(settings.redis_url, **options)
    except RedisClusterException as exc:
        reason = _without_secrets(str(exc), settings)
        if CLUSTER_UNREACHABLE in reason and _NOT_A_CLUSTER not in reason:
            raise ServiceUnavailable(f"redis: {reason}") from exc
        raise ConfigError(f"cannot use {redact_url(settings.redis_url)} as a Redis Cluster: {reason}") from exc
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        raise ServiceUnavailable(f"redis: {_without_secrets(str(exc), settings)}") from exc


def _without_secrets(text: str, settings: Settings) -> str:
    # This message may reach the terminal (`error: ...`), where the log's masking does not apply.
    for secret in settings.secrets():
        text = text.replace(secret, "***")
    return text


def wait_for(check: Callable[[], T], what: str, *, deadline_s: float | None = None,
             first_delay_s: float = 0.5, max_delay_s: float = 5.0,
             should_stop: Callable[[], bool] = lambda: False) -> T:
    """Call ``check`` until it stops raising ServiceUnavailable, backing off.

    Raises the last ServiceUnavailable when ``deadline_s`` passes (never, if None),
    StopRequested when ``should_stop()`` becomes true meanwhile.
    """
    delay = first_delay_s
    start = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        try:
            return check()
        except ServiceUnavailable as exc:
            waited = time.monotonic() - start
            if should_stop():
                raise StopRequested(f"stopped while waiting for {what}") from exc
            if deadline_s is not None and waited >= deadline_s:
                raise
            log.warning("waiting for %s attempt=%d retry_in_s=%.1f reason=%s", what, attempt, delay, exc)
            end = time.monotonic() + delay
            while time.monotonic() < end and not should_stop():
                time.sleep(min(0.2, delay))
            delay = min(max_delay_s, delay * 2)


def describe_servers(settings: Settings) -> str:
    return (f"kafka={settings.bootstrap_servers} registry={redact_url(settings.schema_registry_url)} "
            f"redis={redact_url(settings.redis_url)}")
