"""How fast the pool's Prometheus endpoint (``orders metrics``) answers, with 12 partitions under load.

One supervised pool (3 partition workers, 1 retry worker, the metrics program) on
a 12-partition topic, its producer at ``rate`` orders/s with 10% transient
failures, so the workers write heartbeats and batches while the endpoint reads.
Once every partition has a live owner (read from the endpoint itself) and orders
are being counted, each repetition is ``scrapes`` GETs of /metrics, 0.2 s apart,
each timed from the request to the last byte of the answer on one kept-alive
connection (as Prometheus scrapes). A scrape reads Redis (one pipeline, one
counters read and the heartbeat key scan) and Kafka (metadata and the end
offsets of both topics) at that moment.
"""
from __future__ import annotations

import logging
import statistics
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from workers.settings import Settings

from .common import running_pool

log = logging.getLogger(__name__)

PARTITIONS = 12
PAUSE_S = 0.2


def measure_metrics(env: dict, scrapes: int, reps: int, timeout: float = 120) -> list[dict]:
    """Start the pool on ``env`` (12 partitions) and time ``reps`` x ``scrapes`` scrapes of its endpoint."""
    settings = Settings.from_env(env)
    with running_pool(env, settings.redis_prefix, 3) as pool, httpx.Client(timeout=10) as client:
        url = f"http://127.0.0.1:{pool.env['METRICS_PORT']}/metrics"
        _wait_spread(client, url, timeout)
        return [_window(client, url, scrapes) for _ in range(reps)]


def _owned_and_counting(client: httpx.Client, url: str) -> bool:
    try:
        text = client.get(url).text
    except httpx.HTTPError:
        return False  # the endpoint is still starting
    owners, counted = {}, 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "orders_partition_owners":
                owners[sample.labels["partition"]] = sample.value
            elif sample.name == "orders_global_orders":
                counted = sample.value
    return len(owners) == PARTITIONS and all(v == 1 for v in owners.values()) and counted > 0


def _wait_spread(client: httpx.Client, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not _owned_and_counting(client, url):
        if time.monotonic() > deadline:
            raise TimeoutError(f"metrics: the {PARTITIONS} partitions were not all owned and counting "
                               f"within {timeout} s")
        time.sleep(0.5)


def _window(client: httpx.Client, url: str, scrapes: int) -> dict:
    times_ms = []
    size = 0
    for _ in range(scrapes):
        started = time.perf_counter()
        reply = client.get(url)
        reply.raise_for_status()
        size = len(reply.content)
        times_ms.append((time.perf_counter() - started) * 1000)
        time.sleep(PAUSE_S)
    result = {"median_ms": statistics.median(times_ms), "max_ms": max(times_ms),
              "p90_ms": statistics.quantiles(times_ms, n=10)[-1], "scrapes": scrapes, "bytes": size}
    log.info("metrics scrape %s", {k: round(v, 1) for k, v in result.items()})
    return result
