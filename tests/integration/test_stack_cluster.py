"""The scale-out test bed (tests/bed.py): a 3-node Kafka cluster and a 3+3 Redis Cluster.

Faults are injected through the script's per-node commands (``kill kafka-1``,
``kill redis-0``, ``start ...``).
"""
from __future__ import annotations

import subprocess
import uuid

import pytest
import redis
from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic
from redis.cluster import RedisCluster

from ..bed import KAFKA_NODES, REDIS_MASTERS, REDIS_NODES, Bed
from ..pool import STACK, read_topic, stack, wait_until

# Every test on the bed in one xdist worker: one bed, not one per worker.
pytestmark = pytest.mark.xdist_group("cluster-bed")


def run_stack(bed: Bed, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([STACK, *args], env=bed.env, capture_output=True, text=True, timeout=60)


def new_topic(bed: Bed, partitions: int = 3) -> str:
    """A topic with 3 replicas per partition; returns once every replica is in sync."""
    topic = f"t-cluster-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bed.bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=3)])[topic].result(30)
    wait_until(lambda: in_sync(bed, topic) == {p: {1, 2, 3} for p in range(partitions)},
               f"all 3 replicas of {topic} in sync", timeout=30)
    return topic


def in_sync(bed: Bed, topic: str) -> dict[int, set[int]]:
    """The in-sync replicas (node ids) of each partition, from any live node's metadata."""
    admin = AdminClient({"bootstrap.servers": bed.bootstrap})
    try:
        meta = admin.list_topics(topic, timeout=10).topics[topic]
    except KafkaException:
        return {}
    return {p.id: set(p.isrs) for p in meta.partitions.values()}


def produce_all(bed: Bed, topic: str, values: list[str], **config: str | int | bool) -> None:
    """Produce with acks=all; fails unless every message is acknowledged."""
    errors: list[KafkaError] = []
    producer = Producer({"bootstrap.servers": bed.bootstrap, "acks": "all", "enable.idempotence": True,
                         **config})
    for value in values:
        producer.produce(topic, value.encode(), on_delivery=lambda err, _msg: errors.append(err) if err else None)
    assert producer.flush(60) == 0
    assert errors == []


def node(bed: Bed, j: int) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=bed.redis_ports[j], decode_responses=True, socket_timeout=3)


def cluster_state(bed: Bed, j: int) -> str:
    return node(bed, j).cluster("info")["cluster_state"]


def test_status_and_env_list_every_node(bed: Bed) -> None:
    status = run_stack(bed, "status")
    assert status.returncode == 1, status.stdout + status.stderr  # 1: the registry, not started here, is down
    lines = {line.split()[0]: line for line in status.stdout.splitlines()}
    for i in range(KAFKA_NODES):
        assert "running (pid" in lines[f"kafka-{i}"] and f"127.0.0.1:{bed.kafka_ports[i]}" in lines[f"kafka-{i}"]
    for j in range(REDIS_NODES):
        line = lines[f"redis-{j}"]
        assert "running (pid" in line and f"127.0.0.1:{bed.redis_ports[j]}" in line and "cluster_state:ok" in line
    assert lines["registry"].split()[1] == "down"

    env = run_stack(bed, "env")
    assert env.returncode == 0
    exports = dict(line.removeprefix("export ").split("=", 1) for line in env.stdout.splitlines())
    assert exports["KAFKA_BOOTSTRAP_SERVERS"] == bed.bootstrap
    assert exports["REDIS_URL"] == f"redis://127.0.0.1:{bed.redis_ports[0]}/0"
    assert exports["REDIS_CLUSTER"] == "true"


def test_brokers_replicate_3_ways_with_2_in_sync_and_short_group_sessions(bed: Bed) -> None:
    admin = AdminClient({"bootstrap.servers": bed.bootstrap})
    broker = ConfigResource(ConfigResource.Type.BROKER, "2")
    configs = admin.describe_configs([broker])[broker].result(30)
    wanted = {"default.replication.factor": "3", "min.insync.replicas": "2",
              "offsets.topic.replication.factor": "3", "transaction.state.log.replication.factor": "3",
              "transaction.state.log.min.isr": "2",
              "group.consumer.session.timeout.ms": "6000", "group.consumer.min.session.timeout.ms": "6000",
              "group.min.session.timeout.ms": "6000", "group.consumer.heartbeat.interval.ms": "2000"}
    assert {name: configs[name].value for name in wanted} == wanted
    assert sorted(b.id for b in admin.describe_cluster().result(30).nodes) == [1, 2, 3]


