"""The pipeline: the real supervisor.conf pool draining the pre-produced backlog into Redis.

Method. The pool (3 partition workers, the retry worker, an idle producer and the
DLQ viewer) starts on a backlog that is already in Kafka. A watcher thread reads
the three ``orders`` sources from Redis every 20 ms in one MULTI: each source
holds the offset it has handled up to, how many orders it counted (first-attempt
successes only: retried orders are counted under the retry topic's sources) and
``updated_ms``, the worker's clock when it applied its last batch. Since nothing
is counted between the last apply and the read, (max ``updated_ms``, sum
``counted``) is an exact point of the counted-over-time curve, whatever the
polling delay. Orders/s = (counted at the end - counted at the first point
where all three workers have applied a batch) / (time between the two points).

The same watcher samples the RSS of every pool worker (pids from their Redis
heartbeats) every 100 ms and keeps each one's peak.
"""
from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from tests.pool import SupervisedPool
from workers.clients import make_redis
from workers.settings import Settings
from workers.store import AggregateStore, Source

from .common import kill_leftovers, live_workers

log = logging.getLogger(__name__)

POLL_S = 0.02
RSS_EVERY = 5   # polls


@dataclass(frozen=True)
class Point:
    at_ms: int      # the worker clock of the last batch applied
    counted: int    # first-attempt successes counted so far
    handled: int    # messages of the orders topic handled so far (counted, retried or dead-lettered)


class Watcher(threading.Thread):
    """Samples the orders sources and the workers' RSS until every message is handled."""

    def __init__(self, store: AggregateStore, sources: list[Source], total: int):
        super().__init__(daemon=True)
        self.store, self.sources, self.total = store, sources, total
        self.first: Point | None = None
        self.last: Point | None = None
        self.rss_peak: dict[str, int] = {}
        self.processes: dict[int, float] = {}   # pid -> create time, for clean-up
        self.error: BaseException | None = None
        self.finished = threading.Event()

    def run(self) -> None:
        try:
            polls = 0
            while not self.finished.is_set():
                snap = live_workers(self.store, self.sources)
                self._record(snap["sources"])
                if polls % RSS_EVERY == 0:
                    self._sample_rss(snap["workers"])
                polls += 1
                if self.last is not None:
                    self._sample_rss(snap["workers"])
                    self.finished.set()
                    return
                time.sleep(POLL_S)
        except BaseException as exc:  # reported by wait()
            self.error = exc
            self.finished.set()

    def _record(self, sources: dict) -> None:
        states = [sources[s] for s in self.sources]
        if not all("updated_ms" in st for st in states):
            return
        point = Point(max(st["updated_ms"] for st in states), sum(st.get("counted", 0) for st in states),
                      sum(st["offset"] for st in states))
        if self.first is None:
            self.first = point
        if point.handled >= self.total:
            self.last = point

    def _sample_rss(self, beats: dict) -> None:
        for name, beat in beats.items():
            if not beat:
                continue
            try:
                proc = psutil.Process(beat["pid"])
                rss = proc.memory_info().rss
                self.processes.setdefault(proc.pid, proc.create_time())
            except psutil.NoSuchProcess:
                continue
            self.rss_peak[name] = max(self.rss_peak.get(name, 0), rss)

    def wait(self, timeout: float) -> None:
        if not self.finished.wait(timeout):
            raise TimeoutError(f"the pool did not handle {self.total} orders in {timeout:.0f} s "
                               f"(last point {self.first and self.last})")
        if self.error is not None:
            raise self.error


WORKERS_PER_POOL = 3  # partition workers per pool: the ORDERS_WORKERS that tests/pool.py gives supervisor.conf


def wait_spread(store: AggregateStore, sources: list[Source], hosts: int, timeout: float = 90) -> None:
    """Until each source is owned by exactly one live worker, ``hosts`` hosts own some, and every
    partition worker owns some (as many as there are partitions to go round; heartbeats say)."""
    wanted = {str(s) for s in sources}
    workers = min(len(wanted), WORKERS_PER_POOL * hosts)
    deadline = time.monotonic() + timeout
    while True:
        beats = [b for b in live_workers(store)["workers"].values() if b and b.get("role") == "consumer"]
        owners = Counter(s for b in beats for s in b.get("positions", {}) if s in wanted)
        holding = [b for b in beats if wanted & set(b.get("positions", {}))]
        owning = {b.get("host") for b in holding}
        if all(owners[s] == 1 for s in wanted) and len(owning) == hosts and len(holding) == workers:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"the partitions were not spread over {workers} workers on {hosts} hosts in "
                               f"{timeout:.0f} s: owners={dict(owners)} hosts={sorted(map(str, owning))}")
        time.sleep(0.2)


def drain(env: dict, total: int, timeout: float, hosts: int = 1,
          feed: Callable[[], None] | None = None) -> dict:
    """Start the supervised pool on the backlog and wait until it has handled ``total`` orders.

    With ``hosts`` > 1, that many pools (supervisord instances with their own
    ORDERS_HOST, as on separate machines) share the backlog through the consumer group.
    With ``feed``, the pools start on an empty topic; once the group has spread its
    partitions over them, ``feed`` writes the ``total`` orders (pools started one
    after another would otherwise let the first drain most of a backlog alone).
    """
    settings = Settings.from_env(env)
    store = AggregateStore(make_redis(settings), settings.redis_prefix)
    watcher = Watcher(store, [Source(settings.orders_topic, p) for p in range(settings.partitions)], total)
    with tempfile.TemporaryDirectory(prefix=f"bench-pool-{settings.redis_prefix}-") as folder:
        pools = []
        for n in range(hosts):
            (Path(folder) / str(n)).mkdir()
            host_env = {**env, "ORDERS_HOST": f"bench-host-{n}"} if hosts > 1 else env
            pools.append(SupervisedPool(host_env, Path(folder) / str(n)))
        watcher.start()
        try:
            for pool in pools:
                pool.start()
            if feed is not None:
                wait_spread(store, watcher.sources, hosts)
                feed()
            watcher.wait(timeout)
        except BaseException:
            for pool in pools:
                log.error("pool logs:\n%s", pool.logs())
            raise
        finally:
            watcher.finished.set()
            for pool in pools:
                pool.stop()
            kill_leftovers(watcher.processes)
    return summarise(watcher, settings.failure_rate)


def summarise(watcher: Watcher, failure_rate: float) -> dict:
    first, last = watcher.first, watcher.last
    if first is None or last is None:
        raise RuntimeError("the pool counted nothing while it was watched")
    window_s = (last.at_ms - first.at_ms) / 1000
    if window_s <= 0:
        raise RuntimeError("the backlog was drained in one batch per worker: produce more orders")
    result = {
        "orders_per_s": (last.counted - first.counted) / window_s,     # counted on the first attempt
        "handled_per_s": (last.handled - first.handled) / window_s,    # every message of the backlog
        "counted": last.counted,
        "window_s": window_s,
        "rss_peak_mb": {name: round(rss / 2**20, 1) for name, rss in sorted(watcher.rss_peak.items())},
    }
    log.info("pipeline failure_rate=%s counted=%d window_s=%.3f orders_per_s=%.0f handled_per_s=%.0f rss_mb=%s",
             failure_rate, last.counted, window_s, result["orders_per_s"], result["handled_per_s"],
             result["rss_peak_mb"])
    return result
