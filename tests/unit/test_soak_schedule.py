"""The soak's fault schedule (tests/soak/schedule.py): reproducible from its seed, overlapping, feasible."""
from __future__ import annotations

from tests.soak import schedule as s

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
