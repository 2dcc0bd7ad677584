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
* Each offset is decided once. Below K the decision is in Kafka: the retry and
  DLQ topics name every offset they parked (workers/ledger.py), the rest were
  counted. Between K and R it is in Redis: the batch script keeps a record of
  each parked decision until K passes it, and a replay publishes that record
  again. Only offsets at or past both are decided (and sent downstream) anew.
  So a setting changed between runs never changes an outcome already given.
* If Redis loses a source's state (flushed, restored from an old file), the
  worker notices (state missing where it expected some, at once or within
  TOUCH_INTERVAL_S when idle) and rebuilds it from the log start by the rule
  above; if K is gone (expired, group deleted) the log of record stands in.
* The state is tied to the topics' ids (Redis) and the committed offsets carry
  their topic's id (Kafka): state of another incarnation of a topic (deleted
  and created again, a Kafka wiped under a kept Redis) is dropped and rebuilt.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Sequence, Set
from dataclasses import dataclass, field

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from . import oversize
from .clients import make_consumer, produce_one, wait_for
from .envelope import REPLAY_OF, Provenance, dead_letter_headers, header_dict, retry_headers
from .errors import (
    FatalWorkerError,
    OrderError,
    OrdersError,
    PermanentError,
    RecordedError,
    ServiceUnavailable,
    TransientError,
)
from .latency import LatencyHistogram
from .ledger import Published, published_decisions
from .logs import printable
from .processing import Downstream, price_cents, validate
from .serde import OrderSerde
from .settings import Settings
from .store import (
    DEAD,
    RESET,
    RETRIED,
    STATE_AHEAD,
    STATE_BEHIND,
    STATE_LOST,
    AggregateStore,
    Source,
    SourceBatch,
    Totals,
)
from .topics import describe_topics, existing_retry_topics, known_end_offsets
from .transaction import KafkaTransaction, TransactionAborted, Watchdog

log = logging.getLogger(__name__)

TOUCH_INTERVAL_S = 2.0      # heartbeat + "is my Redis state still there?" check
COMMIT_INTERVAL_S = 5.0     # commit progress of batches that had no side effects
TRANSACTION_INTERVAL_S = 0.2  # an open transaction (with retry/DLQ messages) commits this often
# How long a partition's end must stay below the counted position before the state is taken
# for another log's and rebuilt. Right after a leader moves, an end can be read low for a
# moment (the nemesis soak saw 3794 against a committed 3803, nothing truncated); a
# truncated log or another Kafka stays short.
PAST_END_CONFIRM_S = 10.0


# BatchWorker.prior: what is known of an offset's outcome before deciding it
NEW, PUBLISHED, COMMITTED, RECORDED, APPLIED = range(5)


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
    record: str = ""  # the decision, kept in Redis until K passes it (Decider.repeat reads it)
    error_type: str = ""  # why: counted per second in the progress line


