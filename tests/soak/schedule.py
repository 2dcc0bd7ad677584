"""The nemesis's schedule: (time, fault, target, duration) entries drawn from a seed.

Pure logic: the same seed and topology always give the same schedule, so a failed
run is reproduced by rerunning with its seed. Faults overlap, except that two
faults never hold the same resource at once (one Kafka fault at a time, one Redis
fault at a time, one fault per worker, one partition per host and link, a host fault
excludes its workers' faults and its partitions):
with 3 brokers and min.insync.replicas=2, two brokers down at once is an outage
of the whole cluster, not a fault the pool is asked to ride out while it counts.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass

# Fault kinds and their weights in the draw.
WORKER_KILL = "worker-kill"          # SIGKILL of one worker; supervisord restarts it
WORKER_PAUSE = "worker-pause"        # SIGSTOP past the group session, then SIGCONT: a zombie
HOST_KILL = "host-kill"              # SIGKILL of a host's supervisord and its children, restarted later
BROKER_KILL = "broker-kill"          # SIGKILL of a Kafka node, started again later
BROKER_RESTART = "broker-restart"    # graceful stop and start of a Kafka node
REDIS_KILL = "redis-kill"            # SIGKILL of a Redis Cluster node (AOF everysec), started again later
PRODUCER_CRASH = "producer-crash"    # SIGKILL of the load producer, a new one started later
PARTITIONS_ADD = "partitions-add"    # partitions added to the live orders topic
REGISTRY_RESTART = "registry-restart"  # graceful restart of the schema registry
PARTITION = "partition"              # a host's namespace cut from the brokers or from Redis past the session

WEIGHTS = {
    WORKER_KILL: 3.0,
    WORKER_PAUSE: 2.0,
    HOST_KILL: 1.0,
    BROKER_KILL: 1.5,
    BROKER_RESTART: 1.0,
    REDIS_KILL: 1.5,
    PRODUCER_CRASH: 1.0,
    PARTITIONS_ADD: 0.5,
    REGISTRY_RESTART: 0.5,
    PARTITION: 1.5,
}
# At most this many of a kind per run: each adds partitions for good / costs a long JVM start.
MAX_PER_RUN = {PARTITIONS_ADD: 2, REGISTRY_RESTART: 1}
# How long a heal takes on top of the drawn duration (a restart and its readiness wait on
# two busy cores): the resource stays taken meanwhile, and the fault must heal before the end.
SETTLE_S = {HOST_KILL: 20.0, BROKER_KILL: 30.0, BROKER_RESTART: 45.0, REDIS_KILL: 10.0,
            REGISTRY_RESTART: 45.0, PRODUCER_CRASH: 5.0, WORKER_PAUSE: 2.0, PARTITION: 2.0}
PARTITIONS_ADDED = 2  # per partitions-add fault
PARTITION_FROM = ("kafka", "redis")  # what a partition cuts a host from (tests/soak/network.py's links)


@dataclass(frozen=True)
class Topology:
    """What the faults can hit."""

    hosts: tuple[str, ...]
    workers: int            # partition workers per host
    retry_workers: int      # retry workers per host
    kafka_nodes: int
    redis_nodes: int
    session_s: float        # the group session: a pause must outlast it

    def worker_programs(self) -> list[str]:
        """supervisorctl's names for one host's workers."""
        return ([f"consumer:consumer-{i}" for i in range(self.workers)]
                + [f"retry:retry-{i}" for i in range(self.retry_workers)])


@dataclass(frozen=True)
class Fault:
    at_s: float          # seconds after the load started
    kind: str
    target: str          # "host-a/consumer:consumer-1", "host-b", "kafka-2", "redis-4", "load", "orders",
    #                      "registry", "host-a/kafka" (a partition of host-a from the brokers)
    duration_s: float    # how long the fault lasts before its heal starts (0: the action is the whole fault)

    @property
    def busy_until_s(self) -> float:
        """When its resource is free again, the heal included (an estimate for restarts)."""
        return self.at_s + self.duration_s + SETTLE_S.get(self.kind, 0.0)

    @property
    def resource(self) -> str:
        """What it holds: one Kafka or Redis fault at a time; a host holds its workers."""
        if self.kind in (BROKER_KILL, BROKER_RESTART):
            return "kafka"
        if self.kind == REDIS_KILL:
            return "redis"
        return self.target

    def conflicts(self, other: Fault) -> bool:
        """Whether the two hold one resource at overlapping times."""
        overlap = self.at_s < other.busy_until_s and other.at_s < self.busy_until_s
        a, b = self.resource, other.resource
        same = a == b or a.startswith(b + "/") or b.startswith(a + "/")
        return overlap and same

    def as_dict(self) -> dict:
        return asdict(self)


def draw(seed: int, topology: Topology, *, window_s: float, start_s: float = 20.0,
         mean_gap_s: float = 8.0, tail_s: float = 15.0) -> list[Fault]:
    """Faults from ``start_s`` on, each healed by ``window_s - tail_s``; arrivals are a Poisson process."""
    rng = random.Random(seed)
    end_s = window_s - tail_s
    faults: list[Fault] = []
    at = start_s + rng.expovariate(1 / mean_gap_s)
    while at < end_s:
        fault = _draw_one(rng, topology, round(at, 1), faults, end_s)
        if fault is not None:
            faults.append(fault)
        at += rng.expovariate(1 / mean_gap_s)
    return faults


def _draw_one(rng: random.Random, topo: Topology, at: float, taken: list[Fault], end_s: float) -> Fault | None:
    """One fault at ``at`` that conflicts with none drawn before; None after a few tries."""
    counts: dict[str, int] = {}
    for fault in taken:
        counts[fault.kind] = counts.get(fault.kind, 0) + 1
    kinds = [k for k in WEIGHTS if counts.get(k, 0) < MAX_PER_RUN.get(k, 1_000_000)]
    for _ in range(10):
        kind = rng.choices(kinds, weights=[WEIGHTS[k] for k in kinds])[0]
        fault = Fault(at, kind, _target(rng, topo, kind), _duration(rng, topo, kind))
        if fault.busy_until_s <= end_s and not any(fault.conflicts(other) for other in taken):
            return fault
    return None


def _target(rng: random.Random, topo: Topology, kind: str) -> str:
    if kind in (WORKER_KILL, WORKER_PAUSE):
        return f"{rng.choice(topo.hosts)}/{rng.choice(topo.worker_programs())}"
    if kind == HOST_KILL:
        return rng.choice(topo.hosts)
    if kind == PARTITION:
        return f"{rng.choice(topo.hosts)}/{rng.choice(PARTITION_FROM)}"
    if kind in (BROKER_KILL, BROKER_RESTART):
        return f"kafka-{rng.randrange(topo.kafka_nodes)}"
    if kind == REDIS_KILL:
        return f"redis-{rng.randrange(topo.redis_nodes)}"
    if kind == PRODUCER_CRASH:
        return "load"
    if kind == PARTITIONS_ADD:
        return "orders"
    return "registry"


def _duration(rng: random.Random, topo: Topology, kind: str) -> float:
    low, high = {
        WORKER_PAUSE: (topo.session_s + 4, topo.session_s + 14),
        PARTITION: (topo.session_s + 4, topo.session_s + 14),
        HOST_KILL: (8.0, 30.0),
        BROKER_KILL: (5.0, 25.0),
        REDIS_KILL: (2.0, 12.0),
        PRODUCER_CRASH: (1.0, 6.0),
    }.get(kind, (0.0, 0.0))
    return round(rng.uniform(low, high), 1)


def overlapping(faults: list[Fault]) -> int:
    """How many faults start while another one is still active (a measure of overlap)."""
    return sum(1 for i, f in enumerate(faults)
               if any(g.at_s <= f.at_s < g.busy_until_s for g in faults[:i]))
