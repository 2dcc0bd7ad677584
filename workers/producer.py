"""The order producer: random orders, keyed by orderId, to the ``orders`` topic.

Two ways to send them, one loop (``produce_orders``):

* ``IdempotentSender`` (the default): librdkafka's idempotent producer, batched by
  librdkafka (``produce`` + ``poll(0)`` per order, one ``flush`` at the end):
  delivery reports are counted, never awaited one by one. A producer that
  librdkafka leaves stuck after a broker restart is replaced (``StuckProducerGuard``).
* ``TransactionalSender`` (``--transactional``): orders go in Kafka transactions
  of at most COMMIT_INTERVAL_S. An order is counted (and recorded) delivered only
  once its transaction committed, and an aborted transaction is sent again on a
  new producer; so no orderId reaches a ``read_committed`` reader twice, even where
  the idempotent producer can write one twice (confluentinc/librdkafka#4953).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol, TextIO

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from .clients import produce_one
from .errors import FatalWorkerError, OrdersError, StopRequested
from .serde import OrderSerde
from .transaction import AbortFailed, Fenced, KafkaTransaction, TransactionAborted, Watchdog

log = logging.getLogger(__name__)

PRODUCTS = ("keyboard", "mouse", "monitor", "laptop", "headset", "webcam", "dock", "cable", "chair", "desk")
FLUSH_TIMEOUT_S = 60
STALL_S = 30.0      # orders waiting, no delivery report this long, and every partition has a leader: stuck
MAX_REPLACEMENTS = 3  # in a row without a delivery report between them; then librdkafka's timeouts decide
# Transactions: an open one holds every read_committed worker at its first order, so
# they are short; each commit writes one marker per partition it touched.
COMMIT_INTERVAL_S = 0.1
MAX_BATCH = 50_000     # orders kept for sending again after an abort
GIVE_UP_S = 300.0      # one batch not committed this long fails the run (librdkafka's default message timeout)


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

    def wait(self, idle: Callable[[float], None]) -> None:
        """Wait for the next call's turn, handing the time to ``idle`` (delivery reports, commits)."""
        if not self._interval:
            return
        self._next += self._interval
        while not self._stop():
            delay = self._next - time.monotonic()
            if delay <= 0:
                return
            idle(min(delay, 0.5))


class DeliveryFailed(OrdersError):
    """Some produced orders were not acknowledged (or, in transactions, not committed) by Kafka."""


class Sender(Protocol):
    """How ``produce_orders`` hands orders to Kafka."""

    tally: DeliveryTally

    def send(self, key: bytes, value: bytes, order: dict) -> None: ...

    def tick(self) -> None:
        """Called every few orders: housekeeping (the stuck-producer guard, a due commit)."""

    def idle(self, seconds: float) -> None:
        """Nothing to send for ``seconds``: serve delivery reports (and commit when due)."""

    def finish(self, timeout_s: float) -> int:
        """Deliver what was sent; returns how many orders are left undelivered."""


class IdempotentSender:
    """The idempotent producer: each order is counted delivered on its delivery report."""

    def __init__(self, producer: Producer, topic: str, tally: DeliveryTally, guard: StuckProducerGuard | None = None):
        self.producer = producer
        self.tally = tally
        self._topic = topic
        self._guard = guard
        # One bound method for every order unless each delivered order is recorded.
        self._report = tally.report if tally.record is None else None

    def send(self, key: bytes, value: bytes, order: dict) -> None:
        produce_one(self.producer, self._topic, key, value, self._report or self.tally.callback(order))
        self.producer.poll(0)

    def tick(self) -> None:
        if self._guard is not None:
            self.producer = self._guard.check(self.producer)

    def idle(self, seconds: float) -> None:
        self.producer.poll(seconds)

    def finish(self, timeout_s: float) -> int:
        if self._guard is not None:
            return self._guard.flush(self.producer, timeout_s)
        return self.producer.flush(timeout_s)


