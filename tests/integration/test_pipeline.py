"""End to end through the real supervisor.conf: counted + dead-lettered = produced."""
from __future__ import annotations

import signal
import subprocess
import xmlrpc.client
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition
from supervisor.xmlrpc import SupervisorTransport

from workers.settings import Settings

from ..conftest import isolated_env
from ..pool import ORDERS, SupervisedPool, check_invariants, run_orders, stats, wait_until
from .conftest import cleanup
from .test_honcho import Honcho

pytestmark = pytest.mark.timeout(600)


@pytest.fixture
def pool_env():
    env = isolated_env("e2e", ORDERS_FAILURE_RATE="0.25", RETRY_BACKOFF_MS="200", PRODUCE_RATE="200",
                       BATCH_SIZE="500")
    yield env
    cleanup(Settings.from_env(env))


@pytest.fixture
def pool(pool_env, tmp_path):
    pool = SupervisedPool(pool_env, tmp_path)
    pool.start()
    yield pool
    pool.stop()


def test_supervised_pool_counts_every_order_once(pool, pool_env):
    settings = Settings.from_env(pool_env)
    assert set(pool.statuses()) == {"consumer:consumer-0", "consumer:consumer-1", "consumer:consumer-2",
                                    "retry:retry-0", "producer", "dlq-viewer", "metrics", "events"}
    run_orders(pool_env, "produce", "--count", "3000", "--seed", "7")
    pool.ctl("stop", "producer", check=True)
    truth = check_invariants(pool_env, settings)
    assert truth.total >= 3000 and truth.expected_dead

    # Now restart (SIGTERM) and kill (SIGKILL) workers while orders stream in.
    producing = subprocess.Popen([ORDERS, "produce", "--count", "6000", "--rate", "1500"],
                                 env={**pool_env, "PATH": "/usr/bin:/bin"}, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: stats(pool_env)["count"] > truth.count, "the pool counts the streamed orders")
        pool.kill("consumer:consumer-1", signal.SIGTERM)
        pool.kill("consumer:consumer-2", signal.SIGKILL)
        pool.kill("retry:retry-0", signal.SIGKILL)
        assert producing.wait(60) == 0
    finally:
        if producing.poll() is None:
            producing.kill()
    pool.wait_all_running(stopped=("producer",))
    truth = check_invariants(pool_env, settings)
    assert truth.total >= 9000
    assert last_exit_status(pool, "consumer:consumer-1") == 0  # the SIGTERM'd worker shut down cleanly


def last_exit_status(pool: SupervisedPool, name: str) -> int:
    """The exit status supervisord recorded when ``name`` last exited (from its XML-RPC API)."""
    transport = SupervisorTransport(None, None, f"unix://{pool.folder / 'run' / 'supervisor.sock'}")
    proxy: Any = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)
    return proxy.supervisor.getProcessInfo(name)["exitstatus"]


def committed_and_end_offsets(settings: Settings) -> tuple[list[int], list[int]]:
    """Each partition worker's committed offset (K) and its partition's end offset."""
    committed, ends = [], []
    for p in range(settings.partitions):
        consumer = Consumer({"bootstrap.servers": settings.bootstrap_servers,
                             "group.id": settings.group_id("workers"), "enable.auto.commit": False})
        try:
            tp = TopicPartition(settings.orders_topic, p)
            committed.append(consumer.committed([tp], timeout=10)[0].offset)
            ends.append(consumer.get_watermark_offsets(tp, timeout=10)[1])
        finally:
            consumer.close()
    return committed, ends


def test_same_pipeline_under_honcho(pool_env, tmp_path):
    settings = Settings.from_env(pool_env)
    honcho = Honcho(pool_env, tmp_path)
    try:
        honcho.start()  # waits until the Procfile's programs run
        run_orders(pool_env, "produce", "--count", "2000", "--seed", "11")
        truth = check_invariants(pool_env, settings)
        assert truth.total >= 2000
        # None exited meanwhile (honcho would then have stopped them all).
        assert honcho.programs(), honcho.log()
    finally:
        honcho.stop()
    # On TERM each worker finished its batch and recorded its progress.
    committed, ends = committed_and_end_offsets(settings)
    assert committed == ends
