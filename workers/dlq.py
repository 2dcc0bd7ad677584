"""The dead letter queue: reading dead letters back as records for people and scripts."""
from __future__ import annotations

import base64
import datetime as dt
import logging
from dataclasses import dataclass
from typing import Callable, Iterator

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Message, TopicPartition

from . import envelope as env
from .errors import OrderError, ServiceUnavailable
from .serde import OrderSerde

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeadLetter:
    """One dead letter, decoded as far as its bytes allow."""

    topic: str
    partition: int
    offset: int
    key: str | None
    order: dict | None
    raw: bytes | None
    headers: dict[str, str]

    @classmethod
    def from_message(cls, msg: Message, serde: OrderSerde) -> "DeadLetter":
        value = msg.value()
        try:
            order = serde.decode(value)
        except OrderError:
            order = None
        key = msg.key()
        return cls(msg.topic(), msg.partition(), msg.offset(),
                   key.decode("utf-8", "replace") if key is not None else None,
                   order, value, env.header_dict(msg.headers()))

    def _int(self, name: str) -> int | None:
        try:
            return int(self.headers[name])
        except (KeyError, ValueError):
            return None

    def as_json(self) -> dict:
        return {
            "order": self.order,
            "raw": base64.b64encode(self.raw).decode() if self.order is None and self.raw is not None else None,
            "key": self.key,
            "error_type": self.headers.get(env.ERROR_TYPE),
            "error_message": self.headers.get(env.ERROR_MESSAGE),
            "attempts": self._int(env.ATTEMPTS),
            "original_topic": self.headers.get(env.ORIGINAL_TOPIC),
            "original_partition": self._int(env.ORIGINAL_PARTITION),
            "original_offset": self._int(env.ORIGINAL_OFFSET),
            "original_timestamp": _iso(self._int(env.ORIGINAL_TIMESTAMP)),
            "first_failed_at": _iso(self._int(env.FIRST_FAILED_AT)),
            "dead_lettered_at": _iso(self._int(env.DEAD_LETTERED_AT)),
            "dlq_partition": self.partition,
            "dlq_offset": self.offset,
        }

    def as_line(self) -> str:
        d = self.as_json()
        if self.order is not None:
            what = f"order={self.order['orderId']} product={self.order['product']} price={self.order['price']}"
        else:
            size = len(self.raw) if self.raw is not None else 0
            what = f"key={self.key or '-'} raw_bytes={size}"
        return (f"{d['dead_lettered_at']}  {what}  error={d['error_type']}: {d['error_message']}  "
                f"attempts={d['attempts']}  from={d['original_topic']}[{d['original_partition']}]@{d['original_offset']}")


def _iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def read_dead_letters(consumer: Consumer, topic: str, serde: OrderSerde, *, follow: bool,
                      stop: Callable[[], bool], poll_timeout_s: float = 0.5) -> Iterator[DeadLetter]:
    """Yield dead letters from the start of ``topic``.

    Without ``follow`` it stops at the end offsets seen when it started.
    Raises ServiceUnavailable when Kafka does not answer.
    """
    try:
        metadata = consumer.list_topics(topic, timeout=10)
    except KafkaException as exc:
        raise ServiceUnavailable(f"kafka: {exc.args[0].str()}") from exc
    partitions = sorted(metadata.topics[topic].partitions) if topic in metadata.topics else []
    if not partitions or metadata.topics[topic].error is not None:
        return
    ends = {}
    for p in partitions:
        try:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
        except KafkaException as exc:
            raise ServiceUnavailable(f"kafka: {exc.args[0].str()}") from exc
        ends[p] = high
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    done = {p for p, high in ends.items() if high == 0}
    while not stop() and (follow or len(done) < len(partitions)):
        for msg in consumer.consume(num_messages=500, timeout=poll_timeout_s):
            if msg.error() is not None:
                log.warning("dlq read error reason=%s", msg.error().str())
                continue
            yield DeadLetter.from_message(msg, serde)
            if msg.offset() + 1 >= ends[msg.partition()]:
                done.add(msg.partition())
        if not follow:
            # Transaction markers occupy offsets: the last real message can sit below
            # the high watermark, so also stop once our position reaches it.
            for tp in consumer.position([TopicPartition(topic, p) for p in partitions]):
                if tp.offset >= ends[tp.partition]:
                    done.add(tp.partition)
