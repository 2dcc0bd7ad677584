"""The store and the pool on a real Redis Cluster: three masters this module starts itself.

Each source's state lives in a slot of its own, so sources land on different nodes;
the global figures are merged from them on read, and a replayed order counts once
however many sources its copies arrive through, also across a crash between the
replay claim and the batch.
"""
from __future__ import annotations

import os
import random
import re
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import redis
from redis.cluster import RedisCluster

from workers.clients import make_redis
from workers.errors import ConfigError, ServiceUnavailable
from workers.processing import price_cents
from workers.settings import Settings
from workers.store import (
    ADOPTED,
    APPLIED,
    DEAD,
    RESET,
    RETRIED,
    SAME,
    STATE_BEHIND,
    STATE_LOST,
    AggregateStore,
    Source,
    SourceBatch,
)

from ..conftest import isolated_env
from ..pool import SupervisedPool, check_exact, dead_letters, run_orders, stats, status_json, wait_until
from .conftest import cleanup
from .test_operational import free_port

ORDERS = [Source("orders", p) for p in range(3)]
RETRY = [Source("orders-retry", p) for p in range(3)]


# The nodes want a password: the pool's logs must never show it.
PASSWORD = f"cluster-{uuid.uuid4().hex[:12]}-pw"


@dataclass
class Cluster:
    """Three redis-server masters in cluster mode, on 127.0.0.1 only, with a password."""

    ports: list[int]
    procs: list[subprocess.Popen]

    @property
    def url(self) -> str:
        return f"redis://:{PASSWORD}@127.0.0.1:{self.ports[0]}/0"  # a seed node: the client finds the others

    def node(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, password=PASSWORD, socket_connect_timeout=3)

    def holders(self, key: str) -> list[int]:
        """The ports of the nodes that hold ``key``: each node's own keys (SCAN is never redirected)."""
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", key)
        return [port for port in self.ports if any(self.node(port).scan_iter(match=pattern, count=1000))]

    def slot(self, key: str) -> int:
        return int(self.node(self.ports[0]).execute_command("CLUSTER", "KEYSLOT", key))

    def keys(self, pattern: str) -> list[bytes]:
        return [key for port in self.ports for key in self.node(port).scan_iter(match=pattern)]


def _start_node(folder: Path, port: int, bus_port: int) -> subprocess.Popen:
    data = folder / str(port)
    data.mkdir()
    args = ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--cluster-enabled", "yes",
            "--cluster-port", str(bus_port), "--cluster-config-file", str(data / "nodes.conf"),
            "--cluster-node-timeout", "5000", "--dir", str(data), "--appendonly", "no", "--save", "",
            "--requirepass", PASSWORD, "--masterauth", PASSWORD, "--daemonize", "no"]
    with open(data / "redis.log", "w") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)


def _up_or_exited(node: redis.Redis, proc: subprocess.Popen) -> bool:
    if proc.poll() is not None:
        return True
    try:
        return bool(node.ping())
    except redis.ConnectionError:
        return False


