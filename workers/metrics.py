"""`orders metrics`: the pool's figures for Prometheus, read when Prometheus scrapes.

The figures come from where ``orders status`` reads them (``StatusReader``: Redis
state and heartbeats, Kafka watermarks), from the host's counters in Redis
(transaction aborts, added by the workers with their heartbeat; restarts, added
by the supervisor event listener, ``workers/events.py``) and from the DLQ topic,
which this process follows from its start, reading headers only, for the dead
letters by error type. No worker opens a port, and a scrape costs the workers
nothing.

Every host runs one endpoint. Two kinds of series, so that Prometheus can merge
the hosts without counting anything twice:

* pool-wide (no ``host`` label): the counts, lag, retry backlog and DLQ, read from
  the shared Redis and Kafka. Every host exports the same values: aggregate them
  over instances with ``max``, never ``sum``.
* per process (``host`` and ``worker`` labels): latency histograms, heartbeat ages,
  restarts and transaction aborts. Each host exports only its own processes:
  ``sum`` them.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from . import envelope as env
from .errors import PortUnavailable, ServiceUnavailable
from .latency import cumulative
from .settings import Settings
from .status import StatusReader
from .store import AggregateStore

log = logging.getLogger(__name__)

# Histogram bounds (ms): 1 ms to 60 s, each one an upper bound of workers/latency.py's
# buckets, so that the cumulative counts are exact.
LATENCY_BOUNDS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 30000, 60000)
# Supervisor's counters that the event listener keeps (workers/events.py)
RESTARTS, FATAL = "restarts", "fatal"
TRANSACTION_ABORTS = "transaction_aborts"
# Partition counts are read from Kafka at most this often: partitions added to a live
# topic show up within it, and a scrape costs one Kafka round trip (the end offsets).
METADATA_MAX_AGE_S = 30.0


class DlqTally:
    """Dead letters on the DLQ topic by error type: read from its start, then followed.

    Only headers are read (no Avro decoding). ``counts()`` is None until the
    reader has reached the end the topic had when it started, so a scrape never
    reports a partial count as the DLQ's size.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._caught_up = False

    def counts(self) -> dict[str, int] | None:
        with self._lock:
            return dict(self._counts) if self._caught_up else None

    def follow(self, consumer: Consumer, topic: str, stop: Callable[[], bool], poll_timeout_s: float = 0.5) -> None:
        """Read ``topic`` until ``stop()``; waits for the topic (and Kafka) if it is not there yet."""
        found = self._wait_for_ends(consumer, topic, stop)
        if found is None:
            return
        partitions, ends = found
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        pending = {p for p, end in ends.items() if end > 0}
        self._mark_caught_up(pending)
        while not stop():
            batch = consumer.consume(num_messages=1000, timeout=poll_timeout_s)
            by_type: Counter[str] = Counter()
            for msg in batch:
                if msg.error() is None:
                    by_type[_error_type(msg.headers())] += 1
            with self._lock:
                self._counts.update(by_type)
            if pending:
                # Transaction markers take offsets: compare positions, not the last message's offset.
                for tp in consumer.position([TopicPartition(topic, p) for p in pending]):
                    if tp.offset >= ends[tp.partition]:
                        pending.discard(tp.partition)
                self._mark_caught_up(pending)

    def _mark_caught_up(self, pending: set[int]) -> None:
        if not pending and not self._caught_up:
            with self._lock:
                self._caught_up = True
            log.info("dlq read to its end dead_letters=%d", sum(self._counts.values()))

    @staticmethod
    def _wait_for_ends(consumer: Consumer, topic: str,
                       stop: Callable[[], bool]) -> tuple[list[int], dict[int, int]] | None:
        """The topic's partitions and their end offsets, once Kafka has the topic; None if asked to stop."""
        while not stop():
            try:
                meta = consumer.list_topics(topic, timeout=5).topics.get(topic)
                if meta is not None and meta.error is None and meta.partitions:
                    partitions = sorted(meta.partitions)
                    return partitions, {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                                        for p in partitions}
            except KafkaException as exc:
                log.warning("dlq: waiting for kafka reason=%s", exc.args[0].str())
            time.sleep(1.0)
        return None


def _error_type(headers: list | dict | None) -> str:
    pairs = headers.items() if isinstance(headers, dict) else headers or []
    for name, value in pairs:
        if name == env.ERROR_TYPE and value is not None:
            return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    return "unknown"


