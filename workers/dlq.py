"""The dead letter queue: reading dead letters back, filtering, summarising, replaying."""
from __future__ import annotations

import base64
import datetime as dt
import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from . import envelope as env
from . import oversize
from .clients import produce_one, wait_for
from .errors import OrderError, OrdersError, ServiceUnavailable
from .logs import printable
from .serde import OrderSerde

log = logging.getLogger(__name__)

READ_START_S = 30.0  # a one-shot read (`orders dlq`) waits this long for the end offsets

FLUSH_TIMEOUT_S = 60


@dataclass(frozen=True)
class DeadLetter:
    """One dead letter, decoded as far as its bytes allow."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    order: dict | None
    raw: bytes | None
    headers: dict[str, str]

    @classmethod
    def from_message(cls, msg: Message, serde: OrderSerde) -> DeadLetter:
        topic, partition, offset, value = msg.topic(), msg.partition(), msg.offset(), msg.value()
        if topic is None or partition is None or offset is None:
            raise ValueError("a dead letter is a consumed message (with topic, partition and offset)")
        try:
            order = serde.decode(value)
        except OrderError:
            order = None
        return cls(topic, partition, offset, msg.key(), order, value, _headers(msg))

    @property
    def id(self) -> str:
        """Where the dead letter sits: ``topic:partition:offset``."""
        return f"{self.topic}:{self.partition}:{self.offset}"

    @property
    def error_type(self) -> str | None:
        return self.headers.get(env.ERROR_TYPE)

    @property
    def reference(self) -> dict | None:
        """Set when the value (and maybe the key) was too large to keep: what is known of it."""
        return oversize.reference(self.headers)

    @property
    def dead_lettered_at_ms(self) -> int | None:
        return self._int(env.DEAD_LETTERED_AT)

    def _int(self, name: str) -> int | None:
        try:
            return int(self.headers[name])
        except (KeyError, ValueError):
            return None

    def as_json(self, replay: dict | None = None) -> dict:
        return {
            "id": self.id,
            "order": _json_safe(self.order),
            "raw": base64.b64encode(self.raw).decode() if self.order is None and self.raw is not None else None,
            "key": self.key.decode("utf-8", "replace") if self.key is not None else None,
            "error_type": self.error_type,
            "error_message": self.headers.get(env.ERROR_MESSAGE),
            "attempts": self._int(env.ATTEMPTS),
            "original_topic": self.headers.get(env.ORIGINAL_TOPIC),
            "original_partition": self._int(env.ORIGINAL_PARTITION),
            "original_offset": self._int(env.ORIGINAL_OFFSET),
            "original_timestamp": _iso(self._int(env.ORIGINAL_TIMESTAMP)),
            "first_failed_at": _iso(self._int(env.FIRST_FAILED_AT)),
            "dead_lettered_at": _iso(self.dead_lettered_at_ms),
            "replay_of": self.headers.get(env.REPLAY_OF),
            "replayed_at": _iso(replay["at_ms"]) if replay else None,
            "reference": self.reference,
        }

    def as_line(self, replay: dict | None = None) -> str:
        """One line for a person; whatever the message brought in is escaped (``logs.printable``)."""
        d = self.as_json(replay)
        ref = d["reference"]
        if self.order is not None:
            what = f"order={self.order['orderId']} product={self.order['product']} price={self.order['price']}"
        elif ref is not None:
            head = base64.b64decode(ref.get("value_head") or "")[:32]
            what = (f"key={d['key'] or '-'} value not kept: {ref.get('value_size')} bytes "
                    f"sha256={ref.get('value_sha256')} head={head!r}")
        else:
            size = len(self.raw) if self.raw is not None else 0
            what = f"key={d['key'] or '-'} raw_bytes={size}"
        line = (f"{d['dead_lettered_at']}  {what}  error={d['error_type']}: {d['error_message']}  "
                f"attempts={d['attempts']}  "
                f"from={d['original_topic']}[{d['original_partition']}]@{d['original_offset']}")
        if d["replayed_at"]:
            line += f"  REPLAYED {d['replayed_at']}"
        if ref is not None:
            line += f"  ({ref['reason']})"
        return printable(line)


def _headers(msg: Message) -> dict[str, str]:
    raw = msg.headers() or []
    pairs = raw.items() if isinstance(raw, dict) else raw
    return env.header_dict((name, value.encode() if isinstance(value, str) else value) for name, value in pairs)


def _json_safe(order: dict | None) -> dict | None:
    """NaN and infinities are not JSON (RFC 8259): name them, so strict parsers read every line."""
    if order is None:
        return None
    return {k: (("NaN" if math.isnan(v) else "Infinity" if v > 0 else "-Infinity")
                if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in order.items()}


def _iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


_RELATIVE = re.compile(r"^(\d+)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str, now: dt.datetime | None = None) -> int:
    """``30m``, ``2h``, ``1d`` ago, or an ISO 8601 time -> epoch ms; raises ValueError."""
    now = now or dt.datetime.now(dt.UTC)
    match = _RELATIVE.match(text.strip())
    if match:
        return int((now.timestamp() - int(match.group(1)) * _UNIT_S[match.group(2)]) * 1000)
    when = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp() * 1000)


@dataclass(frozen=True)
class Filters:
    """Which dead letters an operator selected; empty fields select everything."""

    error_types: tuple[str, ...] = ()
    order_ids: tuple[str, ...] = ()
    since_ms: int | None = None

    def match(self, letter: DeadLetter) -> bool:
        if self.error_types and letter.error_type not in self.error_types:
            return False
        if self.order_ids and (letter.order is None or letter.order["orderId"] not in self.order_ids):
            return False
        if self.since_ms is not None and (letter.dead_lettered_at_ms or 0) < self.since_ms:
            return False
        return True


def read_dead_letters(consumer: Consumer, topic: str, serde: OrderSerde, *, follow: bool,
                      stop: Callable[[], bool], poll_timeout_s: float = 0.5) -> Iterator[DeadLetter]:
    """Yield dead letters from the start of ``topic``.

    Without ``follow`` it stops at the end offsets seen when it started, and raises
    ServiceUnavailable when Kafka does not tell them within READ_START_S. With
    ``follow`` (a long-running viewer, like a worker) it waits for Kafka as long as it
    takes: a broker restarting, or partitions whose leaders are still being elected
    just after the topic was created, must not end it.
    """
    ends = wait_for(lambda: _end_offsets(consumer, topic), "kafka", should_stop=stop,
                    deadline_s=None if follow else READ_START_S)
    if ends is None:
        return
    partitions = sorted(ends)
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    done = {p for p, high in ends.items() if high == 0}
    while not stop() and (follow or len(done) < len(partitions)):
        for msg in consumer.consume(num_messages=500, timeout=poll_timeout_s):
            err = msg.error()
            if err is not None:
                log.warning("dlq read error reason=%s", err.str())
                continue
            letter = DeadLetter.from_message(msg, serde)
            yield letter
            if letter.offset + 1 >= ends[letter.partition]:
                done.add(letter.partition)
        if not follow:
            # Transaction markers occupy offsets: the last real message can sit below
            # the high watermark, so also stop once our position reaches it.
            for tp in consumer.position([TopicPartition(topic, p) for p in partitions]):
                if tp.offset >= ends[tp.partition]:
                    done.add(tp.partition)


def _end_offsets(consumer: Consumer, topic: str) -> dict[int, int] | None:
    """Each partition's high watermark; None if the topic does not exist. Raises ServiceUnavailable."""
    try:
        meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or meta.error is not None or not meta.partitions:
            return None
        return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                for p in sorted(meta.partitions)}
    except KafkaException as exc:
        raise ServiceUnavailable(f"kafka: {exc.args[0].str()}") from exc