def _cluster_ok(node: redis.Redis) -> bool:
    return b"cluster_state:ok" in node.execute_command("CLUSTER", "INFO")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    folder = tmp_path_factory.mktemp("redis-cluster")
    ports = [free_port() for _ in range(3)]
    bus_ports = [free_port() for _ in range(3)]  # set explicitly: port + 10000 may not exist
    procs = [_start_node(folder, port, bus) for port, bus in zip(ports, bus_ports, strict=True)]
    nodes = Cluster(ports, procs)
    try:
        for port, proc in zip(ports, procs, strict=True):
            wait_until(partial(_up_or_exited, nodes.node(port), proc), f"redis-server on {port} answers",
                       timeout=20, interval=0.1)
            assert proc.poll() is None, (folder / str(port) / "redis.log").read_text()
        created = subprocess.run(["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
                                  "--cluster-yes"], env={**os.environ, "REDISCLI_AUTH": PASSWORD},
                                 capture_output=True, text=True, timeout=60)
        assert created.returncode == 0, created.stdout + created.stderr
        for port in ports:
            wait_until(partial(_cluster_ok, nodes.node(port)), f"node {port} sees cluster_state:ok",
                       timeout=60, interval=0.2)
        yield nodes
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def spread_prefix(cluster: Cluster, sources: list[Source]) -> str:
    """A fresh key prefix under which ``sources`` each land on another node (the slots follow the prefix)."""
    client = RedisCluster(host="127.0.0.1", port=cluster.ports[0], password=PASSWORD)
    try:
        for _ in range(1000):
            prefix = f"t-cluster-{uuid.uuid4().hex[:8]}"
            nodes = {client.get_node_from_key(f"{{{prefix}:{s.topic}:{s.partition}}}").name for s in sources}
            if len(nodes) == len(sources):
                return prefix
    finally:
        client.close()
    raise AssertionError("no prefix spreads the sources")


def cluster_settings(cluster: Cluster, prefix: str, **extra: str) -> Settings:
    return Settings.from_env(isolated_env("cluster", REDIS_URL=cluster.url, REDIS_CLUSTER="true",
                                          REDIS_PREFIX=prefix, **extra))


@pytest.fixture
def store(cluster) -> Iterator[AggregateStore]:
    """A store on the cluster whose three orders sources live on three different nodes."""
    settings = cluster_settings(cluster, spread_prefix(cluster, ORDERS))
    store = AggregateStore(make_redis(settings), settings.redis_prefix)
    yield store
    store.clear()


def apply(store: AggregateStore, *batches: SourceBatch) -> list:
    return store.apply(list(batches), worker="w", heartbeat={"pid": 1}, now_ms=1)


def test_each_source_lives_in_its_own_slot_on_its_own_node(store, cluster):
    for p, source in enumerate(ORDERS):
        batch = SourceBatch(source, to_offset=2, known_offset=None)
        batch.count(0, p, 100, replay_of=f"order-{p}")
        batch.park(1, DEAD, "record")
        apply(store, batch)
    homes = {}
    for source in ORDERS:
        keys = [store.source_key(source), store.parked_key(source), store.replayed_key(source)]
        assert len({cluster.slot(k) for k in keys}) == 1, "a source's keys share one slot"
        holders = {tuple(cluster.holders(k)) for k in keys}
        assert len(holders) == 1 and len(next(iter(holders))) == 1, holders
        homes[source] = next(iter(holders))[0]
    assert len(set(homes.values())) == 3, homes
    # The merged figures see all three nodes' sources.
    snap = store.snapshot(3)
    assert (snap["total"].count, snap["total"].cents, snap["total"].dead_lettered) == (3, 300, 3)
    assert [p.count for p in snap["partitions"]] == [1, 1, 1]


