"""Produce-to-counted latency at a steady rate, from the workers' own histograms.

Each partition worker records, per counted order, (time its batch was applied
in Redis) - (the order's Kafka timestamp, set by the producer) and publishes the
histogram in its heartbeat with every batch (``workers/latency.py``).

The pool starts fresh on empty topics (no backlog). One ``orders produce --rate R``
process runs throughout; once orders are being counted, a warm-up period is
skipped (the producer's first messages wait for its connection and producer id,
up to ~0.5 s: that is start-up, not steady state), then each repetition is a
window of ``seconds``: its figures come from the merged histograms at its end
minus those at its start (``max_ms`` is the highest bucket that grew, capped by
the reported maximum). The producer is stopped (SIGTERM) after the last window.

The same method gives retry lateness (``measure_latency(..., field="lateness")``):
the retry workers' histograms of (time a retry was handled) - (its due time), at a
steady rate with transient failures.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import time

from tests.pool import ORDERS
from workers.clients import make_redis
from workers.latency import merge
from workers.settings import Settings
from workers.store import AggregateStore

from .common import live_workers, running_pool

log = logging.getLogger(__name__)


# The histogram each kind of worker publishes in its heartbeat: role -> field
HISTOGRAMS = {"latency": "consumer", "lateness": "retry"}


class Histograms:
    """One histogram of the workers' heartbeats, merged: partition workers' latency or retry workers' lateness."""

    def __init__(self, settings: Settings, field: str = "latency"):
        self.store = AggregateStore(make_redis(settings), settings.redis_prefix)
        self.field, self.role = field, HISTOGRAMS[field]

    def read(self) -> tuple[int, dict[int, int], int]:
        """(observations, merged buckets, max_ms) from one snapshot."""
        snap = live_workers(self.store)
        buckets: dict[int, int] = {}
        max_ms = 0
        for beat in snap["workers"].values():
            if not beat or beat.get("role") != self.role or self.field not in beat:
                continue
            for k, v in beat[self.field]["buckets"].items():
                buckets[int(k)] = buckets.get(int(k), 0) + v
            max_ms = max(max_ms, beat[self.field]["max_ms"])
        return sum(buckets.values()), buckets, max_ms

    def wait_counting(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.read()[0] == 0:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.field}: nothing recorded within {timeout} s")
            time.sleep(0.1)


def window(before: dict[int, int], after: dict[int, int], max_ms: int) -> dict:
    """count, p50/p99/max (ms) of the orders counted between two histogram snapshots."""
    delta = {k: v - before.get(k, 0) for k, v in after.items() if v > before.get(k, 0)}
    summary = merge([{"buckets": {str(k): v for k, v in delta.items()}, "max_ms": 0}])
    summary["max_ms"] = min(max(delta), max_ms) if delta else None
    return summary


def measure_latency(env: dict, rate: float, seconds: float, reps: int, warmup_s: float,
                    field: str = "latency") -> list[dict]:
    """Run the pool fresh and measure ``reps`` windows of ``seconds`` at ``rate`` orders/s."""
    settings = Settings.from_env(env)
    hist = Histograms(settings, field)
    with running_pool(env, settings.redis_prefix, settings.partitions):
        return _windows(env, hist, rate, seconds, reps, warmup_s)


def _windows(env: dict, hist: Histograms, rate: float, seconds: float, reps: int, warmup_s: float) -> list[dict]:
    count = int(rate * (warmup_s + reps * seconds + 60))  # more than needed: stopped after the last window
    producer = subprocess.Popen([ORDERS, "produce", "--rate", str(rate), "--count", str(count)],
                                env={"PATH": os.environ["PATH"], **env}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    try:
        hist.wait_counting()
        time.sleep(warmup_s)
        _, before, _ = hist.read()
        results = []
        for _ in range(reps):
            time.sleep(seconds)
            _, after, max_ms = hist.read()
            results.append(window(before, after, max_ms))
            log.info("%s rate=%s %s", hist.field, rate, results[-1])
            before = after
        return results
    finally:
        producer.send_signal(signal.SIGTERM)
        try:
            producer.wait(timeout=30)
        except subprocess.TimeoutExpired:
            producer.kill()
            producer.wait()
