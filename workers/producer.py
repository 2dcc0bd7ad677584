"""The order producer: random orders, keyed by orderId, to the ``orders`` topic.

Idempotent producer, batched by librdkafka (``produce`` + ``poll(0)`` per order,
one ``flush`` at the end): delivery reports are counted, never awaited one by one.
A producer that librdkafka leaves stuck after a broker restart is replaced
(``StuckProducerGuard``).
"""
from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TextIO

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from .clients import produce_one
from .serde import OrderSerde

log = logging.getLogger(__name__)

PRODUCTS = ("keyboard", "mouse", "monitor", "laptop", "headset", "webcam", "dock", "cable", "chair", "desk")
FLUSH_TIMEOUT_S = 60
STALL_S = 30.0      # orders waiting, no delivery report this long, and every partition has a leader: stuck
MAX_REPLACEMENTS = 3  # in a row without a delivery report between them; then librdkafka's timeouts decide


_UUID4_BITS = (0x4 << 76) | (0x2 << 62)            # version 4, RFC 4122 variant
_UUID4_MASK = ~((0xF << 76) | (0x3 << 62)) & ((1 << 128) - 1)


def random_orders(seed: int | None = None) -> Iterator[dict]:
    """Endless random orders. ``seed`` fixes products and prices; ids are always unique.

    Ids are random UUIDv4 strings from a generator seeded by the OS (never by
    ``seed``), so two runs never share one; ``uuid.uuid4()`` would cost a system
    call per order, half of this loop's time.
    """
    rng = random.Random(seed)
    ids = random.Random()  # seeded from os.urandom
    while True:
        h = f"{ids.getrandbits(128) & _UUID4_MASK | _UUID4_BITS:032x}"
        yield {
            "orderId": f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}",
            "product": rng.choice(PRODUCTS),
            "price": round(rng.uniform(1, 500), 2),
        }


Requeue = Callable[[Message, Callable], None]


@dataclass
class DeliveryTally:
    """Counts delivery reports; optionally records each delivered order (one JSON line).

    Once ``requeue`` is set, an order purged from a stuck producer's queue is handed
    to it (to be produced again on the new producer) instead of being counted as failed.
    """

    record: TextIO | None = None
    delivered: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    requeue: Requeue | None = None

    @property
    def reports(self) -> int:
        return self.delivered + self.failed

    def report(self, err: KafkaError | None, msg: Message) -> None:
        """The delivery callback when nothing is recorded (no closure per order)."""
        if err is not None:
            self._failed(err, msg, self.report)
            return
        self.delivered += 1

    def _failed(self, err: KafkaError, msg: Message, callback: Callable) -> None:
        if self.requeue is not None and err.code() == KafkaError._PURGE_QUEUE:
            self.requeue(msg, callback)
            return
        self.failed += 1
        if len(self.errors) < 5:
            self.errors.append(err.str())

    def callback(self, order: dict) -> Callable:
        record = self.record
        if record is None:
            return self.report

        def report_and_record(err: KafkaError | None, msg: Message) -> None:
            if err is not None:
                self._failed(err, msg, report_and_record)
                return
            self.delivered += 1
            record.write(json.dumps({**order, "partition": msg.partition(), "offset": msg.offset()}) + "\n")
        return report_and_record


