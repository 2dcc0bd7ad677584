"""Test lanes: the suite runs in N pytest-xdist workers, each against a local stack of its own.

Lane 0 is the stack the environment names (by default the one on the standard ports).
Lane N > 0 is a second, private stack under ``.stack/lanes/<shift / 100>`` whose ports are the
standard ones plus a shift of 100 * N. ``TEST_PORT_SHIFT`` (a multiple of 100) moves
every lane, lane 0 included, so that two checkouts can run their suites side by side.
A test that stops, kills or restarts a server therefore only disturbs its own lane.
``scripts/test`` starts the lanes' stacks; the test session's ``conftest`` points
each xdist worker (``gwN``) at lane N.

    python -m tests.lanes env N     print lane N's settings as shell exports
"""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PORT_STEP = 100
BASE_PORTS = {
    "KAFKA_PORT": 9092,
    "KAFKA_CONTROLLER_PORT": 9093,
    "REGISTRY_PORT": 8081,
    "REGISTRY_MANAGEMENT_PORT": 9001,
    "REDIS_PORT": 6379,
    "PROMETHEUS_PORT": 9090,
}


def lane_env(lane: int) -> dict[str, str]:
    """The stack settings of ``lane``; lane 0 without a TEST_PORT_SHIFT changes nothing."""
    shift = PORT_STEP * lane + int(os.environ.get("TEST_PORT_SHIFT", "0"))
    if shift == 0:
        return {}
    ports = {name: str(port + shift) for name, port in BASE_PORTS.items()}
    return {
        "STACK_DIR": str(REPO / ".stack" / "lanes" / str(shift // PORT_STEP)),
        **ports,
        "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{ports['KAFKA_PORT']}",
        "SCHEMA_REGISTRY_URL": f"http://127.0.0.1:{ports['REGISTRY_PORT']}/apis/ccompat/v7",
        "REDIS_URL": f"redis://127.0.0.1:{ports['REDIS_PORT']}/0",
        "PROMETHEUS_URL": f"http://127.0.0.1:{ports['PROMETHEUS_PORT']}",
    }


def xdist_lane() -> int:
    """This process's lane: its xdist worker number (gw0 -> 0), or 0 without xdist."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return int(worker.removeprefix("gw"))


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "env" or not argv[1].isdigit():
        print("usage: python -m tests.lanes env N", file=sys.stderr)
        return 2
    for name, value in lane_env(int(argv[1])).items():
        print(f"export {name}={shlex.quote(value)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
