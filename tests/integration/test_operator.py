"""Operator tools on a real pool: status figures, DLQ summary, replay, --watch in a terminal."""
from __future__ import annotations

import json
import os
import pty
import select
import signal
import socket
import time

import pytest

from workers.clients import make_registry
from workers.processing import attempt_fails, price_cents
from workers.serde import OrderSerde, load_schema
from workers.settings import Settings

from ..conftest import isolated_env
from ..pool import (
    ORDERS,
    SupervisedPool,
    Truth,
    dead_letters,
    read_retries,
    read_topic,
    run_orders,
    stats,
    status_json,
    wait_until,
    wait_until_quiet,
)
from .conftest import cleanup

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def env():
    env = isolated_env("ops", ORDERS_FAILURE_RATE="0.4", RETRY_BACKOFF_MS="100", RETRY_BACKOFF_MULTIPLIER="1",
                       PRODUCE_RATE="0.001")
    yield env
    cleanup(Settings.from_env(env))


def test_status_dlq_summary_and_replay(env, tmp_path):
    settings = Settings.from_env(env)
    serde = OrderSerde(make_registry(settings), load_schema(settings.schema_path))
    (tmp_path / "a").mkdir()
    pool = SupervisedPool(env, tmp_path / "a")
    pool.start()
    try:
        run_orders(env, "produce", "--count", "1500", "--seed", "3")
        truth = Truth(read_topic(settings.bootstrap_servers, settings.orders_topic), serde, settings)
        assert truth.expected_dead, "the failure rate should dead-letter some orders"
        wait_until_quiet(env, truth.count, len(truth.expected_dead))

        status = status_json(env)
        assert status["pool"] == {"state": "running", "manager": "supervisor", "workers_alive": 4,
                                  "hosts": [socket.gethostname()], "partitions_owned": 3, "partitions": 3}
        owners = {part["owner"] for part in status["partitions"]}
        assert owners <= {settings.member("consumer", slot) for slot in range(3)}  # the group spread them
        assert status["dlq"]["size"] == len(truth.expected_dead)
        assert status["global"]["count"] == truth.count
        # One line per delay level (issue 14), each with its backlog and waiting retries.
        assert [level["topic"] for level in status["retry"]["levels"]] == settings.retry_topics
        assert all(level["current"] and level["waiting"] == 0 for level in status["retry"]["levels"])
        assert sum(level["backlog"] for level in status["retry"]["levels"]) == status["retry"]["backlog"]
        for part in status["partitions"]:
            assert part["alive"] and part["lag"] == 0
            assert part["count"] == truth.count_by_partition.get(part["partition"], 0)
        assert status["alerts"] == []
        # Every retry was handled once and measured: how late, never early (lateness >= 0).
        retried = len(read_retries(settings))
        late = wait_until(lambda: (r := status_json(env)["retry"]["lateness"])["count"] == retried and r,
                          "the retry worker's heartbeat has every retry's lateness", timeout=30)
        assert retried > 0 and late["p99_ms"] >= late["p50_ms"] >= 0 and late["max_ms"] >= 0

        summary = json.loads(run_orders(env, "dlq", "--summary", "--json").stdout)
        assert summary == {"total": len(truth.expected_dead), "replayed": 0,
                           "by_error_type": {"DownstreamUnavailable": {"count": len(truth.expected_dead),
                                                                       "replayed": 0}}}
        one = sorted(truth.expected_dead)[0]
        filtered = [json.loads(line) for line in
                    run_orders(env, "dlq", "--json", "--order-id", one).stdout.splitlines()]
        assert [d["order"]["orderId"] for d in filtered] == [one]
        assert run_orders(env, "dlq", "--json", "--error-type", "InvalidOrder").stdout == ""

        dry = run_orders(env, "dlq", "replay", "--dry-run")
        assert f"dry run: {len(truth.expected_dead)} dead letter(s) would be replayed" in dry.stdout
        time.sleep(2)
        assert stats(env)["count"] == truth.count
        assert len(read_topic(settings.bootstrap_servers, settings.orders_topic)) == truth.total
    finally:
        pool.stop()

    # The downstream outage is fixed: the pool comes back without failures, then the
    # operator replays every dead letter, twice.
    (tmp_path / "b").mkdir()
    fixed_env = {**env, "ORDERS_FAILURE_RATE": "0"}
    pool = SupervisedPool(fixed_env, tmp_path / "b")
    pool.start()
    try:
        out = run_orders(fixed_env, "dlq", "replay").stdout
        assert f"replayed {len(truth.expected_dead)} dead letter(s)" in out
        wait_until_quiet(fixed_env, truth.total - truth.undecodable, len(truth.expected_dead))
        again = run_orders(fixed_env, "dlq", "replay").stdout
        assert "replayed 0 dead letter(s)" in again and "already replayed" in again
        run_orders(fixed_env, "dlq", "replay", "--again")
        final = wait_until(lambda: (s := status_json(fixed_env))["global"]["duplicate_replays"]
                           >= len(truth.expected_dead) and s, "the second replay is handled", timeout=60)
        assert final["global"]["count"] == truth.total  # each replayed order counted exactly once
        assert final["global"]["duplicate_replays"] == len(truth.expected_dead)
        letters = dead_letters(fixed_env)
        assert len(letters) == len(truth.expected_dead)  # replay adds no dead letters here
        assert all(d["replayed_at"] for d in letters)
        summary = json.loads(run_orders(fixed_env, "dlq", "--summary", "--json").stdout)
        assert summary["replayed"] == len(truth.expected_dead)
    finally:
        pool.stop()