def test_a_topic_has_3_replicas_and_takes_acks_all_and_transactions(bed: Bed) -> None:
    topic = new_topic(bed)
    admin = AdminClient({"bootstrap.servers": bed.bootstrap})
    meta = admin.list_topics(topic, timeout=10).topics[topic]
    assert {p.id: sorted(p.replicas) for p in meta.partitions.values()} == {p: [1, 2, 3] for p in range(3)}
    resource = ConfigResource(ConfigResource.Type.TOPIC, topic)
    assert admin.describe_configs([resource])[resource].result(30)["min.insync.replicas"].value == "2"

    produce_all(bed, topic, ["plain-0", "plain-1"])
    txn = Producer({"bootstrap.servers": bed.bootstrap, "transactional.id": f"{topic}-txn"})
    txn.init_transactions(60)
    txn.begin_transaction()
    txn.produce(topic, b"committed")
    txn.commit_transaction(60)
    txn.begin_transaction()
    txn.produce(topic, b"aborted")
    txn.abort_transaction(60)
    assert sorted(m.value() for m in read_topic(bed.bootstrap, topic)) == [b"committed", b"plain-0", b"plain-1"]


def test_a_killed_broker_leaves_2_in_sync_replicas_then_rejoins(bed: Bed) -> None:
    topic = new_topic(bed)
    stack("kill", "kafka-1", env=bed.env)  # node id 2
    try:
        wait_until(lambda: in_sync(bed, topic) == {p: {1, 3} for p in range(3)},
                   "node 2 out of every partition's in-sync replicas", timeout=30)
        produce_all(bed, topic, [f"during-{i}" for i in range(20)])
    finally:
        stack("start", "kafka-1", env=bed.env)
    wait_until(lambda: in_sync(bed, topic) == {p: {1, 2, 3} for p in range(3)},
               "node 2 back in every partition's in-sync replicas", timeout=60)
    assert len(read_topic(bed.bootstrap, topic)) == 20


def test_redis_cluster_fails_over_a_killed_master_and_takes_it_back_as_replica(bed: Bed) -> None:
    assert all(cluster_state(bed, j) == "ok" for j in range(REDIS_NODES))
    # Another test on this bed may have failed a master over: take the roles as they are.
    roles = [node(bed, j).info("replication")["role"] for j in range(REDIS_NODES)]
    assert sorted(roles) == ["master"] * REDIS_MASTERS + ["slave"] * (REDIS_NODES - REDIS_MASTERS)
    m = roles.index("master")

    client = RedisCluster(host="127.0.0.1", port=bed.redis_ports[0], decode_responses=True)
    keys = {f"order-{i}": str(i) for i in range(300)}
    for key, value in keys.items():
        client.set(key, value)
    assert all(node(bed, j).dbsize() > 0 for j in range(REDIS_NODES) if roles[j] == "master")
    held = set(node(bed, m).keys("*"))
    assert node(bed, m).wait(1, 5000) == 1  # its replica has all its writes
    replica = next(j for j in range(REDIS_NODES) if roles[j] == "slave"
                   and node(bed, j).info("replication")["master_port"] == bed.redis_ports[m])

    stack("kill", f"redis-{m}", env=bed.env)
    try:
        wait_until(lambda: node(bed, replica).info("replication")["role"] == "master"
                   and cluster_state(bed, replica) == "ok", f"redis-{replica} promoted", timeout=30)
        wait_until(lambda: readable(bed, keys, seed=replica), "every key readable after the failover", timeout=30)
    finally:
        stack("start", f"redis-{m}", env=bed.env)
    wait_until(lambda: node(bed, m).info("replication").get("master_port") == bed.redis_ports[replica]
               and node(bed, m).info("replication")["master_link_status"] == "up",
               f"redis-{m} back as the replica of its replacement", timeout=30)
    assert set(node(bed, m).keys("*")) == held  # its slots' keys, from AOF and then its new master
    assert readable(bed, keys, seed=replica)


def readable(bed: Bed, keys: dict[str, str], seed: int) -> bool:
    try:
        client = RedisCluster(host="127.0.0.1", port=bed.redis_ports[seed], decode_responses=True)
        return all(client.get(key) == value for key, value in keys.items())
    except redis.RedisError:
        return False