def test_batch_protocol_per_source(store):
    a, b = ORDERS[0], ORDERS[1]
    r = apply(store, SourceBatch(a, to_offset=3, known_offset=None, items=[(0, 0, 1000, ""), (2, 0, 250, "")]),
              SourceBatch(b, to_offset=2, known_offset=None, items=[(1, 1, 5, "")]))
    assert [(x.status, x.counted, x.offset) for x in r] == [(APPLIED, 2, 3), (APPLIED, 1, 2)]
    assert store.positions([a, b, ORDERS[2]]) == {a: 3, b: 2, ORDERS[2]: None}
    # Applying again counts nothing; an overlapping batch counts its new part only.
    assert apply(store, SourceBatch(a, to_offset=3, known_offset=None, items=[(2, 0, 250, "")]))[0].counted == 0
    overlapping = SourceBatch(a, to_offset=5, known_offset=3, items=[(2, 0, 250, ""), (4, 0, 1, "")])
    assert apply(store, overlapping)[0].counted == 1
    assert store.totals().cents == 1256
    # State missing where the worker knew some; state behind what the worker knew.
    lost = apply(store, SourceBatch(ORDERS[2], to_offset=9, known_offset=8, items=[(8, 2, 1, "")]))[0]
    assert lost.status == STATE_LOST
    behind = apply(store, SourceBatch(b, to_offset=12, known_offset=9, items=[(10, 1, 1, "")]))[0]
    assert (behind.status, behind.offset) == (STATE_BEHIND, 2)
    assert store.totals().count == 4
    # Touch: each source's stored offset, and the sources are registered for the readers.
    assert store.touch([a, ORDERS[2]], worker="w", heartbeat={"pid": 1}) == {a: 5, ORDERS[2]: None}
    # Decision records stay until K passes them.
    parked = SourceBatch(b, to_offset=5, known_offset=2, committed_offset=None)
    parked.park(2, DEAD, "dead-record")
    parked.park(3, RETRIED, "retry-record")
    parked.park(4, DEAD)
    apply(store, parked)
    assert store.state([a, b])[1] == {a: {}, b: {2: "dead-record", 3: "retry-record"}}
    apply(store, SourceBatch(b, to_offset=6, known_offset=5, items=[(5, 1, 1, "")], committed_offset=3))
    assert store.state([b])[1] == {b: {3: "retry-record"}}
    total = store.totals()
    assert (total.count, total.dead_lettered, total.retried) == (5, 2, 1)


def test_identity_per_source(store):
    ids = {"orders": "id-a", "orders-retry": "id-b"}
    parts = {"orders": 3, "orders-retry": 1}
    assert store.ensure_identity(ids, partitions=parts) == (ADOPTED, {})
    apply(store, *(SourceBatch(s, to_offset=1, known_offset=None, items=[(0, p, 100, "")])
                   for p, s in enumerate(ORDERS)))
    assert store.ensure_identity(ids, partitions=parts) == (SAME, ids)
    assert store.totals().count == 3
    new = {**ids, "orders": "id-c"}
    assert store.ensure_identity(new, partitions=parts) == (RESET, ids)
    snap = store.snapshot(3, sources=ORDERS)
    assert snap["total"].count == 0 and [p.count for p in snap["partitions"]] == [0, 0, 0]
    assert snap["sources"] == {s: {} for s in ORDERS}
    assert store.ensure_identity(new, partitions=parts) == (SAME, new)
    # A source only the registry knows of (no longer in the topics' layout) is reset too.
    apply(store, SourceBatch(RETRY[2], to_offset=1, known_offset=None, items=[(0, 1, 7, "")]))
    assert store.ensure_identity(new, partitions=parts, force=True)[0] == RESET
    assert store.totals().count == 0 and store.positions([RETRY[2]]) == {RETRY[2]: None}


def test_merged_totals_are_exact(store):
    """Many batches on six sources over three nodes, retried sources counting into other partitions."""
    rng = random.Random(7)
    expected_count, expected_cents = [0, 0, 0], [0, 0, 0]
    dead = retried = 0
    offsets = {s: 0 for s in ORDERS + RETRY}
    known: dict[Source, int | None] = {s: None for s in ORDERS + RETRY}
    for _ in range(40):
        source = rng.choice(ORDERS + RETRY)
        batch = SourceBatch(source, to_offset=-1, known_offset=known[source])
        for _ in range(rng.randint(1, 300)):
            offset = offsets[source]
            offsets[source] += 1
            kind = rng.random()
            if kind < 0.1:
                batch.park(offset, DEAD)
                dead += 1
            elif kind < 0.2:
                batch.park(offset, RETRIED)
                retried += 1
            else:
                target = source.partition if source in ORDERS else rng.randrange(3)
                cents = rng.randint(1, 100_000_000_00)  # up to a hundred million: sums beyond 2^31
                batch.count(offset, target, cents)
                expected_count[target] += 1
                expected_cents[target] += cents
        batch.to_offset = offsets[source]
        (result,) = apply(store, batch)
        assert result.status == APPLIED
        apply(store, batch)  # a replayed batch changes nothing
        known[source] = result.offset
    snap = store.snapshot(3)
    assert [p.count for p in snap["partitions"]] == expected_count
    assert [p.cents for p in snap["partitions"]] == expected_cents
    total = snap["total"]
    assert (total.count, total.cents) == (sum(expected_count), sum(expected_cents))
    assert (total.dead_lettered, total.retried) == (dead, retried)
    assert store.totals() == total


