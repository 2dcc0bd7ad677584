"""`orders metrics` scraped by a real Prometheus: figures, alerts, dashboard.

The lane's Prometheus (``scripts/stack`` with STACK_PROMETHEUS=1, which
``scripts/test`` sets) scrapes the targets listed in ``$STACK_DIR/prometheus/targets``
and evaluates the shipped ``deploy/prometheus/alerts.yml`` as it is. Each test lists
its own pool there with a ``pool`` label of its own and reads everything back
through Prometheus' HTTP query API.
"""
from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from workers.settings import Settings

from ..conftest import isolated_env
from ..pool import REPO, SupervisedPool, run_orders, stats, wait_until
from .conftest import cleanup

pytestmark = pytest.mark.timeout(300)

ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
SCRAPE_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "orders.json"
METRIC_NAME = re.compile(r"\borders_[a-z0-9_]+")


class Prometheus:
    """The lane's Prometheus: its query API and its file_sd target folder."""

    def __init__(self) -> None:
        self.url = os.environ.get("PROMETHEUS_URL", "http://127.0.0.1:9090")
        self.targets = Path(os.environ.get("STACK_DIR", REPO / ".stack")) / "prometheus" / "targets"

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def add_target(self, pool: str, port: int) -> Path:
        """List 127.0.0.1:port with the label pool=<pool>; written whole (file_sd may read at any time)."""
        self.targets.mkdir(parents=True, exist_ok=True)
        path = self.targets / f"{pool}.json"
        part = path.with_suffix(".part")
        part.write_text(json.dumps([{"targets": [f"127.0.0.1:{port}"], "labels": {"pool": pool}}]))
        part.rename(path)
        return path

    def query(self, expr: str) -> list[dict]:
        """An instant query's result vector; fails on an error (a bad expression too)."""
        reply = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10).json()
        assert reply["status"] == "success", f"{expr}: {reply}"
        return reply["data"]["result"]

    def value(self, expr: str) -> float | None:
        """The single value of ``expr``, or None when it has no result."""
        result = self.query(expr)
        assert len(result) <= 1, f"{expr}: more than one series: {result}"
        return float(result[0]["value"][1]) if result else None

    def by(self, label: str, expr: str) -> dict[str, float]:
        return {r["metric"].get(label, ""): float(r["value"][1]) for r in self.query(expr)}

    def alerts(self, name: str, pool: str) -> list[dict]:
        reply = httpx.get(f"{self.url}/api/v1/alerts", timeout=10).json()
        return [a for a in reply["data"]["alerts"]
                if a["labels"].get("alertname") == name and a["labels"].get("pool") == pool]


@pytest.fixture(scope="module")
def prometheus() -> Prometheus:
    prom = Prometheus()
    if not prom.ready():
        pytest.fail(f"no Prometheus at {prom.url}: scripts/test starts it (STACK_PROMETHEUS=1 scripts/stack up)",
                    pytrace=False)
    return prom


@pytest.fixture
def scraped_pool(prometheus: Prometheus, tmp_path: Path) -> Iterator[tuple[SupervisedPool, dict, str]]:
    """A supervised pool with 30% transient failures whose endpoint the lane's Prometheus scrapes."""
    # 30%: 4 failed attempts in a row (a dead letter) for 0.8% of the orders, 16 of 2,000 expected
    env = isolated_env("metrics", ORDERS_FAILURE_RATE="0.3", RETRY_BACKOFF_MS="200", BATCH_SIZE="500")
    pool_label = env["REDIS_PREFIX"]
    env["ORDERS_HOST"] = pool_label  # this pool's own host: its per-process series are told apart
    pool = SupervisedPool(env, tmp_path)
    target = prometheus.add_target(pool_label, int(pool.env["METRICS_PORT"]))
    try:
        pool.start()
        yield pool, env, pool_label
    finally:
        pool.stop()
        target.unlink(missing_ok=True)
        cleanup(Settings.from_env(env))


def status(env: dict) -> dict:
    return json.loads(run_orders(env, "status", "--json", "--interval", "0.2").stdout)


def dlq_summary(env: dict) -> dict:
    return json.loads(run_orders(env, "dlq", "--summary", "--json").stdout)


