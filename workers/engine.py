"""The batch loop shared by the partition worker and the retry worker.

Exactly-once, without a distributed transaction between Kafka and Redis:

* Redis holds, per source partition, the offset up to which orders are
  *counted* (R). The Lua script only counts messages at or past R, so applying
  a batch twice counts it once.
* Kafka holds, per source partition, the committed offset of the worker's group
  (K), written in the same Kafka transaction as the batch's retry and DLQ
  messages. Messages below K have had their retry/DLQ messages published.
* A batch is applied to Redis first; its retry/DLQ messages then join the open
  transaction, which commits (with the offsets) every TRANSACTION_INTERVAL_S, as
  Kafka Streams does under exactly-once. A crash before the commit leaves
  R > K: the restarted worker starts at min(R, K), re-decides those messages
  (decisions are deterministic), publishes their side effects again (the first
  transaction never committed) and Redis skips the counting. A crash before
  Redis leaves R = K: plain replay.
* If Redis loses a source's state (flushed, restored from an old file), the
  worker notices (state missing where it expected some) and rebuilds it by
  re-reading the source from the start: Redis counts, side effects below K are
  not repeated.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Message, Producer, TopicPartition

from .clients import wait_for
from .latency import LatencyHistogram
from .envelope import REPLAY_OF, Provenance, dead_letter_headers, retry_headers
from .errors import OrderError, OrdersError, PermanentError, ServiceUnavailable, TransientError
from .processing import Downstream, backoff_ms, price_cents, validate
from .serde import OrderSerde
from .settings import Settings
from .store import DEAD, RETRIED, STATE_BEHIND, STATE_LOST, AggregateStore, Source, SourceBatch

log = logging.getLogger(__name__)

TOUCH_INTERVAL_S = 2.0      # heartbeat + "is my Redis state still there?" check
COMMIT_INTERVAL_S = 5.0     # commit progress of batches that had no side effects
TRANSACTION_INTERVAL_S = 0.2  # an open transaction (with retry/DLQ messages) commits this often
KAFKA_TIMEOUT_S = 15.0
# librdkafka's send_offsets_to_transaction can block forever, past its timeout,
# when the group coordinator went away (librdkafka issues 5456 and 5511, seen here
# on a broker restart). A transaction that outlives this ends the process; the
# supervisor restarts it and the protocol above makes the restart safe.
TRANSACTION_WATCHDOG_S = 45.0
EXIT_STUCK = 3


class FatalWorkerError(OrdersError):
    """The worker cannot go on (fenced, fatal Kafka error); supervisor restarts it."""


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class OutMessage:
    """A retry or dead-letter message to publish in the batch's transaction."""

    source: Source
    topic: str
    key: bytes | None
    value: bytes | None
    headers: list
    kind: int  # store.DEAD or store.RETRIED


@dataclass
class BatchPlan:
    """What handling a batch decided: counts per source and messages to publish."""

    batches: dict[Source, SourceBatch] = field(default_factory=dict)
    out: list[OutMessage] = field(default_factory=list)
    timestamps_ms: list[int] = field(default_factory=list)  # of counted messages, for latency

    def batch_for(self, source: Source, known_offset: int | None) -> SourceBatch:
        batch = self.batches.get(source)
        if batch is None:
            batch = self.batches[source] = SourceBatch(source, to_offset=-1, known_offset=known_offset)
        return batch


