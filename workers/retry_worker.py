"""The retry worker: re-attempts orders from the delayed retry topics once they are due.

Each delay level has a topic of its own (``orders-retry-1000ms``, ``-2000ms``, ...;
workers/settings.py), so every retry partition is in due-time order: its head is
always the next one due there, and a retry never waits behind a longer one.

A message waits in memory until its due time, so the worker never sleeps past
``max.poll.interval.ms`` and never busy-waits: it polls with a timeout that ends
at the next due time (at most ``poll_timeout_s``). It keeps fetching while
messages wait, up to RETRY_BUFFER_BYTES of them (keys, values and headers),
shared equally by its partitions: a partition at its share is paused until its
head is handled, so a busy level never holds back another. The bound is in
bytes, not messages, because a retry message carries the order's value, which
may be up to the topic's size limit. The worker consumes every topic of the retry
family, including the levels of earlier backoff settings, so none is orphaned
with retries in it; it looks for new ones every FAMILY_REFRESH_S.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Sequence, Set

from confluent_kafka import KafkaException, Message, TopicPartition

from .clients import wait_for
from .engine import NEW, BatchPlan, BatchWorker, message_key, now_ms, offset_of, source_of
from .envelope import MalformedEnvelope, Provenance, header_dict, retry_attempt
from .errors import PermanentError, ServiceUnavailable
from .latency import LatencyHistogram
from .settings import Settings
from .store import Source
from .topics import existing_retry_topics, retry_delay_of

log = logging.getLogger(__name__)


class MalformedRetry(PermanentError):
    """A message on the retry topic without the headers the retry worker needs."""


# A due time can be at most its level's delay, plus this, ahead of now (room for
# clock skew). One further ahead would hold its partition for as long: it is
# dead-lettered instead.
DUE_MARGIN_MS = 60_000
# How often the worker looks for retry topics it does not consume yet (levels another
# host created with other backoff settings): one metadata request.
FAMILY_REFRESH_S = 10.0


class RetryWorker(BatchWorker):
    role = "retry"
    def __init__(self, settings, name: str, **clients):
        super().__init__(settings, **clients)
        self.name = name
        # The retry topic's partitions are spread over the retry workers by the group.
        # A partition that moves keeps its due times: they travel in the headers, and
        # the new owner reads the waiting messages again from K.
        self.subscription = []  # the retry family as found at start (start) and since (_refresh_family)
        self._family_checked = time.monotonic()
        self.waiting: dict[Source, deque] = {}  # per source: (message, due_ms, bytes), in offset order
        self.source_bytes: dict[Source, int] = {}  # of waiting, per source: each has an equal share
        self.paused: set[Source] = set()
        self.order_partitions = settings.partitions  # of the orders topic: refreshed as partitions are added
        # How late each retry was handled (handled - due), published with the heartbeat
        # like the latency histogram: `orders status`, `orders metrics` and the bench read it.
        self.lateness = LatencyHistogram()

    def start(self) -> None:
        self.subscription = wait_for(lambda: existing_retry_topics(self.admin, self.settings), "kafka",
                                     should_stop=self.stop)
        super().start()

    def _refresh_family(self) -> None:
        """Subscribe to retry topics created since we looked (another host's backoff settings)."""
        self._family_checked = time.monotonic()
        try:
            found = existing_retry_topics(self.admin, self.settings)
        except ServiceUnavailable as exc:
            log.warning("could not look for new retry topics worker=%s reason=%s", self.name, exc)
            return
        new = sorted(set(found) - set(self.subscription or []))
        if new:
            log.info("new retry topics worker=%s topics=%s", self.name, ",".join(new))
            self.subscribe(sorted({*(self.subscription or []), *new}))

    def on_assigned(self, sources: Sequence[Source]) -> None:
        for source in sources:
            self.waiting[source] = deque()
            self.source_bytes[source] = 0
        self.order_partitions = self._partitions.get(self.settings.orders_topic, self.order_partitions)

    @classmethod
    def consumer_overrides(cls, settings) -> dict:
        # librdkafka prefetches up to 64 MiB (queued.max.messages.kbytes) by default:
        # give it the same budget as the worker's own buffer.
        return {"queued.max.messages.kbytes": settings.retry_buffer_bytes // 1024,
                "queued.min.messages": settings.batch_size}

    def on_released(self, sources: Set[Source]) -> None:
        for source in sources:
            self.waiting.pop(source, None)
            self.source_bytes.pop(source, None)
        self.paused -= sources

    def on_reassign(self) -> None:
        for queue in self.waiting.values():
            queue.clear()
        self.source_bytes = dict.fromkeys(self.source_bytes, 0)
        # A partition paused before the rewind must fetch again from its new offset.
        if self.paused:
            self.consumer.resume([TopicPartition(s.topic, s.partition) for s in self.paused])
        self.paused.clear()

    def poll(self) -> list[Message]:
        timeout = self.settings.poll_timeout_s
        due = self._next_due_ms()
        if due is not None:
            timeout = max(0.0, min(timeout, (due - now_ms()) / 1000))
        return self.fetch(timeout)

    @property
    def waiting_bytes(self) -> int:
        return sum(self.source_bytes.values())

    def heartbeat_extra(self) -> dict:
        # Per source: how many wait and when the first is due (`orders status` shows them per delay level).
        waiting = {str(s): [len(q), q[0][1] if q else None] for s, q in self.waiting.items()}
        return {"waiting": sum(len(q) for q in self.waiting.values()), "waiting_bytes": self.waiting_bytes,
                "next_due_ms": self._next_due_ms(), "lateness": self.lateness.as_dict(), "waiting_by_source": waiting}

    def _next_due_ms(self) -> int | None:
        heads = [q[0][1] for q in self.waiting.values() if q]
        return min(heads) if heads else None

    def plan(self, messages: Sequence[Message]) -> BatchPlan:
        for msg in messages:
            size = message_bytes(msg)
            source = source_of(msg)
            self.waiting[source].append((msg, self._due_ms(msg), size))
            self.source_bytes[source] += size
        plan = BatchPlan()
        now = now_ms()
        due_now = [m for q in self.waiting.values() for m, due, _ in q if due <= now]
        if due_now:
            wait_for(lambda: self.serde.prefetch(m.value() for m in due_now), "schema registry", should_stop=self.stop)
        for source, queue in self.waiting.items():
            self._take_due(source, queue, plan)
        self._pause_waiting()
        return plan

    def _housekeeping(self) -> None:
        # Waiting messages become due between polls: handle them even when
        # nothing new arrives.
        if any(q and q[0][1] <= now_ms() for q in self.waiting.values()):
            plan = self.plan([])
            if plan.batches or plan.out:
                self.checkpoint(plan)
        if time.monotonic() - self._family_checked >= FAMILY_REFRESH_S:
            self._refresh_family()
        super()._housekeeping()

    def _due_ms(self, msg: Message) -> int:
        if self.prior(source_of(msg), offset_of(msg))[0] != NEW:
            return 0  # decided before: nothing to wait for
        try:
            return self._checked_due(retry_attempt(header_dict(msg.headers()))[1], msg.topic() or "")
        except MalformedEnvelope:
            return 0  # handled (dead-lettered) at once

    def _checked_due(self, due_ms: int, topic: str) -> int:
        """The due time, if no further ahead than its level's delay can put it; raises MalformedEnvelope.

        The level is the topic's (``orders-retry-5000ms``: 5 s), whatever today's backoff
        settings are, so the retries of levels no longer in use are waited for as made.
        """
        longest = longest_delay_ms(self.settings, topic)
        ahead = due_ms - now_ms()
        if ahead > longest + DUE_MARGIN_MS:
            raise MalformedEnvelope(f"due time {due_ms} is {ahead} ms ahead, beyond the longest backoff "
                                    f"({longest} ms) plus {DUE_MARGIN_MS} ms")
        return due_ms

    def _take_due(self, source: Source, queue: deque, plan: BatchPlan) -> None:
        batch = None
        now = now_ms()
        while queue and queue[0][1] <= now:
            msg, due, size = queue.popleft()
            self.source_bytes[source] -= size
            if batch is None:
                batch = plan.batch_for(source, self.known[source])
            headers = header_dict(msg.headers())
            try:
                attempt, due_ms = retry_attempt(headers)
                self._checked_due(due_ms, source.topic)
                provenance = Provenance.from_headers(headers)
                if not self._order_partition_exists(provenance.partition):
                    raise MalformedEnvelope(f"original partition {provenance.partition} does not exist")
            except MalformedEnvelope as exc:
                self.settle(batch, plan, msg, -1, 0, None, malformed=MalformedRetry(str(exc)))
                continue
            if due:  # 0: decided before (a replay after a crash or rewind), not a retry made now
                plan.due_ms.append(due)
            counted = self.settle(batch, plan, msg, provenance.partition, attempt, provenance)
            if counted and log.isEnabledFor(logging.DEBUG):  # one per order: the progress line counts them
                log.debug("retry succeeded key=%s attempt=%d original_partition=%d original_offset=%d late_ms=%d",
                          message_key(msg), attempt, provenance.partition, provenance.offset, now - due)

    def on_applied(self, plan: BatchPlan, applied_at_ms: int) -> None:
        # Late = applied in Redis (or parked again) - due: what an order waited beyond its backoff.
        self.lateness.record(applied_at_ms - due for due in plan.due_ms)

    def _order_partition_exists(self, partition: int) -> bool:
        if 0 <= partition < self.order_partitions:
            return True
        # Partitions may have been added to the orders topic since we looked.
        self.order_partitions = wait_for(self._count_order_partitions, "kafka", should_stop=self.stop)
        return 0 <= partition < self.order_partitions

    def _count_order_partitions(self) -> int:
        topic = self.settings.orders_topic
        try:
            meta = self.consumer.list_topics(topic, timeout=10).topics[topic]
        except KafkaException as exc:
            raise ServiceUnavailable(f"kafka: {exc.args[0].str()}") from exc
        return len(meta.partitions)

    def _pause_waiting(self) -> None:
        """Pause each partition at its share of RETRY_BUFFER_BYTES waiting; resume it below.

        A share, not the whole buffer: a level whose retries wait long (and so pile up)
        must not stop the fetching of a level whose head is due sooner.
        """
        share = self.settings.retry_buffer_bytes // max(1, len(self.waiting))
        full = {s for s, size in self.source_bytes.items() if size >= share}
        to_pause = sorted(full - self.paused, key=str)
        to_resume = sorted((self.paused - full) & set(self.waiting), key=str)
        if to_pause:
            self.consumer.pause([TopicPartition(s.topic, s.partition) for s in to_pause])
            self.paused.update(to_pause)
        if to_resume:
            self.consumer.resume([TopicPartition(s.topic, s.partition) for s in to_resume])
            self.paused.difference_update(to_resume)


def longest_delay_ms(settings: Settings, topic: str) -> int:
    """How far ahead a retry on ``topic`` can be due: its level's delay (``orders-retry-5000ms``:
    5 s) whatever today's settings; on the single retry topic of earlier versions, today's longest."""
    delay = retry_delay_of(topic)
    return delay if delay >= 0 else settings.retry_delay_ms(max(1, settings.max_retries))


# What a waiting message holds beyond the bytes of its key, value and headers: the
# Message object and its tuple in the queue; and per header, the Python tuple, str
# and bytes objects its headers become once read (measured with tracemalloc: about
# 150 bytes each, so a retry's ten headers weigh three times their text).
MESSAGE_OVERHEAD_BYTES = 200
HEADER_OVERHEAD_BYTES = 150


def message_bytes(msg: Message) -> int:
    """The memory a waiting message holds, near enough: key, value, headers and overhead."""
    size = MESSAGE_OVERHEAD_BYTES + len(msg.value() or b"") + len(msg.key() or b"")
    headers = msg.headers() or []
    for name, value in headers.items() if isinstance(headers, dict) else headers:
        size += HEADER_OVERHEAD_BYTES + len(name) + (len(value) if value is not None else 0)
    return size