@dataclass
class BatchPlan:
    """What handling a batch decided: counts per source and messages to publish."""

    batches: dict[Source, SourceBatch] = field(default_factory=dict)
    out: list[OutMessage] = field(default_factory=list)
    timestamps_ms: list[int] = field(default_factory=list)  # of counted messages, for latency
    due_ms: list[int] = field(default_factory=list)  # of the retries handled (retry worker), for lateness

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

    def attempt(self, msg: Message, attempt: int,
                provenance: Provenance | None) -> tuple[int | None, OutMessage | None, dict | None]:
        """Returns (cents, None, order) when counted, or (None, message to publish, order or None)."""
        order = None
        try:
            order = self._serde.decode(msg.value())
            validate(order, max_price=self._settings.max_price)
            self._downstream.handle(order, attempt,
                                    provenance.replay_of if provenance is not None else replay_of(msg))
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
        source = source_of(msg)
        return Provenance(source.topic, source.partition, offset_of(msg), msg.timestamp()[1], now_ms(),
                          replay_of=replay_of(msg))

    def _retry(self, msg: Message, exc: OrderError, next_attempt: int, provenance: Provenance | None) -> OutMessage:
        delay = self._settings.retry_delay_ms(next_attempt - 1)
        topic = self._settings.retry_topic_for(next_attempt - 1)
        origin = self._origin(msg, provenance)
        headers = retry_headers(origin, parked_from=coordinates(msg), attempt=next_attempt,
                                due_at_ms=now_ms() + delay, error_type=exc.error_type, error_message=str(exc))
        if not oversize.fits(self._settings, msg.key(), msg.value(), headers, topic=topic):
            return self.dead_letter(msg, exc, next_attempt - 1, provenance)  # it could never be retried
        if log.isEnabledFor(logging.DEBUG):  # one per retried order: the progress line counts them
            log.debug("retry scheduled topic=%s partition=%d offset=%d key=%s attempt=%d delay_ms=%d error=%s",
                      msg.topic(), msg.partition(), msg.offset(), message_key(msg), next_attempt, delay,
                      exc.error_type)
        return OutMessage(source_of(msg), topic, msg.key(), msg.value(),
                          headers, RETRIED, decision_record(RETRIED, next_attempt, exc), exc.error_type)

    def dead_letter(self, msg: Message, exc: OrderError, attempts: int,
                    provenance: Provenance | None = None) -> OutMessage:
        origin = self._origin(msg, provenance)
        headers = dead_letter_headers(origin, parked_from=coordinates(msg), attempts=attempts,
                                      error_type=exc.error_type, error_message=str(exc), dead_lettered_at_ms=now_ms())
        key, value, headers = oversize.fit(self._settings, msg.key(), msg.value(), headers, where=coordinates(msg),
                                           topic=self._settings.dlq_topic)
        log.info("dead letter topic=%s partition=%d offset=%d key=%s attempts=%d error_type=%s error=%r",
                 msg.topic(), msg.partition(), msg.offset(), message_key(msg), attempts, exc.error_type, str(exc))
        return OutMessage(source_of(msg), self._settings.dlq_topic, key, value,
                          headers, DEAD, decision_record(DEAD, attempts, exc), exc.error_type)

    def repeat(self, msg: Message, record: str, provenance: Provenance | None) -> OutMessage:
        """The retry or dead letter a kept decision record says to publish (the downstream is not called)."""
        kind, attempts, error_type, error_message = json.loads(record)
        exc = RecordedError(error_type, error_message)
        if kind == RETRIED:
            return self._retry(msg, exc, attempts, provenance)
        return self.dead_letter(msg, exc, attempts, provenance)


def decision_record(kind: int, attempts: int, exc: OrderError) -> str:
    """What Redis keeps of a parked decision until Kafka has it: enough to publish it again."""
    return json.dumps([kind, attempts, exc.error_type, str(exc)[:500]])


def coordinates(msg: Message) -> str:
    return f"{msg.topic()}:{msg.partition()}:{msg.offset()}"


def source_of(msg: Message) -> Source:
    """The partition a consumed message came from (always set on a consumed message)."""
    topic, partition = msg.topic(), msg.partition()
    assert topic is not None and partition is not None
    return Source(topic, partition)


def offset_of(msg: Message) -> int:
    offset = msg.offset()
    assert offset is not None
    return offset


def replay_of(msg: Message) -> str | None:
    """The dead letter a message on ``orders`` replays (its REPLAY_OF header), if any."""
    headers = msg.headers()
    return (header_dict(headers).get(REPLAY_OF) or None) if headers else None  # most have none


