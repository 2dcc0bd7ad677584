"""Shared pieces: isolated environments, the pre-produced backlog, clean-up, medians.

Every part of the benchmark gets its own topics, Redis prefix, consumer groups and
transactional ids (``tests.conftest.isolated_env``), so it never touches a pool the
user runs; ``Resources`` remembers them all and deletes them at the end.
"""
from __future__ import annotations

import logging
import os
import signal
import statistics
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
from confluent_kafka import KafkaException, TopicPartition

from tests.conftest import isolated_env
from tests.pool import SupervisedPool
from workers.clients import make_admin, make_producer, make_redis, make_registry
from workers.producer import DeliveryTally, IdempotentSender, produce_orders
from workers.serde import OrderSerde, load_schema, subject_for
from workers.settings import Settings
from workers.store import AggregateStore
from workers.topics import ensure_topics, known_end_offsets

log = logging.getLogger(__name__)


def live_workers(store: AggregateStore, sources: list | tuple = ()) -> dict:
    """One snapshot of ``sources`` and of every worker with a heartbeat (group members come and go)."""
    return store.snapshot(0, sources=sources, workers=store.worker_names())


def bench_env(name: str, **extra: str) -> dict[str, str]:
    """An isolated environment with the benchmark's defaults (no failures, an idle producer)."""
    defaults = {
        "ORDERS_FAILURE_RATE": "0",
        "PRODUCE_RATE": "0.001",      # the supervised producer's first order would be due in 1000 s
        "RETRY_BACKOFF_MS": "1000",   # the production default (isolated_env shortens it for tests)
    }
    if os.environ.get("PYTHONPATH"):  # e.g. benchmarking a patched copy of the repo
        defaults["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return isolated_env(f"bench-{name}", **{**defaults, **extra})


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


class Resources:
    """Topics, Redis keys and consumer groups the benchmark created; ``cleanup`` deletes them."""

    def __init__(self):
        self._settings: list[Settings] = []

    def track(self, env: dict[str, str]) -> Settings:
        settings = Settings.from_env(env)
        self._settings.append(settings)
        return settings

    def names(self) -> dict[str, list[str]]:
        """What the run created, by kind (written to the JSON so a test can check the clean-up)."""
        return {"topics": sorted({t for s in self._settings for t in (s.orders_topic, *s.retry_topics, s.dlq_topic)}),
                "redis_prefixes": sorted({s.redis_prefix for s in self._settings}),
                "group_prefixes": sorted({s.group_prefix for s in self._settings})}

    def cleanup(self) -> None:
        if not self._settings:
            return
        admin = make_admin(self._settings[0])
        existing = set(admin.list_topics(timeout=10).topics)
        topics = sorted(t for t in existing if any(s.is_pool_topic(t) for s in self._settings))
        _wait_all(admin.delete_topics(topics, operation_timeout=30) if topics else {})
        prefixes = tuple(s.group_prefix for s in self._settings)
        groups = [g.group_id for g in admin.list_consumer_groups().result(timeout=10).valid
                  if g.group_id.startswith(prefixes)]
        _wait_all(admin.delete_consumer_groups(groups, request_timeout=30) if groups else {})
        keys = sum(AggregateStore(make_redis(s), s.redis_prefix).clear() for s in self._settings)
        # Every named topic's subject: one may be registered without its topic (the pools' feed).
        named = {s.orders_topic for s in self._settings}
        subjects = delete_subjects(self._settings[0], [subject_for(t) for t in sorted(named | set(topics))])
        log.info("cleanup topics=%d groups=%d redis_keys=%d subjects=%d", len(topics), len(groups), keys, subjects)


def delete_subjects(settings: Settings, subjects: list[str]) -> int:
    """Delete (soft, then for good) the registry subjects among ``subjects``; returns how many."""
    registry = make_registry(settings)
    existing = set(registry.get_subjects()) & set(subjects)
    for subject in existing:
        registry.delete_subject(subject, permanent=False)
        registry.delete_subject(subject, permanent=True)
    return len(existing)


def _wait_all(futures: dict) -> None:
    for future in futures.values():
        try:
            future.result()
        except KafkaException as exc:
            log.warning("cleanup: %s", exc)


def make_serde(settings: Settings) -> OrderSerde:
    serde = OrderSerde(make_registry(settings), load_schema(settings.schema_path))
    serde.register(settings.orders_topic)
    return serde


def preproduce(settings: Settings, count: int, seed: int = 1) -> dict[int, int]:
    """Produce ``count`` random orders to the settings' orders topic; returns its end offsets."""
    ensure_topics(make_admin(settings), settings)
    tally = DeliveryTally()
    sender = IdempotentSender(make_producer(settings), settings.orders_topic, tally)
    sent = produce_orders(sender, make_serde(settings), count=count, rate=0, seed=seed, stop=lambda: False)
    if tally.delivered != sent or sent != count:
        raise RuntimeError(f"pre-produce delivered {tally.delivered} of {count}: {tally.errors}")
    ends = end_offsets(settings)
    log.info("pre-produced orders=%d topic=%s end_offsets=%s", count, settings.orders_topic, ends)
    return ends


def end_offsets(settings: Settings) -> dict[int, int]:
    """The orders topic's end offsets by partition (the high watermarks)."""
    partitions = [TopicPartition(settings.orders_topic, p) for p in range(settings.partitions)]
    return dict(zip(range(settings.partitions), known_end_offsets(make_admin(settings), partitions), strict=True))


def process_times(pids: Iterable[int]) -> dict[int, float]:
    """pid -> create time, to recognise our processes later (a pid may be reused)."""
    out = {}
    for pid in pids:
        try:
            out[pid] = psutil.Process(pid).create_time()
        except psutil.NoSuchProcess:
            pass
    return out


def kill_leftovers(processes: dict[int, float]) -> None:
    """SIGKILL pool processes (pid -> create time) that outlived supervisord; a reused pid is left alone."""
    for pid, created in processes.items():
        try:
            if psutil.Process(pid).create_time() == created:
                log.warning("killing leftover pid=%d", pid)
                os.kill(pid, signal.SIGKILL)
        except (psutil.NoSuchProcess, ProcessLookupError):
            pass


@contextmanager
def running_pool(env: dict, name: str, consumers: int) -> Iterator[SupervisedPool]:
    """The supervised pool, started in a temp folder; its logs on failure, stopped (and leftovers killed) after."""
    processes: dict[int, float] = {}
    with tempfile.TemporaryDirectory(prefix=f"bench-pool-{name}-") as folder:
        pool = SupervisedPool(env, Path(folder))
        try:
            pool.start()
            processes = process_times(pool.pid(f"consumer:consumer-{p}") for p in range(consumers))
            yield pool
        except BaseException:
            log.error("pool logs:\n%s", pool.logs())
            raise
        finally:
            pool.stop()
            kill_leftovers(processes)
