"""Scale out on the test bed (tests/bed.py: 3 Kafka brokers, a 3-master Redis Cluster with
a replica each): several "hosts" (supervisord instances side by side, each with its
own ORDERS_HOST, run folder and control socket) share a 12-partition topic through
Kafka's consumer groups. Under load, with orders made by the test, every run ends
exact: count, sum, average and per-partition figures equal the truth read from the
log, and no order is both counted and dead-lettered (tests/pool.py check_exact).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from confluent_kafka.admin import NewPartitions

from workers.clients import make_admin
from workers.settings import Settings

from ..bed import GROUP_SESSION_S, REDIS_NODES, Bed
from ..conftest import isolated_env
from ..pool import ORDERS, SupervisedPool, check_exact, run_orders, stack, stats, wait_until
from .conftest import cleanup

# One lane runs every test on the bed (tests/integration/conftest.py ``bed``).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(480), pytest.mark.xdist_group("cluster-bed")]

PARTITIONS = 12
LOAD, RATE = 12_000, 800
# The bed's group session: a dead member's partitions move after it. A dead host's
# open transaction keeps its partitions' committed offsets unreadable until the
# broker expires it (TRANSACTION_TIMEOUT_MS, 10 s, plus the broker's 1 s abort check):
# the new owner cannot load K before. The bound on top: `orders status` calls a
# worker alive for 10 s after its last heartbeat, a new owner beats every 2 s and
# loads the partition's state (~1-3 s on two busy cores); 20 s covers that with room.
SESSION_S = GROUP_SESSION_S
TRANSACTION_TIMEOUT_S = 10 + 1
TAKEOVER_BOUND_S = max(SESSION_S, TRANSACTION_TIMEOUT_S) + 20


@pytest.fixture
def env(bed: Bed) -> Iterator[dict]:
    env = isolated_env("scale", ORDERS_PARTITIONS=str(PARTITIONS), RETRY_PARTITIONS="4",
                       ORDERS_FAILURE_RATE="0.2", RETRY_BACKOFF_MS="200", PRODUCE_RATE="0.001",
                       **bed.pool_env)
    yield env
    cleanup(Settings.from_env(env))


@pytest.fixture
def hosts(env: dict, tmp_path: Path) -> Iterator[Callable[..., SupervisedPool]]:
    """Start a host: ``hosts("host-a", workers=3)``; every one is stopped at the end."""
    started: list[SupervisedPool] = []

    def start(name: str, workers: int = 3, retry_workers: int = 1) -> SupervisedPool:
        folder = tmp_path / name
        folder.mkdir()
        host = SupervisedPool({**env, "ORDERS_HOST": name, "ORDERS_WORKERS": str(workers),
                               "RETRY_WORKERS": str(retry_workers)}, folder)
        started.append(host)
        host.start()
        return host

    yield start
    for host in started:
        host.stop()


def start_load(env: dict, tmp_path: Path, count: int = LOAD, rate: int = RATE) -> subprocess.Popen:
    # The producer looks for new partitions every 2 s (librdkafka's default is 5 minutes).
    return subprocess.Popen([ORDERS, "produce", "--count", str(count), "--rate", str(rate),
                             "--record", str(tmp_path / "delivered.jsonl")],
                            env={**env, "PATH": "/usr/bin:/bin", "KAFKA_TOPIC_METADATA_REFRESH_INTERVAL_MS": "2000"},
                            stderr=subprocess.DEVNULL)


def finish_load(load: subprocess.Popen, timeout: float = 180) -> None:
    assert load.wait(timeout) == 0, "the producer reported undelivered orders"


def stop_load(load: subprocess.Popen) -> None:
    """Stop an unbounded load (``count=0``): it flushes, and exits 0 if every order was delivered."""
    load.send_signal(signal.SIGTERM)
    finish_load(load, timeout=120)


def status(env: dict) -> dict:
    return json.loads(run_orders(env, "status", "--json").stdout)


def owners(env: dict) -> dict[int, str | None]:
    """Partition -> the host of its live owner (None: nobody, or a move in progress)."""
    return {p["partition"]: (None if p["moving"] else p["host"]) for p in status(env)["partitions"]}


def wait_spread(env: dict, hosts: set[str], partitions: int = PARTITIONS, timeout: float = 60) -> dict[int, str | None]:
    """Wait until every partition (and every retry partition) is owned, and every one of ``hosts`` owns some."""
    def spread() -> dict | None:
        snap = status(env)
        owned = {p["partition"]: p["host"] for p in snap["partitions"] if not p["moving"]}
        done = (len(snap["partitions"]) == partitions and set(owned) == set(range(partitions))
                and set(owned.values()) == hosts and not snap["retry"]["unowned"] and snap["retry"]["alive"])
        return owned if done else None
    return wait_until(spread, f"all {partitions} partitions owned by {sorted(hosts)}", timeout=timeout)


def test_a_dead_hosts_partitions_move_to_the_survivor(env, hosts, tmp_path):
    """Host A's supervisord and all its children are SIGKILLed mid-run: host B takes over every partition."""
    settings = Settings.from_env(env)
    host_a = hosts("host-a")
    hosts("host-b")
    wait_spread(env, {"host-a", "host-b"})
    load = start_load(env, tmp_path)
    wait_until(lambda: stats(env)["count"] > 2000, "the pool counts under load")
    host_a.kill_host()
    killed_at = time.monotonic()
    # Within the group session plus the stated bound, host B owns everything...
    wait_spread(env, {"host-b"}, timeout=TAKEOVER_BOUND_S)
    print(f"takeover_s={time.monotonic() - killed_at:.1f} bound_s={TAKEOVER_BOUND_S}")  # for the docs (pytest -s)
    finish_load(load)
    # ... and counted every order exactly once, the dead host's unfinished work included.
    check_exact(env, settings, timeout=180)