class TransactionalSender:
    """Orders in Kafka transactions: committed together, or aborted and sent again.

    A transaction is committed every ``commit_interval_s`` (or ``max_batch``
    orders). Its orders are counted delivered, and written to the record, only once
    it committed. When it aborts (a delivery failed, a broker went away, the
    producer was fenced before its commit), its orders go again in a new
    transaction on a new producer with the same transactional id, whose
    ``init_transactions`` fences the old one. The new producer also gets out of
    librdkafka's stuck-leader state (confluentinc/librdkafka#5430), which a
    transaction meets as its orders timing out (message.timeout.ms is at most
    transaction.timeout.ms) and so an abort. A transaction that could not commit
    and whose abort then failed, or whose commit was refused as fenced (the
    coordinator had expired it while this process was paused; no other process
    uses its id), is sent again the same way. A commit whose outcome cannot be
    known (any other fatal error once it started) is not sent again: DeliveryFailed
    says so.
    """

    def __init__(self, make: Callable[[], Producer], topic: str, tally: DeliveryTally, *,
                 stop: Callable[[], bool], commit_interval_s: float = COMMIT_INTERVAL_S,
                 max_batch: int = MAX_BATCH, give_up_s: float = GIVE_UP_S, stop_grace_s: float = FLUSH_TIMEOUT_S):
        self.tally = tally
        self._make = make
        self._topic = topic
        self._stop = stop
        self._interval = commit_interval_s
        self._max_batch = max_batch
        self._give_up_s = give_up_s
        self._stop_grace_s = stop_grace_s
        self._deadline = math.inf    # the open batch's: past it, retries end (DeliveryFailed)
        self._stop_seen = False
        self._watchdog = Watchdog()  # a librdkafka call that hangs past every deadline ends the process
        self._batch: list[tuple[bytes, bytes, dict]] = []
        self._acked: list[tuple[dict, int | None, int | None]] = []  # this transaction's delivery reports
        self._opened = 0.0
        self.producer, self._txn = self._start()

    # -- what produce_orders calls ---------------------------------------------------
    def send(self, key: bytes, value: bytes, order: dict) -> None:
        if not self._batch:
            self._open()
        self._batch.append((key, value, order))
        try:
            self._produce(key, value, order)
        except KafkaException as exc:  # produce refuses once the transaction failed
            self._resend_after(self._fail_produce, exc)

    def tick(self) -> None:
        if self._batch and (len(self._batch) >= self._max_batch
                            or time.monotonic() - self._opened >= self._interval):
            self.commit()

    def idle(self, seconds: float) -> None:
        self.producer.poll(min(seconds, self._interval))
        self.tick()

    def finish(self, timeout_s: float) -> int:
        self._deadline = min(self._deadline, time.monotonic() + timeout_s)
        self.commit()
        return 0

    def commit(self) -> None:
        """Commit the open transaction; an aborted one is sent again until it commits or time is up."""
        while self._batch:
            try:
                self._txn.commit([], None)
            # Not committed: aborted; or it could not commit and its abort failed; or fenced, which
            # for this process's own id means the coordinator expired it (see Fenced).
            except (TransactionAborted, AbortFailed, Fenced) as exc:
                self._resend_after(lambda e: None, exc)
                continue
            except (FatalWorkerError, StopRequested) as exc:
                raise DeliveryFailed(f"the commit of {len(self._batch)} orders did not finish ({exc}): "
                                     "they may or may not be on the topic") from exc
            self._committed()

    # -- internals -------------------------------------------------------------------
    def _start(self) -> tuple[Producer, KafkaTransaction]:
        producer = self._make()
        txn = KafkaTransaction(producer, stop=self._gave_up, watchdog=self._watchdog,
                               watchdog_s=self._give_up_s + FLUSH_TIMEOUT_S)
        try:
            txn.init()
        except StopRequested as exc:
            raise DeliveryFailed(f"no transactional producer in time: {exc}") from exc
        return producer, txn

    def _open(self) -> None:
        self._opened = time.monotonic()
        self._deadline = self._opened + self._give_up_s
        if self._stop_seen:
            self._deadline = min(self._deadline, self._opened + self._stop_grace_s)
        self._txn.begin()

    def _produce(self, key: bytes, value: bytes, order: dict) -> None:
        # No delivery callback unless deliveries are recorded: the commit says they all arrived.
        produce_one(self.producer, self._topic, key, value,
                    self._record(order) if self.tally.record is not None else None)
        self.producer.poll(0)

    def _record(self, order: dict) -> Callable[[KafkaError | None, Message], None]:
        acked = self._acked  # this transaction's list: reports of an aborted one land in a dropped list

        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            if err is None:
                acked.append((order, msg.partition(), msg.offset()))
        return on_delivery

    def _fail_produce(self, exc: BaseException) -> None:
        assert isinstance(exc, KafkaException)
        self._txn.produce_failed(exc)

    def _resend_after(self, fail: Callable[[BaseException], None], exc: BaseException) -> None:
        """The open transaction failed (``fail(exc)`` aborts it, or says it is fatal): send its orders again."""
        reason: BaseException = exc
        with contextlib.suppress(TransactionAborted, FatalWorkerError):
            fail(exc)
        while True:
            if self._gave_up():
                raise DeliveryFailed(f"{len(self._batch)} orders not committed in {self._give_up_s:.0f} s "
                                     f"or by the stop's deadline: {reason}") from exc
            log.warning("transaction failed orders=%d action=resend_on_new_producer reason=%s",
                        len(self._batch), reason)
            self._replace()
            try:
                self._txn.begin()
                for key, value, order in self._batch:
                    self._produce(key, value, order)
                return
            except KafkaException as again:
                reason = again
                with contextlib.suppress(TransactionAborted, FatalWorkerError):
                    self._txn.produce_failed(again)
            except FatalWorkerError as again:
                reason = again

    def _replace(self) -> None:
        old = self.producer
        with contextlib.suppress(KafkaException):  # a failed producer may refuse even this
            old.purge(in_queue=True, in_flight=True)
            old.poll(0)
        self._acked = []
        self.producer, self._txn = self._start()  # same transactional id: fences the old producer

    def _committed(self) -> None:
        self.tally.delivered += len(self._batch)
        record = self.tally.record
        if record is not None:
            record.write("".join(json.dumps({**order, "partition": partition, "offset": offset}) + "\n"
                                 for order, partition, offset in self._acked))
        self._batch, self._acked = [], []
        self._deadline = math.inf

    def _gave_up(self) -> bool:
        """Time is up for the open batch: GIVE_UP_S, or the grace a stop request leaves."""
        now = time.monotonic()
        if not self._stop_seen and self._stop():
            self._stop_seen = True
            self._deadline = min(self._deadline, now + self._stop_grace_s)
        return now > self._deadline