class PoolCollector(Collector):
    """Reads the pool's figures on every scrape (one StatusReader snapshot and one counters read)."""

    def __init__(self, settings: Settings, reader: StatusReader, store: AggregateStore, dlq: DlqTally):
        self.settings = settings
        self.reader = reader
        self.store = store
        self.dlq = dlq
        self.host = settings.host_name
        self._lock = threading.Lock()  # scrapes may come in parallel; the reader keeps state
        self._last_beat_ms: dict[int, int] = {}  # partition -> newest heartbeat seen claiming it

    def collect(self) -> Iterator[Metric]:
        started = time.monotonic()
        with self._lock:
            try:
                data = self.reader.snapshot()
                counters, replayed = self.store.counters(self.host)
            except ServiceUnavailable as exc:
                log.warning("scrape could not read the pool reason=%s", exc)
                yield _gauge("orders_metrics_read_ok", "1 if this scrape read Redis and Kafka, else 0", 0)
                return
            metrics = [*self._pool(data, replayed), *self._partitions(data), *self._retry(data), *self._dlq(),
                       *self._processes(data["at_ms"], counters)]
        yield from metrics
        yield _gauge("orders_metrics_read_ok", "1 if this scrape read Redis and Kafka, else 0", 1)
        yield _gauge("orders_metrics_read_seconds", "Time this scrape took to read Redis and Kafka",
                     time.monotonic() - started)

    # -- pool-wide: the same on every host ---------------------------------------------
    def _pool(self, data: dict, replayed: int) -> Iterator[Metric]:
        g = data["global"]
        yield _gauge("orders_global_orders", "Orders counted in the global running average (orders stats count)",
                     g["count"])
        yield _gauge("orders_global_value", "Sum of the counted orders' prices (orders stats sum)", g["sum"])
        yield _gauge("orders_global_average_price", "The global running average price (orders stats average)",
                     g["average"] if g["average"] is not None else math.nan)
        sources = data["sources"]
        for name, key, doc in (
                ("orders_retried", "retried", "Orders sent to the retry topic, by the source that sent them"),
                ("orders_dead_lettered", "dead_lettered", "Orders dead-lettered, by the source that decided it"),
                ("orders_duplicate_replays", "duplicate_replays",
                 "Replayed copies not counted because another copy of the order was")):
            family = CounterMetricFamily(name, doc, labels=["topic", "partition"])
            for src in sources:
                family.add_metric([src["topic"], str(src["partition"])], src[key])
            yield family
        yield CounterMetricFamily("orders_replayed", "Dead letters put back on the orders topic (orders dlq replay)",
                                  value=replayed)
        roles: Counter[str] = Counter(w["role"] for w in data["workers"].values())
        workers = GaugeMetricFamily("orders_live_workers", "Workers with a live heartbeat, on every host",
                                    labels=["role"])
        for role in ("consumer", "retry"):
            workers.add_metric([role], roles.get(role, 0))
        yield workers

    def _partitions(self, data: dict) -> Iterator[Metric]:
        labels = ["partition"]
        counted = CounterMetricFamily("orders_counted", "Orders counted into this partition of the orders topic",
                                      labels=labels)
        value = GaugeMetricFamily("orders_partition_value", "Sum of the prices counted into this partition",
                                  labels=labels)
        lag = GaugeMetricFamily("orders_consumer_lag_offsets",
                                "Offsets between the partition's end and the next offset to count", labels=labels)
        end = GaugeMetricFamily("orders_partition_end_offset", "The partition's high watermark", labels=labels)
        owners = GaugeMetricFamily("orders_partition_owners",
                                   "Live workers claiming the partition: 0 nobody, 2 or more a move in progress",
                                   labels=labels)
        age = GaugeMetricFamily("orders_partition_heartbeat_age_seconds",
                                "Age of the newest heartbeat of a worker owning the partition "
                                "(+Inf: none seen since this endpoint started)", labels=labels)
        newest = self._newest_claims(data["at_ms"])
        for part in data["partitions"]:
            p = part["partition"]
            key = [str(p)]
            counted.add_metric(key, part["count"])
            value.add_metric(key, part["sum"])
            if part["lag"] is not None:
                lag.add_metric(key, part["lag"])
            if part["end_offset"] is not None:
                end.add_metric(key, part["end_offset"])
            owners.add_metric(key, 0 if not part["alive"] else 2 if part["moving"] else 1)
            if p in newest:
                self._last_beat_ms[p] = max(newest[p], self._last_beat_ms.get(p, 0))
            seen = self._last_beat_ms.get(p)
            age.add_metric(key, max(0.0, (data["at_ms"] - seen) / 1000) if seen is not None else math.inf)
        yield from (counted, value, lag, end, owners, age)

    def _newest_claims(self, now_ms: int) -> dict[int, int]:
        """Partition -> the newest heartbeat time among the workers claiming it (live or not yet expired)."""
        prefix = f"{self.settings.orders_topic}:"
        newest: dict[int, int] = {}
        for beat in self.reader.beats.values():
            at = beat.get("at_ms", 0)
            for source in beat.get("positions", {}):
                if source.startswith(prefix) and source[len(prefix):].isdigit():
                    p = int(source[len(prefix):])
                    newest[p] = max(newest.get(p, 0), min(at, now_ms))
        return newest

    def _retry(self, data: dict) -> Iterator[Metric]:
        # Per retry topic (delay level): a level of earlier backoff settings drains to 0.
        backlog = GaugeMetricFamily("orders_retry_backlog_offsets", "Offsets of the retry topic not yet handled "
                                    "(an upper bound: transaction markers take offsets)", labels=["topic"])
        waiting = GaugeMetricFamily("orders_retry_waiting_messages",
                                    "Retries held by the retry workers until they are due", labels=["topic"])
        due = GaugeMetricFamily("orders_retry_next_due_timestamp_seconds",
                                "When the next waiting retry is due (Unix time; +Inf: none is waiting)",
                                labels=["topic"])
        for level in data["retry"]["levels"]:
            backlog.add_metric([level["topic"]], level["backlog"])
            waiting.add_metric([level["topic"]], level["waiting"])
            due.add_metric([level["topic"]], level["next_due_ms"] / 1000 if level["next_due_ms"] else math.inf)
        yield from (backlog, waiting, due)

    def _dlq(self) -> Iterator[Metric]:
        counts = self.dlq.counts()
        if counts is None:
            return  # still reading the DLQ from its start: no partial size
        family = GaugeMetricFamily("orders_dlq_messages", "Dead letters on the DLQ topic, by error type",
                                   labels=["error_type"])
        for error_type, n in sorted(counts.items()):
            family.add_metric([error_type], n)
        yield family

    # -- this host's processes ---------------------------------------------------------
    def _processes(self, now_ms: int, counters: dict[tuple[str, str], int]) -> Iterator[Metric]:
        labels = ["host", "worker"]
        mine = {name: beat for name, beat in sorted(self.reader.beats.items()) if beat.get("host") == self.host}
        age = GaugeMetricFamily("orders_worker_heartbeat_age_seconds", "Age of the worker's last heartbeat",
                                labels=labels)
        latency = HistogramMetricFamily("orders_latency_seconds",
                                        "Produce-to-counted latency of the orders this worker counted "
                                        "(since the worker started)", labels=labels)
        lateness = HistogramMetricFamily("orders_retry_lateness_seconds",
                                         "How long after its due time each retry was handled, by this retry "
                                         "worker (since the worker started)", labels=labels)
        for name, beat in mine.items():
            age.add_metric([self.host, name], max(0.0, (now_ms - beat.get("at_ms", now_ms)) / 1000))
            for field, histogram in (("latency", latency), ("lateness", lateness)):
                if field in beat:
                    buckets, total_s = _histogram(beat[field])
                    histogram.add_metric([self.host, name], buckets, total_s)
        yield age
        yield latency
        yield lateness
        for name, doc in ((RESTARTS, "Unexpected exits of the process, each followed by a restart (supervisor)"),
                          (FATAL, "Times supervisor gave up starting the process (FATAL)"),
                          (TRANSACTION_ABORTS, "Kafka transactions the worker aborted")):
            family = CounterMetricFamily(f"orders_worker_{name}" if name != TRANSACTION_ABORTS
                                         else "orders_transaction_aborts", doc, labels=labels)
            for (counter, who), n in sorted(counters.items()):
                if counter == name:
                    family.add_metric([self.host, who], n)
            yield family