class Decider:
    """Decides the fate of one attempt at one order: counted, retried or dead-lettered."""

    def __init__(self, settings: Settings, serde: OrderSerde, downstream: Downstream):
        self._settings = settings
        self._serde = serde
        self._downstream = downstream

    def attempt(self, msg: Message, attempt: int, provenance: Provenance | None) -> tuple[int | None, OutMessage | None, dict | None]:
        """Returns (cents, None, order) when counted, or (None, message to publish, order or None)."""
        order = None
        try:
            order = self._serde.decode(msg.value())
            validate(order, max_price=self._settings.max_price)
            self._downstream.handle(order, attempt)
            return price_cents(order), None, order
        except PermanentError as exc:
            return None, self.dead_letter(msg, exc, attempt, provenance), order
        except TransientError as exc:
            if attempt >= self._settings.max_attempts:
                return None, self.dead_letter(msg, exc, attempt, provenance), order
            return None, self._retry(msg, exc, attempt + 1, provenance), order

    def _origin(self, msg: Message, provenance: Provenance | None) -> Provenance:
        if provenance is not None:
            return provenance
        return Provenance(msg.topic(), msg.partition(), msg.offset(), msg.timestamp()[1], now_ms(),
                          replay_of=replay_of(msg))

    def _retry(self, msg: Message, exc: OrderError, next_attempt: int, provenance: Provenance | None) -> OutMessage:
        delay = backoff_ms(next_attempt - 1, self._settings.retry_backoff_ms, self._settings.retry_backoff_multiplier)
        origin = self._origin(msg, provenance)
        headers = retry_headers(origin, attempt=next_attempt, due_at_ms=now_ms() + delay,
                                error_type=exc.error_type, error_message=str(exc))
        log.info("retry scheduled topic=%s partition=%d offset=%d key=%s attempt=%d delay_ms=%d error=%s",
                 msg.topic(), msg.partition(), msg.offset(), message_key(msg), next_attempt, delay, exc.error_type)
        return OutMessage(Source(msg.topic(), msg.partition()), self._settings.retry_topic, msg.key(), msg.value(),
                          headers, RETRIED)

    def dead_letter(self, msg: Message, exc: OrderError, attempts: int, provenance: Provenance | None = None) -> OutMessage:
        origin = self._origin(msg, provenance)
        headers = dead_letter_headers(origin, attempts=attempts, error_type=exc.error_type,
                                      error_message=str(exc), dead_lettered_at_ms=now_ms())
        log.info("dead letter topic=%s partition=%d offset=%d key=%s attempts=%d error_type=%s error=%r",
                 msg.topic(), msg.partition(), msg.offset(), message_key(msg), attempts, exc.error_type, str(exc))
        return OutMessage(Source(msg.topic(), msg.partition()), self._settings.dlq_topic, msg.key(), msg.value(),
                          headers, DEAD)



def replay_of(msg: Message) -> str | None:
    """The dead letter a message on ``orders`` replays (its REPLAY_OF header), if any."""
    for name, value in msg.headers() or ():
        if name == REPLAY_OF and value:
            return value.decode("utf-8", "replace")
    return None


def message_key(msg: Message) -> str:
    key = msg.key()
    return key.decode("utf-8", "replace") if key is not None else "-"


def _transaction_call(call: Callable[[], None], what: str) -> None:
    """Run a transaction API call: fatal errors end the worker, others mean Kafka is unavailable."""
    try:
        call()
    except KafkaException as exc:
        err = exc.args[0]
        if err.fatal():
            raise FatalWorkerError(f"{what} failed fatally: {err.str()}") from exc
        raise ServiceUnavailable(f"kafka: {err.str()}") from exc