def message_key(msg: Message) -> str:
    """The key for a log line: decoded, with control characters escaped (it is untrusted)."""
    key = msg.key()
    return printable(key.decode("utf-8", "replace")) if key is not None else "-"


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop checks it between short polls."""

    def __init__(self):
        self.stopping = False

    def install(self) -> StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.stopping = True

    def __call__(self) -> bool:
        return self.stopping


class BatchWorker:
    """Consumes its sources in batches and applies the exactly-once protocol above.

    Subclasses say which sources they own, either fixed (``sources``, explicit
    assignment) or as a member of a consumer group (``subscription``: Kafka's group
    coordinator assigns partitions of that topic, and they come and go), and turn
    consumed messages into a ``BatchPlan`` (``plan``); ``poll`` may be overridden.
    """

    name = "worker"
    role = "consumer"  # or "retry": shown by `orders status`
    subscription: list[str] | None = None  # topics: own what the consumer group assigns of them

    def __init__(self, settings: Settings, *, consumer: Consumer, producer: Producer, admin: AdminClient,
                 store: AggregateStore, serde: OrderSerde, stop: Callable[[], bool], manager: str = "none"):
        self.settings = settings
        self.admin = admin
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
        self.records: dict[Source, dict[int, str]] = {}  # parked decisions between K and R, from Redis
        self.published: Published = {}  # parked offsets below K, from Kafka (only while a replay needs them)
        self._published_end: dict[Source, int] = {}  # one past the highest offset in published
        self.topic_ids: dict[str, str] = {}
        self._partitions: dict[str, int] = {}  # of the orders and retry topics: which keys the state has
        self._offsets_refresh_at = time.monotonic() + settings.offsets_refresh_s
        self._released = False  # partitions were revoked or lost during the current poll
        self._past_end_since: float | None = None  # when the state was first seen past a partition's end
        self._last_touch = 0.0
        self._aborts_recorded = 0  # of txn.aborts, added to the worker's counter in Redis
        self._last_commit = time.monotonic()
        self._counted_since_log = 0
        self._batches_since_log = 0
        self._parked_since_log: Counter[tuple[int, str]] = Counter()  # (DEAD or RETRIED, error type)
        self._last_log = time.monotonic()
        self.latency = LatencyHistogram()
        self.watchdog = Watchdog()
        self.txn = KafkaTransaction(producer, stop=stop, watchdog=self.watchdog)

    # -- hooks ---------------------------------------------------------------------
    def plan(self, messages: Sequence[Message]) -> BatchPlan:
        raise NotImplementedError

    def poll(self) -> list[Message]:
        return self.fetch(self.settings.poll_timeout_s)

    @classmethod
    def consumer_overrides(cls, settings: Settings) -> dict:
        """librdkafka settings of this kind of worker's consumer, beyond clients.consumer_conf."""
        return {}

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

    def on_released(self, sources: Set[Source]) -> None:
        """Called after ``sources`` were revoked or lost: drop what is kept for them."""

    def on_applied(self, plan: BatchPlan, applied_at_ms: int) -> None:
        """Called once a plan is applied in Redis (before its messages are published)."""

    # -- lifecycle -------------------------------------------------------------------
    def run(self) -> None:
        """Run until asked to stop; raises FatalWorkerError or ServiceUnavailable (if stopped while waiting)."""
        self.start()
        try:
            while not self.stop():
                self._released = False
                messages = self.poll()
                messages = self._drop_errors(messages)
                if self._released:
                    # A revoke inside this poll: drop what it returned of partitions no longer ours.
                    messages = [m for m in messages if source_of(m) in self.position]
                if messages:
                    plan = self.plan(messages)
                    if plan.batches or plan.out:
                        self.checkpoint(plan)
                self._housekeeping()
        finally:
            self.shutdown()

    def start(self) -> None:
        wait_for(lambda: self._init_transactions(), "kafka transactions", should_stop=self.stop)
        if self.subscription is not None:
            self.subscribe(self.subscription)
            return
        sources = self.sources
        wait_for(lambda: self._load_state(sources), "kafka and redis", should_stop=self.stop)
        self._log_start(sources)
        self._assign()

    def subscribe(self, topics: list[str]) -> None:
        """Join (or change what we ask of) the consumer group; state is loaded per partition
        as the group assigns it (_on_assign)."""
        self.subscription = topics
        if not topics:  # RETRY_MAX=0: no retry topic (librdkafka refuses an empty subscription)
            log.info("nothing to consume yet worker=%s", self.name)
            return
        self.consumer.subscribe(topics, on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost)
        log.info("joined the consumer group worker=%s topics=%s", self.name, ",".join(topics))

    def _log_start(self, sources: Sequence[Source]) -> None:
        for source in sources:
            position = self.position[source]
            log.info("start worker=%s source=%s counted_to=%s committed_to=%s resume_at=%s",
                     self.name, source, self.known[source], self.committed[source],
                     position if position is not None else "beginning")

    # -- consumer-group membership (KIP-848) ----------------------------------------
    # The callbacks run inside poll(). Under the consumer protocol the lists hold
    # only the partitions that change; the client (un)assigns them after the
    # callback unless the callback did (on_assign does, with the resume offsets).
    # Nothing here calls this consumer's poll, consume or list_topics: confluent-kafka
    # keeps one callback state per client and thread, a nested call clears it, and
    # the next callback of the same poll then aborts the process (metadata and end
    # offsets come from the admin client instead; test_rebalance_callbacks.py).
    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        new = [Source(tp.topic, tp.partition) for tp in partitions]
        new = [s for s in new if s not in self.position]
        if not new:
            return
        wait_for(lambda: self._load_state(new), "kafka and redis", should_stop=self.stop)
        self.sources = [*self.sources, *new]
        self._log_start(new)
        consumer.incremental_assign([self._start_at(s) for s in new])
        self.on_assigned(new)

    def on_assigned(self, sources: Sequence[Source]) -> None:
        """Called after the group assigned ``sources`` (their state is loaded)."""

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        gone = {Source(tp.topic, tp.partition) for tp in partitions} & set(self.sources)
        if not gone:
            return
        # The partitions are still ours until this returns: commit everything owned
        # (one transaction spans all of them, as Kafka Streams does under EOS), so the
        # next owner starts exactly at K with every side effect published.
        self._commit()
        self._release(gone)
        log.info("partitions revoked worker=%s sources=%s", self.name, ",".join(sorted(map(str, gone))))

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        gone = {Source(tp.topic, tp.partition) for tp in partitions} & set(self.sources)
        if not gone:
            return
        # Another member may own them already: commit nothing, abort what is open.
        # The abort drops the other partitions' uncommitted output too: rewind them.
        log.warning("partitions lost worker=%s sources=%s action=abort_and_rewind_the_rest", self.name,
                    ",".join(sorted(map(str, gone))))
        self._abort()
        self._release(gone)
        if self.sources:
            self._rewind()

    def _release(self, gone: Set[Source]) -> None:
        self._released = True
        self.sources = [s for s in self.sources if s not in gone]
        kept: list[dict] = [self.position, self.known, self.committed, self.records, self.published,
                            self._published_end]
        for table in kept:
            for source in gone:
                table.pop(source, None)
        self.on_released(gone)

    def _start_at(self, source: Source) -> TopicPartition:
        position = self.position[source]
        return TopicPartition(source.topic, source.partition, position if position is not None else OFFSET_BEGINNING)

    def _load_state(self, sources: Sequence[Source]) -> None:
        """R and the kept records from Redis, K from Kafka, both checked against today's topics."""
        self._describe_topics(sources)
        # R before the ends: the partitions' last owner may still be counting (a zombie until it is
        # fenced, or a hand-over in progress), so an R read after the ends can be past them.
        stored = self.store.positions(sources)
        ends = self._end_offsets(sources)
        past_end = {s: r for s, r in stored.items() if r is not None and r > ends[s]}
        if not past_end:
            self._past_end_since = None
        elif self._confirming_past_end():
            raise ServiceUnavailable("kafka: partition ends below the counted positions (read again before a "
                                     "rebuild): " + ",".join(f"{s}@{ends[s]}<{r}" for s, r in past_end.items()))
        else:
            # Counted past what the partition holds: the state counts other data
            # (a truncated log, or a Redis that counted another Kafka).
            log.warning("state past the end of its partition worker=%s sources=%s ends=%s action=rebuild_all",
                        self.name, ",".join(f"{s}@{r}" for s, r in past_end.items()),
                        ",".join(f"{s}@{ends[s]}" for s in past_end))
            self._ensure_identity(force=True)
        committed = self._committed_offsets(sources, ends)
        stored, records = self.store.state(sources)  # R and its records at one instant
        self.records.update(records)
        for source in sources:
            self.known[source], self.committed[source] = stored[source], committed[source]
        self._resume(sources)

    def _confirming_past_end(self) -> bool:
        """Whether state seen past a partition's end is still to be read again (for PAST_END_CONFIRM_S
        after first seeing it; ``wait_for`` reads again meanwhile) before it is taken for another log's."""
        now = time.monotonic()
        if self._past_end_since is None:
            self._past_end_since = now
        if now - self._past_end_since < PAST_END_CONFIRM_S:
            return True
        self._past_end_since = None
        return False

    def _describe_topics(self, sources: Sequence[Source]) -> None:
        """Learn the topics' ids and partition counts, and tie Redis's state to them."""
        # Every retry topic, not only today's levels: a source's state is tied to all the topics
        # it may have published to (store.ensure_identity).
        names = [self.settings.orders_topic, *existing_retry_topics(self.admin, self.settings),
                 self.settings.dlq_topic]
        names += sorted({s.topic for s in sources} - set(names))
        described = describe_topics(self.admin, names, timeout=10)
        self.topic_ids = {name: str(d.topic_id) for name, d in described.items()}
        self._partitions = {name: len(d.partitions) for name, d in described.items() if name != self.settings.dlq_topic}
        self._ensure_identity(force=False)

    def _end_offsets(self, sources: Sequence[Source]) -> dict[Source, int]:
        found = known_end_offsets(self.admin, [TopicPartition(s.topic, s.partition) for s in sources])
        return dict(zip(sources, found, strict=True))

    def _ensure_identity(self, force: bool) -> None:
        status, stored = self.store.ensure_identity(self.topic_ids, partitions=self._partitions, force=force,
                                                    claims=(self.settings.orders_topic, self.settings.dlq_topic))
        if status == RESET and not force:
            log.warning("state belongs to another incarnation of the topics worker=%s stored_ids=%s "
                        "current_ids=%s action=rebuild_all", self.name,
                        ",".join(f"{k}={v}" for k, v in sorted(stored.items())),
                        ",".join(f"{k}={v}" for k, v in sorted(self.topic_ids.items())))

    def _resume(self, sources: Sequence[Source]) -> None:
        """Set the sources' positions; read the log of record where a replay goes below K."""
        need = [s for s in sources if self._needs_ledger(s)]
        published = published_decisions(
            lambda: make_consumer(self.settings, self.settings.group_id(f"{self.name}-ledger")),
            self.admin, self.settings, need) if need else {}
        for source in sources:
            self.published.pop(source, None)
            self._published_end.pop(source, None)
        for source, offsets in published.items():
            self.published[source] = offsets
            self._published_end[source] = max(offsets, default=-1) + 1
        for source in sources:
            self.position[source] = self._resume_at(source)

    def fresh_from(self, source: Source) -> int:
        """The offset from which nothing was decided before: ``prior`` would answer NEW."""
        return max(self.committed.get(source) or 0, self.known.get(source) or 0,
                   self._published_end.get(source, 0))

    def _needs_ledger(self, source: Source) -> bool:
        r, k = self.known.get(source), self.committed.get(source)
        return r is None or k is None or r < k

    def _resume_at(self, source: Source) -> int | None:
        """Where to (re)start a source: min(R, K); the log start (None) without R.

        Without K, from R or from the first kept record that Kafka does not have.
        """
        r, k = self.known.get(source), self.committed.get(source)
        if r is None:
            return None
        if k is None:
            published = self.published.get(source, {})
            return min([r, *(o for o in self.records.get(source, {}) if o not in published)])
        return min(r, k)

    def prior(self, source: Source, offset: int) -> tuple[int, int | str | None]:
        """What was already decided about an offset: (NEW, None) if nothing.

        (PUBLISHED, DEAD/RETRIED): parked, and Kafka has it. (COMMITTED, None):
        counted before K; count it again without deciding (Redis lost it).
        (RECORDED, record): parked after K, publish the record again.
        (APPLIED, None): counted in Redis already.
        """
        published = self.published.get(source)
        if published is not None and offset in published:
            return PUBLISHED, published[offset]
        k = self.committed.get(source)
        if k is not None and offset < k:
            return COMMITTED, None
        r = self.known.get(source)
        if r is not None and offset < r:
            record = self.records.get(source, {}).get(offset)
            return (RECORDED, record) if record is not None else (APPLIED, None)
        return NEW, None

    def _init_transactions(self) -> None:
        self.txn.init()

    def _committed_offsets(self, sources: Sequence[Source], ends: dict[Source, int]) -> dict[Source, int | None]:
        """K per source; None where missing, or written for another incarnation of the topic."""
        tps = [TopicPartition(s.topic, s.partition) for s in sources]
        try:
            result = self.consumer.committed(tps, timeout=10)
        except KafkaException as exc:
            raise ServiceUnavailable(f"kafka: {exc.args[0].str()}") from exc
        committed: dict[Source, int | None] = {}
        for tp in result:
            source = Source(tp.topic, tp.partition)
            valid = tp.offset >= 0 and tp.offset <= ends[source] and tp.metadata in (None, "", self.topic_ids[tp.topic])
            if tp.offset >= 0 and not valid:
                log.warning("committed offset not for this topic worker=%s source=%s offset=%d topic_id=%s "
                            "current_topic_id=%s end=%d action=ignore", self.name, source, tp.offset, tp.metadata,
                            self.topic_ids[tp.topic], ends[source])
            committed[source] = tp.offset if valid else None
        return committed

    def _assign(self) -> None:
        """Start (again) at every source's position: assign, or seek what the group assigned."""
        if self.subscription is None:
            self.consumer.assign([self._start_at(s) for s in self.sources])
        else:
            for source in self.sources:
                try:
                    self.consumer.seek(self._start_at(source))
                except KafkaException as exc:
                    raise FatalWorkerError(f"cannot rewind {source}: {exc.args[0].str()}") from exc
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
    def settle(self, batch: SourceBatch, plan: BatchPlan, msg: Message, target: int, attempt: int,
               provenance: Provenance | None, malformed: PermanentError | None = None,
               fresh: int | None = None) -> bool:
        """Give one message its outcome: the one already decided (see ``prior``), or a new decision.

        ``target`` is the partition its order counts into, ``attempt`` the attempt it
        is; a ``malformed`` message is dead-lettered with that error. From ``fresh``
        on (see ``fresh_from``) nothing needs looking up: the common case, per order;
        without it every offset is looked up.
        Returns True when the order was newly counted.
        """
        source, offset = batch.source, offset_of(msg)
        batch.to_offset = offset + 1
        how, detail = (NEW, None) if fresh is not None and offset >= fresh else self.prior(source, offset)
        if how == APPLIED:
            return False  # Redis counted it; the batch script skips offsets below R
        if how == PUBLISHED:
            assert isinstance(detail, int)
            batch.park(offset, detail)
            return False
        if how == RECORDED:
            assert isinstance(detail, str)
            repeated = self.decider.repeat(msg, detail, provenance)
            batch.park(offset, repeated.kind, repeated.record)
            plan.out.append(repeated)
            return False
        if how == COMMITTED:
            self._count_again(batch, msg, target, malformed)
            return False
        cents: int | None
        order: dict | None
        out: OutMessage | None
        if malformed is not None:
            cents, out, order = None, self.decider.dead_letter(msg, malformed, 0), None
        else:
            cents, out, order = self.decider.attempt(msg, attempt, provenance)
        if cents is None:
            assert out is not None
            batch.park(offset, out.kind, out.record)
            plan.out.append(out)
            return False
        assert order is not None
        # A replayed dead letter counts once per orderId, however often it is replayed.
        batch.count(offset, target, cents, order["orderId"] if self.is_replay(msg, provenance) else "")
        plan.timestamps_ms.append(msg.timestamp()[1])
        return True

    def _count_again(self, batch: SourceBatch, msg: Message, target: int, malformed: PermanentError | None) -> None:
        """An order counted before K whose count Redis lost: count it, without deciding it again."""
        try:
            if malformed is not None:
                raise malformed
            order = self.serde.decode(msg.value())
        except OrderError as exc:
            # Kafka says it was counted (nothing parked it), yet it no longer decodes.
            log.error("cannot count again offset below K worker=%s source=%s offset=%d reason=%s",
                      self.name, batch.source, offset_of(msg), exc)
            batch.park(offset_of(msg), DEAD)
            return
        # Retry messages carry the REPLAY_OF header of their provenance too.
        batch.count(offset_of(msg), target, price_cents(order), order["orderId"] if replay_of(msg) else "")

    @staticmethod
    def is_replay(msg: Message, provenance: Provenance | None) -> bool:
        return bool(provenance.replay_of) if provenance is not None else replay_of(msg) is not None

    def checkpoint(self, plan: BatchPlan) -> None:
        """Apply the plan to Redis, then add its messages to the open Kafka transaction."""
        batches = [b for b in plan.batches.values() if b.to_offset >= 0]
        for batch in batches:
            batch.committed_offset = self.committed.get(batch.source)
        heartbeat = self._heartbeat()
        results = wait_for(lambda: self.store.apply(batches, worker=self.name, heartbeat=heartbeat, now_ms=now_ms()),
                           "redis", should_stop=self.stop)
        applied_at = now_ms()
        self.latency.record(applied_at - ts for ts in plan.timestamps_ms)
        self._counted_since_log += sum(r.counted for r in results)
        self._batches_since_log += 1
        if any(r.status in (STATE_LOST, STATE_BEHIND, STATE_AHEAD) for r in results):
            self._rewind()  # it finds which sources, from Redis
            return
        self.on_applied(plan, applied_at)
        for batch, result in zip(batches, results, strict=True):
            self.known[batch.source] = result.offset
            self.position[batch.source] = batch.to_offset
        self._parked_since_log.update((m.kind, m.error_type) for m in plan.out)
        if plan.out:
            self._publish(plan.out)
        self._maybe_commit()

    def _uncommitted(self) -> bool:
        """A position past its K (a position below K has nothing to commit: see _offsets_to_commit)."""
        for s, p in self.position.items():
            k = self.committed.get(s)
            if p is not None and (k is None or p > k):
                return True
        return False

    def _publish(self, out: list[OutMessage]) -> None:
        """Produce retry/DLQ messages into the open transaction (opening one if needed)."""
        try:
            with self.txn.producing():
                for m in out:
                    self._produce(m)
        except TransactionAborted as exc:
            self._transaction_failed(exc)

    def _maybe_commit(self) -> None:
        # Like Kafka Streams' commit.interval.ms under exactly-once: one transaction
        # spans the batches of a short interval, so its round trips are not paid per batch.
        now = time.monotonic()
        if self.txn.opened_at is not None:
            if now - self.txn.opened_at >= TRANSACTION_INTERVAL_S:
                self._commit()
        elif self._uncommitted() and now - self._last_commit >= COMMIT_INTERVAL_S:
            self._commit()
        elif now >= self._offsets_refresh_at:
            # An idle source commits its unchanged K again: Kafka expires the offsets
            # of a group without members offsets.retention.minutes after their commit.
            self._offsets_refresh_at = now + self.settings.offsets_refresh_s
            self._commit(refresh=True)

    def _offsets_to_commit(self, refresh: bool = False) -> list[TopicPartition]:
        """Positions to commit as K, each tagged with its topic's id (see _committed_offsets).

        Never below the K already committed: K says every side effect below it is
        published. A source rebuilt from the log (Redis lost) is below its K for a
        while; committing its position there would make the next owner, finding
        R = K, decide the orders between the two again (parked twice, counted
        twice). Until it passes K such a source has nothing new to commit.
        """
        offsets = []
        for s, p in self.position.items():
            if p is None:
                continue
            k = self.committed.get(s)
            target = p if k is None else max(p, k)
            if refresh or target != k:
                offsets.append(TopicPartition(s.topic, s.partition, target, metadata=self.topic_ids.get(s.topic)))
        return offsets

    def _commit(self, refresh: bool = False) -> None:
        """Commit the open transaction (or one with only offsets) with every position handled."""
        offsets = self._offsets_to_commit(refresh)
        if not offsets and not self.txn.is_open:
            return
        try:
            committed = self.txn.commit(offsets, self.consumer.consumer_group_metadata())
        except TransactionAborted as exc:
            self._transaction_failed(exc)
            return
        for tp in committed:
            self.committed[Source(tp.topic, tp.partition)] = tp.offset
        self._last_commit = time.monotonic()

    def _transaction_failed(self, exc: TransactionAborted) -> None:
        # The transaction is aborted. Redis has counted what it covered; replaying
        # from K re-publishes its messages and the offset guard skips the counting.
        log.warning("transaction failed worker=%s reason=%s action=abort_and_rewind", self.name, exc)
        self._rewind()

    def _produce(self, m: OutMessage) -> None:
        produce_one(self.producer, m.topic, m.key, m.value, oversize.on_delivery(m.topic, m.key, m.value, m.headers),
                    headers=m.headers)
        self.producer.poll(0)

    def _abort(self) -> None:
        """Abort the open transaction, if any: its messages never become visible."""
        self.txn.abort()

    def _rewind(self) -> None:
        """Abort, then re-read every source from min(R, K), with R as Redis has it now.

        Sources whose Redis state vanished (R unknown) restart from the log start;
        sources whose state went back restart from the stored R if earlier than K.
        """
        self._abort()
        # The decisions parked since the last read are in Redis only (the aborted
        # transaction never published them): read them all again, with each
        # source's R at the same instant. A source whose state went (or moved)
        # since its last batch is rebuilt from what Redis has now; resuming from
        # the R remembered would skip the decisions that were lost with it.
        in_redis, self.records = wait_for(lambda: self.store.state(self.sources), "redis", should_stop=self.stop)
        self._take_stored_state(in_redis)
        wait_for(lambda: self._resume(self.sources), "kafka (log of record)", should_stop=self.stop)
        log.info("rewind worker=%s positions=%s committed=%s published=%s", self.name,
                 ",".join(f"{s}@{'start' if p is None else p}" for s, p in self.position.items()),
                 ",".join(f"{s}@{k}" for s, k in self.committed.items()),
                 ",".join(f"{s}:{len(p)}" for s, p in self.published.items()))
        self._assign()

    @staticmethod
    def _state_went(known: int | None, stored: int | None) -> bool:
        """Whether Redis lost a source's state, or part of it, since the worker knew ``known``."""
        return known is not None and (stored is None or stored < known)

    def _take_stored_state(self, stored: dict[Source, int | None]) -> None:
        """Take R as Redis has it where it differs from what the worker knew.

        Lost or behind: Redis lost state. Ahead: another writer moved R (a zombie
        that lost the partition, or its previous owner).
        """
        for source, r in stored.items():
            known = self.known.get(source)
            if r == known:
                continue
            if r is None:
                log.warning("state lost worker=%s source=%s action=rebuild_from_log_start", self.name, source)
            else:
                log.warning("state %s worker=%s source=%s known=%s stored=%s action=rewind",
                            "ahead" if known is None or r > known else "behind", self.name, source, known, r)
            self.known[source] = r

    # -- housekeeping ----------------------------------------------------------------
    def _drop_errors(self, messages: list[Message]) -> list[Message]:
        good = []
        for msg in messages:
            err = msg.error()
            if err is None:
                good.append(msg)
            elif err.fatal() or err.code() == KafkaError._FATAL:
                # The consumer instance is unusable (e.g. fenced by the group): exit, restart.
                raise FatalWorkerError(f"consumer error: {err.str()}")
            else:
                log.warning("consumer error worker=%s code=%s reason=%s", self.name, err.name(), err.str())
        return good

    def _heartbeat(self) -> dict:
        return {"pid": os.getpid(), "manager": self.manager, "at_ms": now_ms(), "role": self.role,
                "host": self.settings.host_name,
                "positions": {str(s): p for s, p in self.position.items()},
                "latency": self.latency.as_dict(), **self.heartbeat_extra()}

    def heartbeat_extra(self) -> dict:
        """More fields for the heartbeat (the retry worker adds its waiting messages)."""
        return {}

    def _housekeeping(self) -> None:
        now = time.monotonic()
        if now - self._last_touch >= TOUCH_INTERVAL_S:
            self._last_touch = now
            # Aborts ride on the heartbeat's round trip: rare, and never worth one of their own.
            # Added even when 0: the counter exists from the start, so a first abort is an increase.
            aborts = self.txn.aborts - self._aborts_recorded
            try:
                stored = self.store.touch(self.sources, worker=self.name, heartbeat=self._heartbeat(),
                                          counts={"transaction_aborts": aborts})
                self._aborts_recorded += aborts
            except ServiceUnavailable as exc:
                log.warning("heartbeat failed worker=%s reason=%s", self.name, exc)
                stored = {}
            # An idle source is checked too: its state may be gone or have gone back.
            if any(self._state_went(self.known.get(s), r) for s, r in stored.items()):
                self._rewind()
        self._maybe_commit()
        if now - self._last_log >= 1.0 and self._batches_since_log:
            self.log_progress(now - self._last_log)
            self._counted_since_log = 0
            self._batches_since_log = 0
            self._parked_since_log.clear()
            self._last_log = now

    def log_progress(self, interval_s: float) -> None:
        """One INFO line per second of activity: counted, retried and dead-lettered, lag and the running average.

        (Per second, not per batch or per retry: at tens of thousands of orders/s
        such lines are more than a person can follow in ``supervisorctl tail -f``,
        and writing them cost a third of the throughput at 10% failures.)
        """
        total = self._global_totals()
        log.info("progress worker=%s batches=%d counted=%d rate_per_s=%.0f retried=%d dead_lettered=%d%s lag=%d "
                 "positions=%s global_count=%s global_average=%s",
                 self.name, self._batches_since_log, self._counted_since_log,
                 self._counted_since_log / interval_s, self._parked(RETRIED), self._parked(DEAD),
                 self._parked_by_error(), self._lag(),
                 ",".join(f"{s}@{p}" for s, p in self.position.items()),
                 total.count if total else "-", total.average if total else "-")

    def _parked(self, kind: int) -> int:
        return sum(n for (k, _), n in self._parked_since_log.items() if k == kind)

    def _parked_by_error(self) -> str:
        """`` retried_by_error=Type:n,.. dead_by_error=Type:n,..`` for the kinds parked since the last line."""
        parts = []
        for kind, label in ((RETRIED, "retried_by_error"), (DEAD, "dead_by_error")):
            counts = sorted((error, n) for (k, error), n in self._parked_since_log.items() if k == kind)
            if counts:
                parts.append(f" {label}=" + ",".join(f"{error}:{n}" for error, n in counts))
        return "".join(parts)

    def _global_totals(self) -> Totals | None:
        """The running average for the progress line: merged from every source, read once per line."""
        try:
            return self.store.totals()
        except ServiceUnavailable:
            return None  # the line shows '-'; the batch loop notices the outage itself

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