def summarize(letters: Iterable[DeadLetter], replays: dict[str, dict]) -> dict:
    """Counts by error type, and how many of each were replayed."""
    by_type: Counter = Counter()
    replayed: Counter = Counter()
    for letter in letters:
        by_type[letter.error_type or "unknown"] += 1
        if letter.id in replays:
            replayed[letter.error_type or "unknown"] += 1
    return {"total": sum(by_type.values()), "replayed": sum(replayed.values()),
            "by_error_type": {t: {"count": n, "replayed": replayed[t]} for t, n in by_type.most_common()}}


class ReplayFailed(OrdersError):
    """Kafka did not acknowledge some replayed dead letters."""


def replay(letters: Iterable[DeadLetter], producer: Producer, orders_topic: str, *,
           now_ms: Callable[[], int]) -> tuple[dict[str, dict], list[str]]:
    """Publish dead letters to the orders topic as fresh orders.

    Each copy carries the header ``orders.replay.of`` = the dead letter's id, so
    the workers count a replayed order once however often it is replayed.
    Returns (dead letter id -> replay record for each delivered copy, delivery errors).
    """
    delivered: dict[str, dict] = {}
    errors: list[str] = []

    def report(letter_id: str):
        def on_delivery(err: KafkaError | None, msg) -> None:
            if err is not None:
                errors.append(f"{letter_id}: {err.str()}")
            else:
                delivered[letter_id] = {"at_ms": now_ms(), "partition": msg.partition(), "offset": msg.offset()}
        return on_delivery

    for letter in letters:
        produce_one(producer, orders_topic, letter.key, letter.raw, report(letter.id),
                    headers=[(env.REPLAY_OF, letter.id.encode())])
        producer.poll(0)
    producer.flush(FLUSH_TIMEOUT_S)
    return delivered, errors