class Watchdog:
    """Ends the process (exit code 3) if an armed section runs past its deadline.

    For library calls that can hang without honouring their timeout; a restart is
    safe, a silent hang is not. One daemon thread, started on first use.
    """

    def __init__(self):
        self._deadline: float | None = None
        self._what = ""
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def armed(self, what: str, seconds: float):
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="watchdog", daemon=True)
            self._thread.start()
        self._what, self._deadline = what, time.monotonic() + seconds
        try:
            yield
        finally:
            self._deadline = None

    def _watch(self) -> None:
        while True:
            time.sleep(1.0)
            deadline = self._deadline
            if deadline is not None and time.monotonic() > deadline:
                log.critical("stuck in %s for longer than its deadline: exiting so that the supervisor "
                             "restarts this worker", self._what)
                logging.shutdown()
                os._exit(EXIT_STUCK)


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop checks it between short polls."""

    def __init__(self):
        self.stopping = False

    def install(self) -> "StopFlag":
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.stopping = True

    def __call__(self) -> bool:
        return self.stopping


class BatchWorker:
    """Consumes its sources in batches and applies the exactly-once protocol above.

    Subclasses say which sources they own (``sources``) and turn consumed
    messages into a ``BatchPlan`` (``plan``); ``poll`` may be overridden.
    """

    name = "worker"

    def __init__(self, settings: Settings, *, consumer: Consumer, producer: Producer,
                 store: AggregateStore, serde: OrderSerde, stop: Callable[[], bool], manager: str = "none"):
        self.settings = settings
        self.manager = manager  # supervisor, honcho or none: shown by `orders status`
        self.consumer = consumer
        self.producer = producer
        self.store = store
        self.serde = serde
        self.stop = stop
        self.decider = Decider(settings, serde, Downstream(settings.failure_rate))
        self.sources: list[Source] = []
        self.committed: dict[Source, int | None] = {}   # K: side effects published below this
        self.position: dict[Source, int | None] = {}    # next offset to handle
        self.known: dict[Source, int | None] = {}      # R as last seen in Redis
        self._last_touch = 0.0
        self._last_commit = time.monotonic()
        self._counted_since_log = 0
        self._batches_since_log = 0
        self._last_log = time.monotonic()
        self._total = None
        self.latency = LatencyHistogram()
        self.watchdog = Watchdog()
        self._txn_started: float | None = None  # monotonic time the open transaction began

    # -- hooks ---------------------------------------------------------------------
    def plan(self, messages: Sequence[Message]) -> BatchPlan:
        raise NotImplementedError

    def poll(self) -> list[Message]:
        return self.fetch(self.settings.poll_timeout_s)

    def fetch(self, timeout: float) -> list[Message]:
        """Up to batch_size messages, returning as soon as one is there.

        ``consume(n, timeout)`` alone waits for n messages or the whole timeout,
        which adds that timeout to every order's latency at low rates; instead wait
        for the first message, then take whatever else is already fetched.
        """
        first = self.consumer.poll(timeout)
        if first is None:
            return []
        return [first, *self.consumer.consume(num_messages=self.settings.batch_size - 1, timeout=0)]

    def on_reassign(self) -> None:
        """Called after the consumer was re-assigned (rewind): drop buffered messages."""

    # -- lifecycle -------------------------------------------------------------------
    def run(self) -> None:
        """Run until asked to stop; raises FatalWorkerError or ServiceUnavailable (if stopped while waiting)."""
        self.start()
        try:
            while not self.stop():
                messages = self.poll()
                messages = self._drop_errors(messages)
                if messages:
                    plan = self.plan(messages)
                    if plan.batches or plan.out:
                        self.checkpoint(plan)
                self._housekeeping()
        finally:
            self.shutdown()

    def start(self) -> None:
        wait_for(lambda: self._init_transactions(), "kafka transactions", should_stop=self.stop)
        stored = wait_for(lambda: self.store.positions(self.sources), "redis", should_stop=self.stop)
        committed = wait_for(self._committed_offsets, "kafka committed offsets", should_stop=self.stop)
        for source in self.sources:
            r, k = stored[source], committed[source]
            self.committed[source] = k
            self.known[source] = r
            self.position[source] = self._resume_at(source)
            log.info("start worker=%s source=%s counted_to=%s committed_to=%s resume_at=%s",
                     self.name, source, r, k, self.position[source] if self.position[source] is not None else "beginning")
        self._assign()

    def _resume_at(self, source: Source) -> int | None:
        """Where to (re)start a source: min(R, K); None (the log start) if either is unknown."""
        r, k = self.known.get(source), self.committed.get(source)
        return None if r is None or k is None else min(r, k)

    def _init_transactions(self) -> None:
        _transaction_call(lambda: self.producer.init_transactions(KAFKA_TIMEOUT_S), "init_transactions")

    def _committed_offsets(self) -> dict[Source, int | None]:
        tps = [TopicPartition(s.topic, s.partition) for s in self.sources]
        try:
            result = self.consumer.committed(tps, timeout=10)
        except KafkaException as exc:
            raise ServiceUnavailable(f"kafka: {exc.args[0].str()}") from exc
        return {Source(tp.topic, tp.partition): (tp.offset if tp.offset >= 0 else None) for tp in result}

    def _assign(self) -> None:
        tps = [TopicPartition(s.topic, s.partition, self.position[s] if self.position[s] is not None else OFFSET_BEGINNING)
               for s in self.sources]
        self.consumer.assign(tps)
        self.on_reassign()

    def shutdown(self) -> None:
        """Record progress if Kafka lets us, then close: well inside stopwaitsecs."""
        try:
            self._commit()
        except (OrdersError, KafkaException) as exc:
            log.warning("final commit skipped worker=%s reason=%s", self.name, exc)
        finally:
            self.consumer.close()
            log.info("stopped worker=%s", self.name)

    # -- the protocol ----------------------------------------------------------------
    def needs_side_effects(self, source: Source, offset: int) -> bool:
        committed = self.committed.get(source)
        return committed is None or offset >= committed

    def checkpoint(self, plan: BatchPlan) -> None:
        """Apply the plan to Redis, then add its messages to the open Kafka transaction."""
        batches = [b for b in plan.batches.values() if b.to_offset >= 0]
        heartbeat = self._heartbeat()
        results = wait_for(lambda: self.store.apply(batches, worker=self.name, heartbeat=heartbeat, now_ms=now_ms()),
                           "redis", should_stop=self.stop)
        applied_at = now_ms()
        self.latency.record(applied_at - ts for ts in plan.timestamps_ms)
        self._counted_since_log += sum(r.counted for r in results)
        self._batches_since_log += 1
        if results:
            self._total = results[-1].total
        lost = {r.source for r in results if r.status == STATE_LOST}
        behind = {r.source: r.offset for r in results if r.status == STATE_BEHIND}
        if lost or behind:
            self._rebuild(lost, behind)
            return
        for batch, result in zip(batches, results):
            self.known[batch.source] = result.offset
            self.position[batch.source] = batch.to_offset
        if plan.out:
            self._publish(plan.out)
        self._maybe_commit()

    def _uncommitted(self) -> bool:
        return any(p is not None and p != self.committed.get(s) for s, p in self.position.items())

    def _publish(self, out: list[OutMessage]) -> None:
        """Produce retry/DLQ messages into the open transaction (opening one if needed)."""
        try:
            if self._txn_started is None:
                self.producer.begin_transaction()
                self._txn_started = time.monotonic()
            for m in out:
                self._produce(m)
        except KafkaException as exc:
            self._transaction_failed(exc)

    def _maybe_commit(self) -> None:
        # Like Kafka Streams' commit.interval.ms under exactly-once: one transaction
        # spans the batches of a short interval, so its round trips are not paid per batch.
        now = time.monotonic()
        if self._txn_started is not None:
            if now - self._txn_started >= TRANSACTION_INTERVAL_S:
                self._commit()
        elif self._uncommitted() and now - self._last_commit >= COMMIT_INTERVAL_S:
            self._commit()

    def _commit(self) -> None:
        """Commit the open transaction (or one with only offsets) with every position handled."""
        offsets = [TopicPartition(s.topic, s.partition, p) for s, p in self.position.items()
                   if p is not None and p != self.committed.get(s)]
        if self._txn_started is None and not offsets:
            return
        try:
            with self.watchdog.armed("kafka transaction", TRANSACTION_WATCHDOG_S):
                if self._txn_started is None:
                    self.producer.begin_transaction()
                if offsets:
                    self.producer.send_offsets_to_transaction(offsets, self.consumer.consumer_group_metadata(),
                                                              KAFKA_TIMEOUT_S)
                self.producer.commit_transaction(KAFKA_TIMEOUT_S)
        except KafkaException as exc:
            self._transaction_failed(exc)
            return
        self._txn_started = None
        for tp in offsets:
            self.committed[Source(tp.topic, tp.partition)] = tp.offset
        self._last_commit = time.monotonic()

    def _transaction_failed(self, exc: KafkaException) -> None:
        err = exc.args[0]
        if err.fatal():
            raise FatalWorkerError(f"transaction failed fatally: {err.str()}") from exc
        # Redis has counted what the transaction covered; replaying from K
        # re-publishes its messages and the offset guard skips the counting.
        log.warning("transaction failed worker=%s reason=%s action=abort_and_rewind", self.name, err.str())
        self._rewind()

    def _produce(self, m: OutMessage) -> None:
        while True:
            try:
                self.producer.produce(m.topic, value=m.value, key=m.key, headers=m.headers)
                break
            except BufferError:
                self.producer.poll(0.1)  # the local queue is full: let deliveries drain
        self.producer.poll(0)

    def _abort(self) -> None:
        """Abort the open transaction, if any: its messages never become visible."""
        if self._txn_started is None:
            return
        wait_for(lambda: _transaction_call(lambda: self.producer.abort_transaction(KAFKA_TIMEOUT_S), "abort"),
                 "kafka (abort transaction)", should_stop=self.stop)
        self._txn_started = None

    def _rewind(self, lost: set[Source] = frozenset(), behind: dict[Source, int] | None = None) -> None:
        """Abort, then re-read every source from min(R, K).

        Sources whose Redis state vanished (R unknown) restart from the log start;
        sources whose state went back restart from the stored R if earlier than K.
        """
        self._abort()
        for source in lost:
            self.known[source] = None
        for source, stored in (behind or {}).items():
            self.known[source] = stored
        for source in self.sources:
            self.position[source] = self._resume_at(source)
        log.info("rewind worker=%s positions=%s", self.name,
                 ",".join(f"{s}@{'start' if p is None else p}" for s, p in self.position.items()))
        self._assign()

    def _rebuild(self, lost: set[Source], behind: dict[Source, int] | None = None) -> None:
        for source in lost:
            log.warning("state lost worker=%s source=%s action=rebuild_from_log_start", self.name, source)
        for source, stored in (behind or {}).items():
            log.warning("state behind worker=%s source=%s known=%s stored=%s action=rewind",
                        self.name, source, self.known[source], stored)
        self._rewind(lost, behind)

    # -- housekeeping ----------------------------------------------------------------
    def _drop_errors(self, messages: list[Message]) -> list[Message]:
        good = []
        for msg in messages:
            err = msg.error()
            if err is None:
                good.append(msg)
            elif err.fatal():
                raise FatalWorkerError(f"consumer error: {err.str()}")
            else:
                log.warning("consumer error worker=%s code=%s reason=%s", self.name, err.name(), err.str())
        return good

    def _heartbeat(self) -> dict:
        return {"pid": os.getpid(), "manager": self.manager, "at_ms": now_ms(),
                "positions": {str(s): p for s, p in self.position.items()},
                "latency": self.latency.as_dict(), **self.heartbeat_extra()}

    def heartbeat_extra(self) -> dict:
        """More fields for the heartbeat (the retry worker adds its waiting messages)."""
        return {}

    def _housekeeping(self) -> None:
        now = time.monotonic()
        if now - self._last_touch >= TOUCH_INTERVAL_S:
            self._last_touch = now
            try:
                found = self.store.touch(self.sources, worker=self.name, heartbeat=self._heartbeat())
            except ServiceUnavailable as exc:
                log.warning("heartbeat failed worker=%s reason=%s", self.name, exc)
                found = {}
            lost = {s for s, ok in found.items() if not ok and self.known.get(s) is not None}
            if lost:
                self._rebuild(lost)
        self._maybe_commit()
        if now - self._last_log >= 1.0 and self._batches_since_log:
            self.log_progress(now - self._last_log)
            self._counted_since_log = 0
            self._batches_since_log = 0
            self._last_log = now

    def log_progress(self, interval_s: float) -> None:
        """One INFO line per second of activity: counted, rate, lag and the running average.

        (Per second, not per batch: at tens of thousands of orders/s a line per
        batch is more than a person can follow in ``supervisorctl tail -f``.)
        """
        total = self._total
        log.info("progress worker=%s batches=%d counted=%d rate_per_s=%.0f lag=%d positions=%s "
                 "global_count=%s global_average=%s",
                 self.name, self._batches_since_log, self._counted_since_log,
                 self._counted_since_log / interval_s, self._lag(),
                 ",".join(f"{s}@{p}" for s, p in self.position.items()),
                 total.count if total else "-", total.average if total else "-")

    def _lag(self) -> int:
        """Messages behind the log end, from the consumer's cached watermarks (no round trip)."""
        lag = 0
        for source, position in self.position.items():
            try:
                _, high = self.consumer.get_watermark_offsets(TopicPartition(source.topic, source.partition),
                                                              cached=True)
            except KafkaException:
                continue
            if high >= 0:
                lag += max(0, high - (position or 0))
        return lag
