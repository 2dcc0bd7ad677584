"""The log of record: which offsets of a source were parked, read back from Kafka.

Every retry or dead letter a worker publishes names the message whose handling
published it (the ``orders.parked.from`` header), in the same Kafka transaction
as the worker's committed offset K. So for any offset below K, the retry and DLQ
topics, read ``read_committed``, say whether it was parked (and where) or
counted. A rebuild (Redis lost or behind) and a worker whose K is gone use this
instead of deciding those orders again under today's settings, and without
calling the downstream a second time.

"The end" is the high watermark, read when the ledger starts: every transaction
committed before then (K's among them) lies below it. A ``read_committed``
consumer's own end is the last stable offset, which stops at the first open
transaction of any producer (a worker killed mid-transaction leaves one until it
is fenced or expires), and would miss committed messages behind it.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Message, TopicPartition
from confluent_kafka.admin import AdminClient

from .envelope import header_dict, parked_from
from .errors import ServiceUnavailable
from .settings import Settings
from .store import DEAD, RETRIED, Source
from .topics import existing_retry_topics, known_end_offsets

log = logging.getLogger(__name__)

READ_TIMEOUT_S = 120.0  # an open transaction of another worker holds read_committed back until it ends

Published = dict[Source, dict[int, int]]  # source -> {offset: DEAD or RETRIED}


def published_decisions(make_consumer: Callable[[], Consumer], admin: AdminClient, settings: Settings,
                        sources: Sequence[Source]) -> Published:
    """Every committed retry/DLQ message published for ``sources``, by source offset.

    Raises ServiceUnavailable if Kafka cannot be read to the end in time.
    """
    wanted = set(sources)
    found: Published = {s: {} for s in sources}
    started = time.monotonic()
    consumer = make_consumer()
    read = 0
    try:
        retry_topics = existing_retry_topics(admin, settings)  # every delay level, old ones too
        for topic, kind in [*((t, RETRIED) for t in retry_topics), (settings.dlq_topic, DEAD)]:
            for msg in _read_to_end(consumer, admin, topic):
                read += 1
                origin = parked_from(header_dict(msg.headers()), settings.orders_topic)
                if origin is not None:
                    source = Source(origin[0], origin[1])
                    if source in wanted:
                        found[source][origin[2]] = kind
    finally:
        consumer.close()
    log.info("read the log of record sources=%s read=%d parked=%d seconds=%.1f", ",".join(map(str, sources)),
             read, sum(len(v) for v in found.values()), time.monotonic() - started)
    return found


def _read_to_end(consumer: Consumer, admin: AdminClient, topic: str) -> Iterator[Message]:
    """Every committed message of ``topic`` up to its high watermark when called."""
    try:
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        if meta.error is not None:
            raise ServiceUnavailable(f"kafka: topic {topic}: {meta.error.str()}")
    except KafkaException as exc:
        raise ServiceUnavailable(f"kafka: {exc.args[0].str()}") from exc
    parts = sorted(meta.partitions)
    if not parts:
        raise ServiceUnavailable(f"kafka: topic {topic} has no partitions in the metadata yet")
    ends = dict(zip(parts, known_end_offsets(admin, [TopicPartition(topic, p) for p in parts]), strict=True))
    pending = {p for p, end in ends.items() if end > 0}
    if not pending:
        return
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in pending])
    deadline = time.monotonic() + READ_TIMEOUT_S
    try:
        while pending:
            if time.monotonic() > deadline:
                raise ServiceUnavailable(f"kafka: could not read {topic} to its end in {READ_TIMEOUT_S:.0f}s")
            for msg in consumer.consume(5000, 0.5):
                if msg.error() is None:
                    yield msg
            positions = consumer.position([TopicPartition(topic, p) for p in pending])
            pending -= {tp.partition for tp in positions if tp.offset >= ends[tp.partition]}
    finally:
        consumer.unassign()
