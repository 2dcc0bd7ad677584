"""The ceiling: bare confluent_kafka consumers that only decode every order with fastavro.

Three processes, one consumer per partition (the pool has one worker process per
partition too), each with librdkafka's default configuration (no group
membership: explicit assignment, no commits) except ``fetch.queue.backoff.ms``
10 instead of 1000: with the default, once the local queue holds
``queued.min.messages`` librdkafka stops fetching for up to a second, and a
reader that empties the queue faster than that sits idle (measured: the same
readers vary between 190k and 610k orders/s with the default). Each reader assigns its partition
when all are ready, reads exactly the pre-produced messages
(asking for no more than remain, so the last batch never waits on a timeout)
and decodes each value with ``schemaless_reader`` after the 5-byte header.

Orders/s is measured like the pipeline's: from the moment every reader has decoded
its first batch to the last message decoded, counting only what was decoded in
that window (each reader records (time, decoded so far) after every batch).
"""
from __future__ import annotations

import io
import logging
import multiprocessing as mp
import time
from dataclasses import dataclass

import fastavro
from confluent_kafka import Consumer, TopicPartition

from workers.serde import load_schema
from workers.settings import Settings

log = logging.getLogger(__name__)

HEADER_SIZE = 5
BATCH = 2000


@dataclass(frozen=True)
class ReaderResult:
    partition: int
    marks: list[tuple[float, int]]   # (time.time(), decoded so far) after each batch

    def decoded_at(self, t: float) -> int:
        return max((n for at, n in self.marks if at <= t), default=0)


def read_partition(env: dict, partition: int, count: int, ready, go, results) -> None:
    """Child process: read and decode the ``count`` messages of one partition."""
    settings = Settings.from_env(env)
    schema = fastavro.parse_schema(load_schema(settings.schema_path))
    consumer = Consumer({"bootstrap.servers": settings.bootstrap_servers,
                         "group.id": settings.group_id("ceiling"), "enable.auto.commit": False,
                         "fetch.queue.backoff.ms": 10})
    # Connected to the partition's leader before the start: else a reader may get its first
    # batch a second after the others, and the three do not run side by side.
    consumer.get_watermark_offsets(TopicPartition(settings.orders_topic, partition), timeout=10)
    ready.release()
    go.wait()
    consumer.assign([TopicPartition(settings.orders_topic, partition, 0)])
    decoded, marks = 0, []
    while decoded < count:
        batch = consumer.consume(num_messages=min(BATCH, count - decoded), timeout=1.0)
        for msg in batch:
            if msg.error() is not None:
                continue
            body = io.BytesIO(msg.value() or b"")
            body.seek(HEADER_SIZE)
            fastavro.schemaless_reader(body, schema, None)
            decoded += 1
        if batch:
            marks.append((time.time(), decoded))
    consumer.close()
    results.put(ReaderResult(partition, marks))


def measure_ceiling(env: dict, ends: dict[int, int], timeout: float = 120) -> dict:
    """One repetition: three reader processes; returns orders/s and the window."""
    ctx = mp.get_context("spawn")
    ready, go, results = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=read_partition, args=(env, p, n, ready, go, results), daemon=True)
             for p, n in ends.items()]
    for proc in procs:
        proc.start()
    try:
        for _ in procs:
            if not ready.acquire(timeout=60):
                raise RuntimeError("a ceiling reader did not start")
        go.set()
        out = [results.get(timeout=timeout) for _ in procs]
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    start = max(r.marks[0][0] for r in out)
    end = max(r.marks[-1][0] for r in out)
    total = sum(r.marks[-1][1] for r in out)
    rate = (total - sum(r.decoded_at(start) for r in out)) / (end - start)
    log.info("ceiling decoded=%d window_s=%.3f orders_per_s=%.0f", total, end - start, rate)
    return {"orders_per_s": rate, "decoded": total, "window_s": round(end - start, 3)}
