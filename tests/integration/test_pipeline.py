"""End to end through the real supervisor.conf: counted + dead-lettered = produced."""
from __future__ import annotations

import re
import signal
import subprocess
import time

import pytest

from workers.settings import Settings

from ..conftest import isolated_env
from ..pool import ORDERS, REPO as ORDERS_REPO, SupervisedPool, check_invariants, run_orders
from .conftest import cleanup

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
                                    "retry", "producer", "dlq-viewer"}
    run_orders(pool_env, "produce", "--count", "3000", "--seed", "7")
    pool.ctl("stop", "producer", check=True)
    truth = check_invariants(pool_env, settings)
    assert truth.total >= 3000 and truth.expected_dead

    # Now restart (SIGTERM) and kill (SIGKILL) workers while orders stream in.
    producing = subprocess.Popen([ORDERS, "produce", "--count", "6000", "--rate", "1500"],
                                 env={**pool_env, "PATH": "/usr/bin:/bin"}, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.5)
        pool.kill("consumer:consumer-1", signal.SIGTERM)
        time.sleep(0.7)
        pool.kill("consumer:consumer-2", signal.SIGKILL)
        time.sleep(0.5)
        pool.kill("retry", signal.SIGKILL)
        assert producing.wait(60) == 0
    finally:
        if producing.poll() is None:
            producing.kill()
    pool.wait_all_running(stopped=("producer",))
    truth = check_invariants(pool_env, settings)
    assert truth.total >= 9000
    log = (pool.folder / "run" / "consumer-1.log").read_text()
    assert "stopped worker=partition-1" in log  # the SIGTERM'd worker shut down cleanly


def test_same_pipeline_under_honcho(pool_env, tmp_path):
    settings = Settings.from_env(pool_env)
    (tmp_path / "Procfile").write_text((ORDERS_REPO / "Procfile").read_text())
    (tmp_path / ".venv").symlink_to(ORDERS_REPO / ".venv")
    # The Procfile's producer runs (and is checked) but at a rate too low to matter,
    # so the test knows when everything produced has been handled.
    env = {**pool_env, "PATH": "/usr/bin:/bin", "PRODUCE_RATE": "0.01"}
    log_path = tmp_path / "honcho.log"
    with open(log_path, "w") as log_file:
        honcho = subprocess.Popen([str(ORDERS_REPO / ".venv/bin/honcho"), "start"], cwd=tmp_path, env=env,
                                  stdout=log_file, stderr=subprocess.STDOUT)
    try:
        run_orders(pool_env, "produce", "--count", "2000", "--seed", "11")
        time.sleep(1)
        truth = check_invariants(pool_env, settings)
        assert truth.total >= 2000
    finally:
        honcho.send_signal(signal.SIGTERM)
        honcho.wait(timeout=30)
    output = log_path.read_text()
    for name in ("consumer0", "consumer1", "consumer2", "retry", "producer", "dlqviewer"):
        assert re.search(rf"^\S+ {name}\.1\s+\| ", output, re.M), f"{name} did not run under honcho"
    assert "stopped worker=partition-0" in output
    assert "Traceback" not in output