def test_a_replay_gets_fresh_attempts(env, tmp_path):
    """A dead letter replayed while the downstream still fails now and then is not doomed.

    The fault injector draws per (order, attempt, replay): a replay's attempts are
    new draws, so most replays succeed at this failure rate, and those that fail
    again are dead-lettered once more as replays of the first dead letter.
    """
    settings = Settings.from_env(env)
    serde = OrderSerde(make_registry(settings), load_schema(settings.schema_path))
    pool = SupervisedPool(env, tmp_path)
    pool.start()
    try:
        run_orders(env, "produce", "--count", "600", "--seed", "5")
        truth = Truth(read_topic(settings.bootstrap_servers, settings.orders_topic), serde, settings)
        _, first = wait_until_quiet(env, truth.count, len(truth.expected_dead))
        assert first, "the failure rate should dead-letter some orders"

        attempts = range(1, settings.max_attempts + 1)
        fails_again = {d["id"] for d in first
                       if all(attempt_fails(d["order"]["orderId"], a, settings.failure_rate, replay_of=d["id"])
                              for a in attempts)}
        succeeds = [d for d in first if d["id"] not in fails_again]
        assert succeeds, "at this failure rate most replays should succeed"
        run_orders(env, "dlq", "replay")

        final, letters = wait_until_quiet(env, truth.count + len(succeeds), len(first) + len(fails_again))
        cents = sum(price_cents(d["order"]) for d in succeeds)
        assert round(final["sum"] * 100) == truth.cents + cents
        again = [d for d in letters if d["replay_of"]]
        assert sorted(d["replay_of"] for d in again) == sorted(fails_again)
        assert len(letters) == len(first) + len(fails_again)
    finally:
        pool.stop()


def read_pty(fd: int, seconds: float) -> tuple[bytes, bool]:
    """What the terminal's program writes within ``seconds``, and whether it closed its end."""
    output = b""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], min(left, 0.2))
        if ready:
            try:
                output += os.read(fd, 65536)
            except OSError:  # EIO: the program has exited
                return output, True
    return output, False


def wait_for_exit(pid: int, fd: int, timeout: float) -> tuple[int | None, bytes]:
    """Wait for the program to exit while reading its terminal, so that it never blocks writing to it."""
    output = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status, output + read_pty(fd, 0.2)[0]
        output += read_pty(fd, 0.2)[0]
    # Still running: its Python stacks (faulthandler, on SIGABRT) say where it hangs.
    os.kill(pid, signal.SIGABRT)
    output += read_pty(fd, 3)[0]
    os.waitpid(pid, 0)
    return None, output


def test_status_watch_renders_in_a_terminal_and_quits_on_ctrl_c(env):
    pid, fd = pty.fork()
    if pid == 0:  # child: the terminal's program
        os.execve(ORDERS, [ORDERS, "status", "--watch", "--interval", "0.5"],
                  {**env, "PATH": os.environ["PATH"], "TERM": "xterm", "PYTHONFAULTHANDLER": "1"})
    output = b""
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and output.count(b"workers alive") < 2:
            more, closed = read_pty(fd, 0.5)
            output += more
            if closed:
                break
        os.kill(pid, signal.SIGINT)
        status, more = wait_for_exit(pid, fd, timeout=30)
        output += more
    finally:
        os.close(fd)
    text = output.decode(errors="replace")
    assert status is not None, f"still running 30 s after Ctrl-C:\n{text[-4000:]}"
    assert text.count("workers alive") >= 2, text  # refreshed at least once
    assert "Traceback" not in text
    assert "\x1b[" in text  # styled for a terminal
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, text
