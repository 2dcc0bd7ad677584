"""The scale-out test bed from ``scripts/stack``: a 3-node Kafka cluster and a 3+3 Redis Cluster.

A bed is private to one test lane: a temp STACK_DIR on the lane's ports + 50
(tests/lanes.py), so it collides neither with the lane's own stack nor with another
lane's bed. It starts Kafka and Redis only; a pool on the bed uses the lane's schema
registry. Faults are injected through the script's per-node commands
(``kill kafka-1``, ``kill redis-0``, ``start ...``).
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .lanes import BASE_PORTS, REPO, lane_env, xdist_lane
from .pool import stack

BED_PORT_SHIFT = 50
KAFKA_NODES = 3
REDIS_MASTERS = 3
REDIS_REPLICAS = 1
REDIS_NODES = REDIS_MASTERS * (1 + REDIS_REPLICAS)
NODE_PORT_STEP = 10  # Kafka node i listens on the base ports + 10 * i (scripts/stack)
# The bed's group session: a dead member's partitions move after it (and after
# the broker notices, up to one heartbeat interval, 2 s, later).
GROUP_SESSION_S = 6


@dataclass
class Bed:
    env: dict[str, str]
    kafka_ports: list[int]
    redis_ports: list[int]

    @property
    def bootstrap(self) -> str:
        return ",".join(f"127.0.0.1:{port}" for port in self.kafka_ports)

    @property
    def pool_env(self) -> dict[str, str]:
        """What a pool on the bed sets: every broker, one Redis seed node in cluster mode."""
        return {"KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
                "REDIS_URL": f"redis://127.0.0.1:{self.redis_ports[0]}/0",
                "REDIS_CLUSTER": "true"}


def bed_settings(stack_dir: Path) -> dict[str, str]:
    """This lane's ports + 50, and the cluster sizes; the registry is not started."""
    lane = lane_env(xdist_lane())
    ports = {name: str(int(lane.get(name, base)) + BED_PORT_SHIFT) for name, base in BASE_PORTS.items()}
    return {
        "STACK_DIR": str(stack_dir),
        **ports,
        "KAFKA_NODES": str(KAFKA_NODES),
        "REDIS_CLUSTER_MASTERS": str(REDIS_MASTERS),
        "REDIS_CLUSTER_REPLICAS": str(REDIS_REPLICAS),
        "REDIS_CLUSTER_NODE_TIMEOUT_MS": "3000",
        "GROUP_SESSION_TIMEOUT_MS": str(GROUP_SESSION_S * 1000),
        # 6 partitions, not 50, for the coordinators' topics: half the readiness time on 2 cores.
        "KAFKA_COORDINATOR_PARTITIONS": "6",
        "STACK_PROMETHEUS": "0",  # the lane's Prometheus is enough
    }


def reuse_kafka_install(stack_dir: Path) -> None:
    """Link the lane stack's Kafka jars (and compiled readiness check): no second copy."""
    lane_kafka = Path(os.environ.get("STACK_DIR", REPO / ".stack")) / "kafka"
    (stack_dir / "kafka").mkdir(parents=True)
    for name in ("libs", "check"):
        if (lane_kafka / name).is_dir():
            (stack_dir / "kafka" / name).symlink_to((lane_kafka / name).resolve())


@contextmanager
def running_bed(stack_dir: Path) -> Iterator[Bed]:
    """Start the bed's Kafka and Redis nodes in ``stack_dir``; stop all of them at the end."""
    settings = bed_settings(stack_dir)
    env = {**os.environ, **settings}
    reuse_kafka_install(stack_dir)
    kafka_port, redis_port = int(settings["KAFKA_PORT"]), int(settings["REDIS_PORT"])
    try:
        stack("start", "kafka", "redis", env=env)
        yield Bed(env,
                  kafka_ports=[kafka_port + NODE_PORT_STEP * i for i in range(KAFKA_NODES)],
                  redis_ports=[redis_port + j for j in range(REDIS_NODES)])
    finally:
        stack("down", env=env)