def test_a_host_that_joins_gets_partitions(env, hosts, tmp_path):
    """A third host joins mid-run: partitions move to it, and nothing is lost or counted twice."""
    settings = Settings.from_env(env)
    hosts("host-a")
    hosts("host-b")
    wait_spread(env, {"host-a", "host-b"})
    load = start_load(env, tmp_path)
    wait_until(lambda: stats(env)["count"] > 2000, "the pool counts under load")
    hosts("host-c", workers=2)
    def host_c_owns() -> dict[int, str | None] | None:
        owned = owners(env)
        return owned if "host-c" in owned.values() else None
    owned = wait_until(host_c_owns, "host-c owns partitions", timeout=60)
    assert set(owned.values()) >= {"host-a", "host-b", "host-c"}, owned
    finish_load(load)
    check_exact(env, settings, timeout=180)


def test_partitions_added_to_the_live_topic_get_workers_and_are_counted(env, hosts, tmp_path):
    """The orders topic grows from 12 to 16 partitions under load: the new ones are owned and counted."""
    settings = Settings.from_env(env)
    hosts("host-a")
    hosts("host-b")
    wait_spread(env, {"host-a", "host-b"})
    load = start_load(env, tmp_path, count=0)  # unbounded: it produces until the fault is over
    wait_until(lambda: stats(env)["count"] > 1000, "the pool counts under load")
    admin = make_admin(settings)
    admin.create_partitions([NewPartitions(settings.orders_topic, PARTITIONS + 4)])[settings.orders_topic].result(30)
    wait_spread(env, {"host-a", "host-b"}, partitions=PARTITIONS + 4)
    wait_until(lambda: all(p["count"] > 0 for p in stats(env)["partitions"][PARTITIONS:]),
               "orders of the new partitions are counted", timeout=90)
    stop_load(load)
    check_exact(env, settings, timeout=180)


