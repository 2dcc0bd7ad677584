"""The worker's rebalance callbacks survive a revocation in the same poll as the assignment.

Three workers starting together each get partitions and lose some of them as the
others join. The first bed run saw one of them abort (SIGABRT) 50 ms after its
first assignment: its ``on_assign`` had asked its own consumer for the topic's
metadata, which cleared confluent-kafka's callback state, and the revocation that
followed in the same ``poll()`` found none ("CallState_get: Assertion `cs != NULL'
failed"). tests/integration/rebalance_driver.py forces that order.
"""
from __future__ import annotations

import os
import subprocess
import sys

from workers.settings import Settings

from ..conftest import isolated_env
from ..pool import REPO, run_orders
from .conftest import cleanup


def test_a_revocation_in_the_poll_that_assigned_does_not_abort_the_worker():
    env = isolated_env("rebalance", ORDERS_PARTITIONS="4")
    settings = Settings.from_env(env)
    run_orders(env, "init")
    try:
        result = subprocess.run([sys.executable, "-m", "tests.integration.rebalance_driver"], cwd=REPO,
                                env={"PATH": os.environ["PATH"], **env}, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"exit {result.returncode}: {result.stdout}{result.stderr[-3000:]}"
        assert "assigned=4 revoked=" in result.stdout
    finally:
        cleanup(settings)