class StuckProducerGuard:
    """Replaces a producer that librdkafka left unable to deliver while the brokers are fine.

    After a broker's graceful shutdown, librdkafka (2.16; confluentinc/librdkafka#5430)
    can keep a partition without a leader for good: the shutdown's produce response
    names leader -1, that update is skipped, and later metadata naming the real
    leader does not clear it. Orders then wait in the client until they time out.
    The guard sees it (orders waiting, no delivery report for ``stall_s``, and the
    brokers naming a leader for every partition), moves the orders still queued to a
    new producer, and keeps the old one until what it has in flight is settled. An
    order is therefore sent by one producer only: none is lost or sent twice.
    """

    def __init__(self, make: Callable[[], Producer], topic: str, tally: DeliveryTally,
                 stall_s: float = STALL_S):
        self._make = make
        self._topic = topic
        self._tally = tally
        self._stall_s = stall_s
        self.retired: list[Producer] = []
        self.replacements = 0
        self._in_a_row = 0
        self._reports = tally.reports
        self._last_report = time.monotonic()
        self._next_check = 0.0

    def check(self, producer: Producer) -> Producer:
        """The producer to use from now on: ``producer``, or its replacement when it is stuck."""
        now = time.monotonic()
        if now < self._next_check:
            return producer
        self._next_check = now + 1.0
        self._serve_retired()
        if self._tally.reports != self._reports or not len(producer):
            self._reports, self._last_report = self._tally.reports, now
            self._in_a_row = 0
            return producer
        if now - self._last_report < self._stall_s or self._in_a_row >= MAX_REPLACEMENTS:
            return producer
        if not self._leaders_known(producer):
            self._next_check = time.monotonic() + 5.0  # each look may wait 2 s: not every second
            return producer  # a real outage: the orders wait for the broker
        return self._replace(producer, now)

    def _leaders_known(self, producer: Producer) -> bool:
        try:
            topic = producer.list_topics(self._topic, timeout=2).topics.get(self._topic)
        except KafkaException:
            return False
        return (topic is not None and topic.error is None and bool(topic.partitions)
                and all(p.leader >= 0 and p.error is None for p in topic.partitions.values()))

    def _replace(self, producer: Producer, now: float) -> Producer:
        waiting = len(producer)
        fresh = self._make()

        def requeue(msg: Message, callback: Callable) -> None:
            partition = msg.partition()  # the partitioner's choice: the order keeps its partition
            produce_one(fresh, msg.topic() or self._topic, msg.key(), msg.value(), callback,
                        partition=-1 if partition is None else partition)
        # Kept after this call: the purged orders' reports may come with a later poll.
        self._tally.requeue = requeue
        producer.purge(in_queue=True, in_flight=False)
        producer.poll(0)
        self.retired.append(producer)
        self.replacements += 1
        self._in_a_row += 1
        self._last_report = now
        log.warning("producer stuck waiting=%d no_delivery_for_s=%.0f action=replaced moved=%d in_flight=%d",
                    waiting, self._stall_s, len(fresh), len(producer))
        return fresh

    def _serve_retired(self) -> None:
        for old in self.retired:
            old.poll(0)
        self.retired = [old for old in self.retired if len(old)]

    def flush(self, producer: Producer, timeout_s: float) -> int:
        """Flush ``producer`` and the retired ones; returns how many messages are left undelivered."""
        deadline = time.monotonic() + timeout_s
        while True:
            producer = self.check(producer)
            for old in self.retired:
                old.flush(0)  # first: its purged orders join ``producer`` before that is flushed
            left = producer.flush(1.0) + sum(len(old) for old in self.retired)
            if not left or time.monotonic() >= deadline:
                return left


class RateLimiter:
    """Paces calls to ``rate`` per second (0: unlimited) without drifting."""

    def __init__(self, rate: float, stop: Callable[[], bool]):
        self._interval = 1.0 / rate if rate > 0 else 0.0
        self._next = time.monotonic()
        self._stop = stop

    def wait(self, producer: Producer) -> None:
        if not self._interval:
            return
        self._next += self._interval
        while not self._stop():
            delay = self._next - time.monotonic()
            if delay <= 0:
                return
            producer.poll(min(delay, 0.5))  # serve delivery reports while pacing


CHECK_EVERY = 1024  # unpaced orders between looks at stop(), the stuck-producer guard and the progress bar


def produce_orders(producer: Producer, serde: OrderSerde, topic: str, *, count: int, rate: float,
                   seed: int | None, stop: Callable[[], bool], tally: DeliveryTally,
                   on_progress: Callable[[int], None] = lambda n: None,
                   guard: StuckProducerGuard | None = None) -> int:
    """Produce ``count`` orders (0: until ``stop()``); returns how many were handed to the client.

    With a ``guard``, a producer that librdkafka leaves stuck is replaced on the way.
    Unpaced (``rate`` 0), the stop flag, the guard and the progress bar are looked
    at every CHECK_EVERY orders (a few milliseconds), not per order: per order they
    cost more than encoding it.
    """
    limiter = RateLimiter(rate, stop)
    every = 1 if rate > 0 else CHECK_EVERY
    encode = serde.encode
    # One bound method for every order unless each delivered order is recorded.
    report = tally.report if tally.record is None else None
    sent = unreported = 0
    for order in random_orders(seed):
        if count and sent >= count:
            break
        if sent % every == 0:
            if stop():
                break
            if guard is not None:
                producer = guard.check(producer)
            if unreported:
                on_progress(unreported)
                unreported = 0
            if rate > 0:
                limiter.wait(producer)
                if stop():
                    break
        produce_one(producer, topic, order["orderId"].encode(), encode(order), report or tally.callback(order))
        producer.poll(0)
        sent += 1
        unreported += 1
        if sent % 100000 == 0:
            log.info("produced sent=%d delivered=%d failed=%d", sent, tally.delivered, tally.failed)
    if unreported:
        on_progress(unreported)
    remaining = guard.flush(producer, FLUSH_TIMEOUT_S) if guard else producer.flush(FLUSH_TIMEOUT_S)
    if remaining:
        log.error("flush timed out undelivered=%d", remaining)
    return sent