def _histogram(latency: dict) -> tuple[list[tuple[str, float]], float]:
    """Prometheus buckets (le in seconds, cumulative) and sum from a heartbeat's histogram."""
    raw = latency.get("buckets", {})
    buckets: list[tuple[str, float]] = [(_seconds(bound), n) for bound, n in cumulative(raw, LATENCY_BOUNDS_MS)]
    buckets.append(("+Inf", sum(raw.values())))
    return buckets, latency.get("sum_ms", 0) / 1000


def _seconds(ms: int) -> str:
    return format(ms / 1000, "g")


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def serve(settings: Settings, *, store: AggregateStore, admin: AdminClient, consumer: Consumer,
          stop: Callable[[], bool]) -> None:
    """Serve /metrics on METRICS_BIND:METRICS_PORT and follow the DLQ until ``stop()``.

    Raises PortUnavailable when the address is taken (supervisor tries again).
    """
    dlq = DlqTally()
    registry = CollectorRegistry(auto_describe=False)
    reader = StatusReader(settings, store, admin, metadata_max_age_s=METADATA_MAX_AGE_S)
    registry.register(PoolCollector(settings, reader, store, dlq))
    try:
        server, thread = start_http_server(settings.metrics_port, settings.metrics_bind, registry=registry)
    except OSError as exc:
        raise PortUnavailable(f"metrics: cannot listen on {settings.metrics_bind}:{settings.metrics_port}: "
                              f"{exc.strerror}") from exc
    log.info("serving metrics url=http://%s:%d/metrics host=%s", settings.metrics_bind, settings.metrics_port,
             settings.host_name)
    try:
        dlq.follow(consumer, settings.dlq_topic, stop)  # the main thread; scrapes run in the server's
    finally:
        consumer.close()
        server.shutdown()
        thread.join(timeout=5)
        log.info("metrics stopped")
