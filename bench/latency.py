"""Produce-to-counted latency at a steady rate, from the workers' own histograms.

Each partition worker records, per counted order, (time its batch was applied
in Redis) - (the order's Kafka timestamp, set by the producer) and publishes the
histogram in its heartbeat (``workers/latency.py``). The pool starts fresh on
empty topics, a warm-up run is produced first, then each repetition runs
``orders produce --rate R --count N``; its figures come from the histograms after
it minus those before it (``max_ms`` is the highest bucket that grew, capped by
the reported maximum), once every counted order is in a published histogram.
"""
from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

from tests.pool import SupervisedPool, run_orders
from workers.clients import make_redis
from workers.latency import merge
from workers.settings import Settings
from workers.store import AggregateStore

from .common import PARTITION_WORKERS, kill_leftovers, process_times

log = logging.getLogger(__name__)


class Histograms:
    """The partition workers' heartbeats: totals counted and merged latency buckets."""

    def __init__(self, settings: Settings):
        self.store = AggregateStore(make_redis(settings), settings.redis_prefix)

    def read(self) -> tuple[int, dict[int, int], int]:
        """(orders counted, merged buckets, max_ms) from one snapshot."""
        snap = self.store.snapshot(0, workers=PARTITION_WORKERS)
        buckets: dict[int, int] = {}
        max_ms = 0
        for beat in filter(None, snap["workers"].values()):
            for k, v in beat["latency"]["buckets"].items():
                buckets[int(k)] = buckets.get(int(k), 0) + v
            max_ms = max(max_ms, beat["latency"]["max_ms"])
        return snap["total"].count, buckets, max_ms

    def wait_published(self, expected: int, timeout: float = 60) -> tuple[dict[int, int], int]:
        """Wait until ``expected`` orders are counted and all of them are in the published histograms."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            counted, buckets, max_ms = self.read()
            if counted >= expected and sum(buckets.values()) >= counted:
                return buckets, max_ms
            time.sleep(0.2)
        raise TimeoutError(f"latency: {expected} orders not counted and published within {timeout} s")


def window(before: dict[int, int], after: dict[int, int], max_ms: int) -> dict:
    """p50/p99/max of the orders counted between two histogram snapshots."""
    delta = {k: v - before.get(k, 0) for k, v in after.items() if v > before.get(k, 0)}
    summary = merge([{"buckets": {str(k): v for k, v in delta.items()}, "max_ms": 0}])
    summary["max_ms"] = min(max(delta), max_ms) if delta else None
    return summary


def measure_latency(env: dict, rate: float, seconds: float, reps: int, warmup_s: float) -> list[dict]:
    """Run the pool fresh and measure ``reps`` windows of ``seconds`` at ``rate`` orders/s."""
    settings = Settings.from_env(env)
    hist = Histograms(settings)
    processes: dict[int, float] = {}
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-pool-") as folder:
        pool = SupervisedPool(env, Path(folder))
        try:
            pool.start()
            processes = process_times(pool.pid(f"consumer:consumer-{p}") for p in range(settings.partitions))
            produced = _produce(env, rate, int(rate * warmup_s))
            buckets, max_ms = hist.wait_published(produced)
            for _ in range(reps):
                produced += _produce(env, rate, int(rate * seconds))
                after, max_ms = hist.wait_published(produced)
                results.append(window(buckets, after, max_ms))
                log.info("latency rate=%s %s", rate, results[-1])
                buckets = after
        except BaseException:
            log.error("pool logs:\n%s", pool.logs())
            raise
        finally:
            pool.stop()
            kill_leftovers(processes)
    return results


def _produce(env: dict, rate: float, count: int) -> int:
    run_orders(env, "produce", "--rate", str(rate), "--count", str(count), timeout=count / rate + 60)
    return count

