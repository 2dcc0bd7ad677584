"""The order producer: random orders, keyed by orderId, to the ``orders`` topic.

Idempotent producer, batched by librdkafka (``produce`` + ``poll(0)`` per order,
one ``flush`` at the end): delivery reports are counted, never awaited one by one.
"""
from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TextIO

from confluent_kafka import KafkaError, Producer

from .serde import OrderSerde

log = logging.getLogger(__name__)

PRODUCTS = ("keyboard", "mouse", "monitor", "laptop", "headset", "webcam", "dock", "cable", "chair", "desk")
FLUSH_TIMEOUT_S = 60


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


@dataclass
class DeliveryTally:
    """Counts delivery reports; optionally records each delivered order (one JSON line)."""

    record: TextIO | None = None
    delivered: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)

    def report(self, err: KafkaError | None, msg) -> None:
        """The delivery callback when nothing is recorded (no closure per order)."""
        if err is not None:
            self.failed += 1
            if len(self.errors) < 5:
                self.errors.append(err.str())
            return
        self.delivered += 1

    def callback(self, order: dict) -> Callable:
        record = self.record
        if record is None:
            return self.report

        def report_and_record(err: KafkaError | None, msg) -> None:
            self.report(err, msg)
            if err is None:
                record.write(json.dumps({**order, "partition": msg.partition(), "offset": msg.offset()}) + "\n")
        return report_and_record


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


def produce_orders(producer: Producer, serde: OrderSerde, topic: str, *, count: int, rate: float,
                   seed: int | None, stop: Callable[[], bool], tally: DeliveryTally,
                   on_progress: Callable[[int], None] = lambda n: None) -> int:
    """Produce ``count`` orders (0: until ``stop()``); returns how many were handed to the client."""
    limiter = RateLimiter(rate, stop)
    sent = 0
    for order in random_orders(seed):
        if stop() or (count and sent >= count):
            break
        limiter.wait(producer)
        if stop():
            break
        value = serde.encode(order)
        while True:
            try:
                producer.produce(topic, key=order["orderId"].encode(), value=value,
                                 on_delivery=tally.callback(order))
                break
            except BufferError:
                producer.poll(0.1)  # local queue full: wait for deliveries
        producer.poll(0)
        sent += 1
        on_progress(1)
        if sent % 100000 == 0:
            log.info("produced sent=%d delivered=%d failed=%d", sent, tally.delivered, tally.failed)
    remaining = producer.flush(FLUSH_TIMEOUT_S)
    if remaining:
        log.error("flush timed out undelivered=%d", remaining)
    return sent