def test_prometheus_sees_the_pool_figures(scraped_pool, prometheus: Prometheus):
    pool, env, label = scraped_pool
    sel = f'{{pool="{label}"}}'
    # Lag first: the producer and the partition workers stopped, then 2,000 orders produced.
    pool.ctl("stop", "producer", check=True)
    pool.ctl("stop", "consumer:*", check=True)
    run_orders(env, "produce", "--count", "2000", "--seed", "5")
    before = status(env)["partitions"]
    lags = {str(p["partition"]): p["end_offset"] - (p["position"] or 0) for p in before}
    assert sum(lags.values()) >= 2000
    wait_until(lambda: prometheus.by("partition", f"orders_consumer_lag_offsets{sel}") == lags,
               "Prometheus shows the lag of each partition", timeout=60)

    pool.ctl("start", "consumer:*", check=True)
    # Quiet: every order on the topic counted or dead-lettered (stats and the DLQ read by the CLI;
    # `orders produce` is not transactional: each offset is an order).
    produced = sum(p["end_offset"] for p in before)
    wait_until(lambda: stats(env)["count"] + dlq_summary(env)["total"] == produced,
               "every order counted or dead-lettered", timeout=120, interval=1)
    counted, summary = stats(env), dlq_summary(env)
    assert summary["total"] > 0 and summary["total"] == sum(r["count"] for r in summary["by_error_type"].values())

    def prometheus_agrees() -> bool:
        return (prometheus.value(f"orders_global_orders{sel}") == counted["count"]
                and prometheus.value(f"sum(orders_counted_total{sel})") == counted["count"]
                and prometheus.by("partition", f"orders_counted_total{sel}")
                == {str(p["partition"]): p["count"] for p in counted["partitions"]}
                and prometheus.by("partition", f"orders_consumer_lag_offsets{sel}") == dict.fromkeys(lags, 0.0)
                and prometheus.by("error_type", f"orders_dlq_messages{sel}")
                == {t: row["count"] for t, row in summary["by_error_type"].items()}
                and prometheus.value(f"sum(orders_dead_lettered_total{sel})") == summary["total"])
    wait_until(prometheus_agrees, "Prometheus' figures equal orders stats and orders dlq --summary", timeout=60)
    assert prometheus.value(f"orders_global_value{sel}") == pytest.approx(counted["sum"])
    assert prometheus.value(f"orders_global_average_price{sel}") == pytest.approx(counted["average"])
    assert (prometheus.value(f"sum(orders_retried_total{sel})") or 0) > 0

    # The latency histogram: observations, in buckets from 1 ms to 60 s.
    buckets = prometheus.by("le", f"sum by (le) (orders_latency_seconds_bucket{sel})")
    assert {"0.001", "60", "+Inf"} <= set(buckets)
    assert buckets["+Inf"] > 0
    assert buckets["+Inf"] == prometheus.value(f"sum(orders_latency_seconds_count{sel})")
    assert (prometheus.value(f"sum(orders_latency_seconds_sum{sel})") or 0) > 0

    check_dashboard_and_rules(pool, prometheus)


def check_dashboard_and_rules(pool: SupervisedPool, prometheus: Prometheus) -> None:
    """Every metric the dashboard and the alert rules name is one the endpoint exports (a real
    scrape), and each dashboard query runs in Prometheus."""
    scrape = httpx.get(f"http://127.0.0.1:{pool.env['METRICS_PORT']}/metrics", timeout=10)
    exported = {sample.name for family in text_string_to_metric_families(scrape.text) for sample in family.samples}
    queries = [target["expr"] for panel in json.loads(DASHBOARD.read_text())["panels"]
               for target in panel["targets"]]
    assert len(queries) >= 15
    used = {name for expr in queries for name in METRIC_NAME.findall(expr)}
    assert used - exported == set(), f"the dashboard queries metrics the endpoint does not export: {used - exported}"
    rules = set(METRIC_NAME.findall(ALERTS.read_text()))
    assert rules - exported == set(), f"the alert rules name metrics the endpoint does not export: {rules - exported}"
    for expr in queries:
        # Grafana's $__rate_interval is Grafana's; any range does for Prometheus.
        prometheus.query(expr.replace("$__rate_interval", "1m"))


def test_shipped_rules_and_scrape_config_pass_promtool():
    for args in (["check", "rules", str(ALERTS)], ["check", "config", str(SCRAPE_CONFIG)]):
        result = subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"promtool {' '.join(args)}: {result.stdout}{result.stderr}"


def restarted(pool: SupervisedPool, name: str, old_pid: int) -> bool:
    """supervisor runs ``name`` again: a new pid, RUNNING (past startsecs)."""
    return pool.statuses().get(name) == "RUNNING" and pool.pid(name) not in (0, old_pid)


def test_a_crash_looping_worker_fires_its_alert(scraped_pool, prometheus: Prometheus):
    pool, env, label = scraped_pool
    worker = f"{label}-consumer-0"  # ORDERS_HOST is the pool's label (see scraped_pool)
    restarts = f'orders_worker_restarts_total{{pool="{label}",worker="{worker}"}}'
    # The event listener made the counter (at 0) when the worker started: the first crash is an increase.
    wait_until(lambda: prometheus.value(restarts) == 0, "the restart counter is scraped at 0", timeout=60)
    for _ in range(3):
        killed = pool.kill("consumer:consumer-0", signal.SIGKILL)
        wait_until(functools.partial(restarted, pool, "consumer:consumer-0", killed), "consumer-0 restarted",
                   timeout=60)
    wait_until(lambda: prometheus.value(restarts) == 3, "three restarts counted", timeout=60)
    firing = wait_until(lambda: [a for a in prometheus.alerts("OrdersWorkerCrashLooping", label)
                                 if a["state"] == "firing"], "OrdersWorkerCrashLooping fires", timeout=60)
    assert {a["labels"]["worker"] for a in firing} == {worker}
    assert firing[0]["labels"]["host"] == label
