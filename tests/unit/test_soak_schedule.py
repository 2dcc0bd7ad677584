"""The soak's fault schedule (tests/soak/schedule.py): reproducible from its seed, overlapping, feasible."""
from __future__ import annotations

import time
from typing import Any, cast

from tests.soak import schedule as s
from tests.soak.nemesis import Nemesis

TOPOLOGY = s.Topology(hosts=("host-a", "host-b"), workers=3, retry_workers=1, kafka_nodes=3, redis_nodes=6,
                      session_s=6)


def test_the_same_seed_draws_the_same_schedule():
    assert s.draw(15, TOPOLOGY, window_s=240) == s.draw(15, TOPOLOGY, window_s=240)
    assert s.draw(15, TOPOLOGY, window_s=240) != s.draw(16, TOPOLOGY, window_s=240)


def test_faults_overlap_but_never_on_one_resource():
    for seed in range(50):
        faults = s.draw(seed, TOPOLOGY, window_s=1800)
        assert s.overlapping(faults) > 0, seed
        for i, fault in enumerate(faults):
            assert not any(fault.conflicts(other) for other in faults[:i]), (seed, fault)


def test_every_fault_heals_before_the_tail_and_pauses_outlast_the_session():
    for seed in range(50):
        faults = s.draw(seed, TOPOLOGY, window_s=300, tail_s=15)
        assert faults, seed
        assert all(20 <= f.at_s and f.busy_until_s <= 300 - 15 for f in faults), seed
        assert all(f.duration_s > TOPOLOGY.session_s for f in faults if f.kind in (s.WORKER_PAUSE, s.PARTITION)), seed
        assert sum(f.kind == s.PARTITIONS_ADD for f in faults) <= s.MAX_PER_RUN[s.PARTITIONS_ADD]


def test_a_long_run_draws_every_kind_of_fault():
    kinds = {f.kind for seed in range(3) for f in s.draw(seed, TOPOLOGY, window_s=1800)}
    assert kinds == set(s.WEIGHTS)


def test_a_host_fault_excludes_its_workers_faults_but_not_the_other_hosts():
    host = s.Fault(10, s.HOST_KILL, "host-a", 20)
    assert host.conflicts(s.Fault(15, s.WORKER_PAUSE, "host-a/consumer:consumer-1", 10))
    assert not host.conflicts(s.Fault(15, s.WORKER_PAUSE, "host-b/consumer:consumer-1", 10))
    assert s.Fault(10, s.BROKER_KILL, "kafka-0", 10).conflicts(s.Fault(12, s.BROKER_RESTART, "kafka-2", 0))


def test_a_partition_holds_its_host_link_and_excludes_a_host_kill_but_not_worker_faults():
    cut = s.Fault(10, s.PARTITION, "host-a/kafka", 12)
    assert cut.conflicts(s.Fault(15, s.HOST_KILL, "host-a", 10))
    assert cut.conflicts(s.Fault(15, s.PARTITION, "host-a/kafka", 10))
    assert not cut.conflicts(s.Fault(15, s.PARTITION, "host-a/redis", 10))
    assert not cut.conflicts(s.Fault(15, s.PARTITION, "host-b/kafka", 10))
    assert not cut.conflicts(s.Fault(15, s.WORKER_PAUSE, "host-a/consumer:consumer-1", 10))
    assert not cut.conflicts(s.Fault(15, s.BROKER_KILL, "kafka-0", 10))


def test_partitions_cut_a_host_from_the_brokers_or_from_redis():
    targets = {f.target for seed in range(3) for f in s.draw(seed, TOPOLOGY, window_s=1800) if f.kind == s.PARTITION}
    assert targets == {f"{h}/{k}" for h in TOPOLOGY.hosts for k in ("kafka", "redis")}


def test_the_nemesis_holds_a_server_kind_from_a_faults_start_to_its_heal():
    """30-minute run 3: a Redis node's start queued behind a slow broker restart, the next Redis
    fault began meanwhile, and a replica was killed while its master was still down."""
    spans: dict[str, list[float]] = {}

    class SlowHeals(Nemesis):
        def _redis_kill(self, fault, wait):
            spans[fault.target] = [time.monotonic()]
            wait()
            time.sleep(0.5)  # a start slower than its fault's duration
            spans[fault.target].append(time.monotonic())

        def _worker_kill(self, fault, wait):
            spans[fault.target] = [time.monotonic(), time.monotonic()]

    none = cast(Any, None)
    nemesis = SlowHeals(bed=none, hosts={}, load=none, settings=none, lane_env={}, network=none)
    nemesis.start([s.Fault(0.0, s.REDIS_KILL, "redis-0", 0.1), s.Fault(0.2, s.REDIS_KILL, "redis-3", 0.1),
                   s.Fault(0.2, s.WORKER_KILL, "host-a/consumer:consumer-0", 0.0)], time.monotonic())
    assert nemesis.join(10)
    assert [a.outcome for a in nemesis.applied] == ["healed"] * 3
    assert spans["redis-3"][0] >= spans["redis-0"][1]  # waited for the first Redis fault's heal
    assert spans["host-a/consumer:consumer-0"][0] < spans["redis-0"][1]  # other kinds do not wait