def test_a_paused_worker_whose_partitions_moved_is_fenced(env, hosts, tmp_path):
    """A worker is SIGSTOPped past its group session, then continued: a zombie with a batch in flight.

    Its partitions move to the others meanwhile. When it runs again, Kafka fences
    its transaction (KIP-447: the group's generation in send_offsets_to_transaction)
    and the batch script refuses its Redis writes where the new owner moved R on
    (STATE_AHEAD), so nothing it decided is published or counted twice.
    """
    settings = Settings.from_env(env)
    host_a = hosts("host-a")
    hosts("host-b")
    wait_spread(env, {"host-a", "host-b"})
    load = start_load(env, tmp_path)
    wait_until(lambda: stats(env)["count"] > 2000, "the pool counts under load")
    zombie = host_a.pid("consumer:consumer-0")
    os.kill(zombie, signal.SIGSTOP)
    try:
        time.sleep(SESSION_S + 8)  # the fault itself: paused past the session, so its partitions move
    finally:
        os.kill(zombie, signal.SIGCONT)
    finish_load(load)
    check_exact(env, settings, timeout=180)


def counted(env: dict) -> int:
    """The global count, or -1 while `orders stats` cannot read it (a server failing over)."""
    result = run_orders(env, "stats", "--json", check=False)
    return json.loads(result.stdout)["count"] if result.returncode == 0 else -1


def redis_role(bed: Bed, j: int) -> str:
    client = redis.Redis(host="127.0.0.1", port=bed.redis_ports[j], socket_timeout=3, decode_responses=True)
    return str(client.info("replication")["role"])


def leader_of_partition_0(settings: Settings) -> int:
    """The node id of the broker leading partition 0 of orders (the workers fetch from it)."""
    meta = make_admin(settings).list_topics(settings.orders_topic, timeout=10)
    return int(meta.topics[settings.orders_topic].partitions[0].leader)


def test_a_killed_broker_comes_back(env, hosts, bed, tmp_path):
    """The broker leading partition 0 is SIGKILLed mid-run, then restarted.

    With 3 replicas and min.insync.replicas=2 the pool keeps counting on the other two
    (leaders, and the group and transaction coordinators it held, move), and the run
    ends exact.
    """
    settings = Settings.from_env(env)
    hosts("host-a")
    hosts("host-b")
    wait_spread(env, {"host-a", "host-b"})
    load = start_load(env, tmp_path, count=0)  # unbounded: it produces until the fault is over
    wait_until(lambda: stats(env)["count"] > 2000, "the pool counts under load")
    node = f"kafka-{leader_of_partition_0(settings) - 1}"  # node ids start at 1 (scripts/stack)
    before = stats(env)["count"]
    stack("kill", node, env=bed.env)
    try:
        wait_until(lambda: counted(env) > before + 1000, f"the pool counts with {node} down", timeout=120)
    finally:
        stack("start", node, env=bed.env)
    stop_load(load)
    check_exact(env, settings, timeout=180)


def test_a_killed_redis_master_fails_over(env, hosts, bed, tmp_path):
    """A Redis Cluster master is SIGKILLed mid-run; its replica takes over its slots.

    Replication is asynchronous, so the replica may lack the master's last writes:
    a source whose state is behind its committed Kafka offsets is rebuilt from the
    log (README Guarantees), and the run ends exact.
    """
    settings = Settings.from_env(env)
    hosts("host-a")
    hosts("host-b")
    wait_spread(env, {"host-a", "host-b"})
    load = start_load(env, tmp_path, count=0)  # unbounded: it produces until the fault is over
    wait_until(lambda: stats(env)["count"] > 2000, "the pool counts under load")
    # A master other than REDIS_URL's seed node: a process started during the outage
    # (`orders stats` here) finds the cluster through the seed.
    victim = next(j for j in range(1, REDIS_NODES) if redis_role(bed, j) == "master")
    before = stats(env)["count"]
    stack("kill", f"redis-{victim}", env=bed.env)
    try:
        wait_until(lambda: counted(env) > before + 1000, "the pool counts after the failover", timeout=120)
    finally:
        stack("start", f"redis-{victim}", env=bed.env)
    stop_load(load)
    check_exact(env, settings, timeout=180)