def replayed(source: Source, offset: int, order_id: str, target: int, cents: int = 500,
             known: int | None = None) -> SourceBatch:
    batch = SourceBatch(source, to_offset=offset + 1, known_offset=known)
    batch.count(offset, target, cents, replay_of=order_id)
    return batch


def test_a_replayed_order_counts_once_across_sources_on_different_nodes(store, cluster):
    """Copies of one orderId through two partitions of orders (other nodes) and the retry topic."""
    results = apply(store, replayed(ORDERS[0], 10, "order-x", 0), replayed(ORDERS[1], 4, "order-x", 1))
    assert [r.counted for r in results] == [1, 0]
    assert apply(store, replayed(RETRY[2], 7, "order-x", 0))[0].counted == 0
    assert apply(store, replayed(ORDERS[2], 3, "order-y", 2))[0].counted == 1  # another order counts
    total = store.totals()
    assert (total.count, total.cents, total.duplicate_replays) == (2, 1000, 2)
    claim = store.claim_key("order-x")
    assert len(cluster.holders(claim)) == 1
    assert store.snapshot(3)["partitions"][1].count == 0  # the copy in partition 1 was not counted


def test_a_crash_between_claim_and_batch_still_counts_once(store):
    first = replayed(ORDERS[0], 5, "order-z", 0)
    assert store.claim_replays([first]) == set()  # claimed; the worker dies before its batch script
    # Another copy arrives meanwhile through another partition: the claim is not its own.
    assert apply(store, replayed(ORDERS[1], 8, "order-z", 1))[0].counted == 0
    # The restarted worker replays the same batch: it owns the claim and counts, once.
    assert apply(store, replayed(ORDERS[0], 5, "order-z", 0))[0].counted == 1
    assert apply(store, replayed(ORDERS[0], 5, "order-z", 0, known=6))[0].counted == 0
    total = store.totals()
    assert (total.count, total.duplicate_replays) == (1, 1)


def test_a_claim_whose_owner_passed_its_offset_moves_to_the_next_copy(store):
    """The claimant crashed, and its offset was decided otherwise on the replay (parked this time)."""
    assert store.claim_replays([replayed(ORDERS[0], 5, "order-s", 0)]) == set()
    parked = SourceBatch(ORDERS[0], to_offset=6, known_offset=None)
    parked.park(5, RETRIED, "retry-record")
    apply(store, parked)
    # The retried copy succeeds through the retry topic: it takes the stale claim and counts.
    assert apply(store, replayed(RETRY[1], 2, "order-s", 0))[0].counted == 1
    assert apply(store, replayed(ORDERS[2], 9, "order-s", 2))[0].counted == 0
    total = store.totals()
    assert (total.count, total.retried, total.duplicate_replays) == (1, 1, 1)


def test_a_lost_claim_is_restored_from_the_source_that_counted(store, cluster):
    """The claim's node lost its last writes; the source that counted the order still knows."""
    assert apply(store, replayed(ORDERS[0], 5, "order-l", 0))[0].counted == 1
    claim = store.claim_key("order-l")
    (port,) = cluster.holders(claim)
    cluster.node(port).delete(claim)
    assert apply(store, replayed(ORDERS[1], 2, "order-l", 1))[0].counted == 0
    assert cluster.node(port).get(claim) == f"{ORDERS[0]}:5".encode()
    assert store.totals().count == 1


