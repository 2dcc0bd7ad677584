"""The supervisor event listener (``orders supervisor-events``) against the real Redis.

Supervisor's side of the protocol is played here over the listener's stdin and
stdout, event by event, as supervisor sends them (supervisor's docs, "Event
Listeners"); tests/integration/test_metrics.py runs it under supervisord.
"""
from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from workers.clients import make_redis
from workers.settings import Settings
from workers.store import AggregateStore

from ..conftest import isolated_env
from ..pool import ORDERS

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def listener() -> Iterator[tuple[subprocess.Popen, AggregateStore]]:
    env = isolated_env("events", ORDERS_HOST="host-a")
    settings = Settings.from_env(env)
    store = AggregateStore(make_redis(settings), settings.redis_prefix)
    proc = subprocess.Popen([ORDERS, "supervisor-events"], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        yield proc, store
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        store.clear()


def send(proc: subprocess.Popen, event: str, **payload: str) -> None:
    """Wait for READY, send one event, and read its result."""
    assert proc.stdin is not None and proc.stdout is not None
    assert proc.stdout.readline() == "READY\n"
    body = " ".join(f"{k}:{v}" for k, v in payload.items())
    proc.stdin.write(f"ver:3.0 server:supervisor serial:1 pool:events poolserial:1 eventname:{event} "
                     f"len:{len(body)}\n{body}")
    proc.stdin.flush()
    assert proc.stdout.readline() == "RESULT 2\n"
    assert proc.stdout.read(2) == "OK"


def test_unexpected_exits_and_fatals_are_counted_per_host_and_process(listener):
    proc, store = listener
    worker = {"processname": "consumer-0", "groupname": "consumer"}
    send(proc, "PROCESS_STATE_STARTING", **worker, from_state="STOPPED", tries="0")
    assert store.counters("host-a")[0] == {("restarts", "host-a-consumer-0"): 0, ("fatal", "host-a-consumer-0"): 0}
    send(proc, "PROCESS_STATE_EXITED", **worker, from_state="RUNNING", expected="0", pid="101")
    send(proc, "PROCESS_STATE_EXITED", **worker, from_state="RUNNING", expected="1", pid="102")  # a clean stop
    send(proc, "PROCESS_STATE_BACKOFF", **worker, from_state="STARTING")  # died before startsecs
    send(proc, "PROCESS_STATE_FATAL", **worker, from_state="BACKOFF")
    send(proc, "PROCESS_STATE_RUNNING", processname="producer", groupname="producer", from_state="STARTING",
         pid="103")
    assert store.counters("host-a")[0] == {("restarts", "host-a-consumer-0"): 2, ("fatal", "host-a-consumer-0"): 1}
    assert store.counters("host-b")[0] == {}

    # Supervisor closing the stream ends the listener cleanly.
    assert proc.stdout is not None and proc.stdout.readline() == "READY\n"
    assert proc.stdin is not None
    proc.stdin.close()
    assert proc.wait(timeout=20) == 0
