"""``scripts/stack``'s node names on a stack that runs nothing: no server is started.

30-minute soak run 3 restarted kafka-2 while every broker was down, and ``scripts/stack``
refused it as an "unknown node" while listing kafka-2 among its nodes.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.pool import STACK

CLUSTER = {"KAFKA_NODES": "3", "REDIS_CLUSTER_MASTERS": "3"}


def run_stack(stack_dir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ["PATH"], "STACK_DIR": str(stack_dir), **CLUSTER}
    return subprocess.run([STACK, *args], env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("command", ["stop", "kill"])
@pytest.mark.parametrize("node", ["kafka-2", "redis-5"])
def test_a_configured_node_that_is_down_is_stopped_as_a_no_op(tmp_path: Path, command: str, node: str) -> None:
    done = run_stack(tmp_path, command, node)
    assert done.returncode == 0, done.stderr
    assert "unknown node" not in done.stderr


def test_a_node_the_stack_does_not_have_is_still_refused(tmp_path: Path) -> None:
    done = run_stack(tmp_path, "stop", "kafka-7")
    assert done.returncode != 0
    assert "unknown node 'kafka-7'" in done.stderr