def test_clear_deletes_the_prefix_on_every_node(store, cluster):
    apply(store, *(replayed(s, 0, f"o-{s.partition}", s.partition) for s in ORDERS))
    store.keep_schema(1, "{}")
    pattern = "{" + store.prefix + "[:}]*"
    before = cluster.keys(pattern)
    assert len({port for key in before for port in cluster.holders(key.decode())}) == 3
    assert store.clear() == len(before)
    assert cluster.keys(pattern) == []


def test_an_unreachable_or_single_server_is_told_apart(cluster, settings):
    down = Settings.from_env(isolated_env("down", REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
                                          REDIS_CLUSTER="true"))
    with pytest.raises(ServiceUnavailable, match="redis"):
        AggregateStore(lambda: make_redis(down), down.redis_prefix).positions(ORDERS)
    # The lane's Redis is one server, not a cluster: a configuration error, not an outage.
    single = Settings.from_env(isolated_env("single", REDIS_URL=settings.redis_url, REDIS_CLUSTER="true"))
    with pytest.raises(ConfigError, match="Redis Cluster"):
        make_redis(single)


# -- the real pool on the cluster ----------------------------------------------------


@pytest.fixture
def pool_env(cluster):
    env = isolated_env("cluster", REDIS_URL=cluster.url, REDIS_CLUSTER="true", ORDERS_FAILURE_RATE="0.3",
                       RETRY_BACKOFF_MS="100", RETRY_BACKOFF_MULTIPLIER="1", PRODUCE_RATE="0.001")
    env["REDIS_PREFIX"] = spread_prefix(cluster, [Source(env["ORDERS_TOPIC"], p) for p in range(3)])
    yield env
    cleanup(Settings.from_env(env))


@pytest.mark.timeout(600)
def test_supervised_pool_on_a_cluster_counts_exactly_and_replays_once(pool_env, cluster, tmp_path):
    settings = Settings.from_env(pool_env)
    (tmp_path / "a").mkdir()
    pool = SupervisedPool(pool_env, tmp_path / "a")
    pool.start()
    try:
        run_orders(pool_env, "produce", "--count", "1500", "--seed", "21")
        truth = check_exact(pool_env, settings)
        assert truth.dead_origins, "the failure rate should dead-letter some orders"
        dead_cents = sum(price_cents(d["order"]) for d in dead_letters(pool_env))
    finally:
        pool.stop()
    store = AggregateStore(make_redis(settings), settings.redis_prefix)
    homes = {cluster.holders(store.source_key(Source(settings.orders_topic, p)))[0] for p in range(3)}
    assert len(homes) == 3, "the partitions' states live on three nodes"

    # The downstream is fixed; the operator replays every dead letter, then all of them again.
    fixed = {**pool_env, "ORDERS_FAILURE_RATE": "0"}
    (tmp_path / "b").mkdir()
    pool = SupervisedPool(fixed, tmp_path / "b")
    pool.start()
    try:
        run_orders(fixed, "dlq", "replay")
        wait_until(lambda: stats(fixed)["count"] == truth.total, "every replayed order is counted", timeout=120)
        run_orders(fixed, "dlq", "replay", "--again")
        dead = len(truth.dead_origins)
        final = wait_until(lambda: (s := status_json(fixed))["global"]["duplicate_replays"] >= dead and s,
                           "the second replay is handled", timeout=120)
        assert final["global"]["count"] == truth.total  # each replayed order counted once
        assert final["global"]["duplicate_replays"] == dead
        assert round(final["global"]["sum"] * 100) == truth.cents + dead_cents
        assert sum(p["count"] for p in final["partitions"]) == truth.total
    finally:
        pool.stop()
    logs = list(tmp_path.rglob("*.log"))
    assert logs and not [path for path in logs if PASSWORD in path.read_text(errors="replace")]