CHECK_EVERY = 1024  # unpaced orders between looks at stop(), the sender's housekeeping and the progress bar


def produce_orders(sender: Sender, serde: OrderSerde, *, count: int, rate: float, seed: int | None,
                   stop: Callable[[], bool], on_progress: Callable[[int], None] = lambda n: None) -> int:
    """Produce ``count`` orders (0: until ``stop()``); returns how many were handed to the sender.

    Unpaced (``rate`` 0), the stop flag, the sender's housekeeping and the progress
    bar are looked at every CHECK_EVERY orders (a few milliseconds), not per order:
    per order they cost more than encoding it. Orders the sender could not deliver
    are counted in its tally's ``failed``, with the reason in its ``errors``.
    """
    tally = sender.tally
    limiter = RateLimiter(rate, stop)
    every = 1 if rate > 0 else CHECK_EVERY
    encode = serde.encode
    send = sender.send
    sent = unreported = 0
    try:
        for order in random_orders(seed):
            if count and sent >= count:
                break
            if sent % every == 0:
                if stop():
                    break
                sender.tick()
                if unreported:
                    on_progress(unreported)
                    unreported = 0
                if rate > 0:
                    limiter.wait(sender.idle)
                    if stop():
                        break
            send(order["orderId"].encode(), encode(order), order)
            sent += 1
            unreported += 1
            if sent % 100000 == 0:
                log.info("produced sent=%d delivered=%d failed=%d", sent, tally.delivered, tally.failed)
        if unreported:
            on_progress(unreported)
        remaining = sender.finish(FLUSH_TIMEOUT_S)
        if remaining:
            log.error("flush timed out undelivered=%d", remaining)
    except (DeliveryFailed, FatalWorkerError, StopRequested) as exc:
        log.error("produce failed undelivered=%d reason=%s", sent - tally.delivered - tally.failed, exc)
        tally.failed = sent - tally.delivered
        tally.errors.append(str(exc))
    return sent
