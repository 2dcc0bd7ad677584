"""Test helpers: run the real supervisor.conf / Procfile in a private folder, read topics.

The pool's config files are used as they are; only their folder differs
(``%(here)s`` points at a temp dir holding a copy and a link to the repo's
.venv), so a test never touches a pool the user runs from the repo.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import psutil
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from workers import envelope as env_headers
from workers.clients import make_registry
from workers.errors import OrderError
from workers.processing import attempt_fails, price_cents, validate
from workers.serde import OrderSerde, load_schema
from workers.settings import Settings

REPO = Path(__file__).resolve().parent.parent
ORDERS = str(REPO / ".venv" / "bin" / "orders")
STACK = str(REPO / "scripts" / "stack")
T = TypeVar("T")


def run_orders(env: dict, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    """Run the ``orders`` CLI with exactly ``env`` (plus PATH) and return its output."""
    full = {"PATH": os.environ["PATH"], **env}
    result = subprocess.run([ORDERS, *args], env=full, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"orders {' '.join(args)} exited {result.returncode}: {result.stderr[-3000:]}")
    return result


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a pool's metrics endpoint: pools run side by side)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SupervisedPool:
    """supervisord with the repo's supervisor.conf, in its own folder."""

    def __init__(self, env: dict, folder: Path, prefix: tuple[str, ...] = ()):
        """``prefix`` runs supervisord under a command (``ip netns exec <ns>``: a host in a namespace)."""
        # As scripts/start does: three partition workers and one retry worker by default.
        self.env = {"PATH": os.environ["PATH"], "ORDERS_WORKERS": "3", "RETRY_WORKERS": "1",
                    "METRICS_PORT": str(free_port()), **env}
        self.folder = folder
        self.prefix = list(prefix)
        shutil.copy(REPO / "supervisor.conf", folder / "supervisor.conf")
        (folder / ".venv").symlink_to(REPO / ".venv")
        (folder / "run").mkdir()
        self.ctl_base = [str(REPO / ".venv/bin/supervisorctl"), "-c", str(folder / "supervisor.conf")]

    def start(self, timeout: float = 60) -> None:
        subprocess.run([*self.prefix, str(REPO / ".venv/bin/supervisord"), "-c", str(self.folder / "supervisor.conf")],
                       env=self.env, check=True, cwd=self.folder)
        self.wait_all_running(timeout)

    def ctl(self, *args: str, check: bool = False) -> str:
        result = subprocess.run([*self.ctl_base, *args], capture_output=True, text=True, env=self.env, timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(f"supervisorctl {args}: {result.stdout} {result.stderr}")
        return result.stdout

    def statuses(self) -> dict[str, str]:
        out = {}
        for line in self.ctl("status").splitlines():
            parts = line.split()
            if len(parts) >= 2:
                out[parts[0]] = parts[1]
        return out

    def wait_all_running(self, timeout: float = 60, stopped: tuple[str, ...] = ()) -> dict[str, str]:
        """Wait until every program is RUNNING (except those the test ``stopped``)."""
        deadline = time.monotonic() + timeout
        statuses = {}
        while time.monotonic() < deadline:
            statuses = self.statuses()
            if len(statuses) == self.programs and all(s == "RUNNING" for n, s in statuses.items() if n not in stopped):
                return statuses
            time.sleep(0.5)
        raise AssertionError(f"not all programs RUNNING: {statuses}\n{self.logs()}")

    @property
    def programs(self) -> int:
        """How many programs supervisord runs: the workers of both roles, the producer, the viewer,
        the metrics endpoint and the event listener."""
        return int(self.env["ORDERS_WORKERS"]) + int(self.env["RETRY_WORKERS"]) + 4

    def kill_host(self) -> None:
        """SIGKILL supervisord and every process it started, as if the host died."""
        pid = int((self.folder / "run" / "supervisord.pid").read_text())
        try:
            supervisord = psutil.Process(pid)
            for proc in [supervisord, *supervisord.children(recursive=True)]:
                proc.kill()
        except psutil.NoSuchProcess:
            pass

    def pid(self, name: str) -> int:
        return int(self.ctl("pid", name).strip())

    def kill(self, name: str, sig: signal.Signals) -> int:
        pid = self.pid(name)
        os.kill(pid, sig)
        return pid

    def logs(self, tail: int = 30) -> str:
        chunks = []
        for path in sorted((self.folder / "run").glob("*.log")):
            lines = path.read_text(errors="replace").splitlines()[-tail:]
            chunks.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(chunks)

    def stop(self) -> None:
        pidfile = self.folder / "run" / "supervisord.pid"
        if not pidfile.exists():
            return
        pid = int(pidfile.read_text())
        try:
            children = psutil.Process(pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return
        self.ctl("shutdown")
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            if not psutil.pid_exists(pid):
                return
            time.sleep(0.2)
        # supervisord did not finish: kill it and the programs it had started, by pid
        for proc in [psutil.Process(pid), *children]:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass


def read_retries(settings: Settings) -> list:
    """Every committed message of every delay level's retry topic (today's settings)."""
    return [msg for topic in settings.retry_topics for msg in read_topic(settings.bootstrap_servers, topic)]


def read_topic(bootstrap: str, topic: str, timeout: float = 30) -> list:
    """Every committed message of ``topic``, from the start to its current end."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "test-reader", "enable.auto.commit": False,
                         "isolation.level": "read_committed"})
    try:
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        parts = sorted(meta.partitions)
        ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts}
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        out = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for msg in consumer.consume(1000, 0.5):
                if msg.error() is None:
                    out.append(msg)
            positions = consumer.position([TopicPartition(topic, p) for p in parts])
            if all(tp.offset >= ends[tp.partition] or ends[tp.partition] == 0 for tp in positions):
                return out
        raise AssertionError(f"could not read {topic} to its end")
    finally:
        consumer.close()


def stack(*args: str, env: dict | None = None) -> None:
    """Run ``scripts/stack`` (stop, start, restart a service); ``env`` replaces the environment."""
    subprocess.run([STACK, *args], env=env, check=True, stdout=subprocess.DEVNULL, timeout=240)


class PartitionTotals:
    """Counted orders and cents per partition of ``orders``, and their sums."""

    def __init__(self) -> None:
        self.count_by_partition: dict[int, int] = {}
        self.cents_by_partition: dict[int, int] = {}

    def add(self, partition: int, cents: int) -> None:
        self.count_by_partition[partition] = self.count_by_partition.get(partition, 0) + 1
        self.cents_by_partition[partition] = self.cents_by_partition.get(partition, 0) + cents

    @property
    def count(self) -> int:
        return sum(self.count_by_partition.values())

    @property
    def cents(self) -> int:
        return sum(self.cents_by_partition.values())


class Truth(PartitionTotals):
    """What the aggregate must be, computed from the orders topic itself."""

    def __init__(self, orders: list, serde: OrderSerde, settings):
        self.decoded: dict[str, dict] = {}
        self.undecodable = 0
        super().__init__()
        self.expected_dead: set[str] = set()
        self.total = len(orders)
        for msg in orders:
            try:
                order = serde.decode(msg.value())
                validate(order, max_price=settings.max_price)
            except OrderError:
                self.undecodable += 1
                continue
            self.decoded[order["orderId"]] = order
            attempts = range(1, settings.max_attempts + 1)
            if all(attempt_fails(order["orderId"], a, settings.failure_rate) for a in attempts):
                self.expected_dead.add(order["orderId"])
                continue
            self.add(msg.partition(), price_cents(order))


def wait_until(check: Callable[[], T | None], what: str, timeout: float = 60, interval: float = 0.5) -> T:
    """Call ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"not true after {timeout}s: {what}")
        time.sleep(interval)


def status_json(env: dict) -> dict:
    """`orders status --json`: one snapshot of the pool."""
    return json.loads(run_orders(env, "status", "--json", "--interval", "0.5").stdout)


def stats(env: dict) -> dict:
    return json.loads(run_orders(env, "stats", "--json").stdout)


def dead_letters(env: dict) -> list[dict]:
    return [json.loads(line) for line in run_orders(env, "dlq", "--json").stdout.splitlines() if line.strip()]


def wait_until_quiet(env: dict, expected_count: int, expected_dead: int, timeout: float = 120) -> tuple[dict, list]:
    """Poll stats and the DLQ until they reach the expected totals and stay there."""
    deadline = time.monotonic() + timeout
    last: tuple[int, int | None] | None = None
    while time.monotonic() < deadline:
        s = stats(env)
        if s["count"] >= expected_count:
            dlq = dead_letters(env)
            if s["count"] == expected_count and len(dlq) >= expected_dead:
                time.sleep(2)  # and nothing more arrives
                s2, dlq2 = stats(env), dead_letters(env)
                if s2 == s and len(dlq2) == len(dlq):
                    return s2, dlq2
            last = (s["count"], len(dlq))
        else:
            last = (s["count"], None)
        time.sleep(1)
    raise AssertionError(f"not quiet after {timeout}s: (count, dlq)={last}, "
                         f"expected ({expected_count}, {expected_dead})")


def check_invariants(env: dict, settings: Settings) -> Truth:
    serde = OrderSerde(make_registry(settings), load_schema(settings.schema_path))
    truth = Truth(read_topic(settings.bootstrap_servers, settings.orders_topic), serde, settings)
    stats, dlq = wait_until_quiet(env, truth.count, len(truth.expected_dead) + truth.undecodable)
    dlq_ids = [d["order"]["orderId"] for d in dlq if d["order"]]
    assert len(dlq_ids) == len(set(dlq_ids)), "an order was dead-lettered twice"
    assert set(dlq_ids) == truth.expected_dead
    assert stats["count"] + len(dlq) == truth.total
    assert stats["count"] == truth.count
    assert round(stats["sum"] * 100) == truth.cents
    assert stats["average"] == pytest.approx(truth.cents / truth.count / 100)
    for p in stats["partitions"]:
        assert p["count"] == truth.count_by_partition.get(p["partition"], 0)
    for d in dlq:
        assert d["error_type"] == "DownstreamUnavailable"
        assert d["attempts"] == settings.max_attempts
        assert d["original_topic"] == settings.orders_topic
        assert d["original_partition"] in range(settings.partitions)
        assert d["original_offset"] >= 0
        assert d["first_failed_at"] <= d["dead_lettered_at"]
    check_retries_waited(settings)
    return truth


def check_retries_waited(settings: Settings) -> None:
    """Each retry step was taken no earlier than the due time of the step before it."""
    steps: dict[str, list[tuple[int, int, int]]] = {}
    for msg in read_retries(settings):
        h = env_headers.header_dict(msg.headers())
        attempt, due = env_headers.retry_attempt(h)
        steps.setdefault(msg.key().decode(), []).append((attempt, due, msg.timestamp()[1]))
    dead = {msg.key().decode(): msg.timestamp()[1]
            for msg in read_topic(settings.bootstrap_servers, settings.dlq_topic)}
    assert steps, "the failure rate should have produced retries"
    for key, chain in steps.items():
        chain.sort()
        assert [a for a, _, _ in chain] == list(range(2, 2 + len(chain))), f"{key}: attempts {chain}"
        for (_, due, _), (_, _, next_published) in zip(chain, chain[1:], strict=False):  # each step with the next
            assert next_published >= due, f"{key}: retried {due - next_published} ms early"
        if key in dead:
            assert dead[key] >= chain[-1][1], f"{key}: dead-lettered before its last retry was due"


class LogTruth(PartitionTotals):
    """What the aggregate must be, read from the log alone, whatever settings decided it.

    Every order on the orders topic is counted once unless the DLQ holds it; the
    checker needs no knowledge of failure rates, so it holds across runs under
    different settings.
    """

    def __init__(self, settings: Settings):
        serde = OrderSerde(make_registry(settings), load_schema(settings.schema_path))
        dead = [env_headers.header_dict(m.headers()) for m in read_topic(settings.bootstrap_servers,
                                                                           settings.dlq_topic)]
        self.dead_origins = [(h[env_headers.ORIGINAL_TOPIC], int(h[env_headers.ORIGINAL_PARTITION]),
                              int(h[env_headers.ORIGINAL_OFFSET])) for h in dead]
        dead_set = set(self.dead_origins)
        super().__init__()
        self.total = 0
        for msg in read_topic(settings.bootstrap_servers, settings.orders_topic):
            self.total += 1
            if (msg.topic(), msg.partition(), msg.offset()) in dead_set:
                continue
            order = serde.decode(msg.value())
            self.add(msg.partition(), price_cents(order))

    def matches(self, s: dict) -> bool:
        return (s["count"] == self.count and round(s["sum"] * 100) == self.cents
                and all(p["count"] == self.count_by_partition.get(p["partition"], 0) for p in s["partitions"]))


def check_exact(env: dict, settings: Settings, timeout: float = 120) -> LogTruth:
    """Wait until ``orders stats`` equals the truth read from the log and stays there; check the DLQ.

    No order is dead-lettered twice, and none is both counted and dead-lettered.
    """
    deadline = time.monotonic() + timeout
    last = None
    while True:
        truth = LogTruth(settings)
        s = stats(env)
        if truth.matches(s):
            time.sleep(2)  # and nothing more arrives
            again = LogTruth(settings)
            if again.matches(stats(env)) and len(again.dead_origins) == len(truth.dead_origins):
                break
        last = (s["count"], truth.count, len(truth.dead_origins))
        if time.monotonic() > deadline:
            raise AssertionError(f"stats never matched the log after {timeout}s: (count, truth, dead)={last}")
        time.sleep(1)
    assert len(truth.dead_origins) == len(set(truth.dead_origins)), "an order was dead-lettered twice"
    assert truth.count + len(truth.dead_origins) == truth.total
    return truth
