"""The pool under honcho when a worker dies: honcho stops everything and restarts nothing.

Honcho is a foreman clone, not a supervisor: when one process exits it sends TERM
to the others (KILL after 5 s) and exits itself. What it does not lose is what
was counted: after ``honcho start`` again every order is counted exactly once or
dead-lettered exactly once, like under supervisord.
"""
from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import psutil
import pytest

from workers.settings import Settings

from ..conftest import isolated_env
from ..pool import ORDERS, REPO, check_invariants, free_port, run_orders, stats, wait_until
from .conftest import cleanup

pytestmark = pytest.mark.timeout(600)

# The processes of `honcho start -c consumer=3`, by the name honcho gives each
# (HONCHO_PROCESS_NAME): three workers of the orders topic's consumer group.
CONCURRENCY = "consumer=3"
PROGRAMS = ("consumer.1", "consumer.2", "consumer.3", "retry.1", "producer.1", "dlqviewer.1", "metrics.1")


class Honcho:
    """``honcho start`` with the repo's Procfile, in its own folder; stopped by pid."""

    def __init__(self, env: dict, folder: Path):
        # The Procfile's producer runs but at a rate too low to matter, so the test
        # knows what was produced.
        self.env = {"METRICS_PORT": str(free_port()), **env, "PATH": "/usr/bin:/bin", "PRODUCE_RATE": "0.01"}
        self.folder = folder
        (folder / "Procfile").write_text((REPO / "Procfile").read_text())
        (folder / ".venv").symlink_to(REPO / ".venv")
        self.proc: subprocess.Popen | None = None
        self.runs = 0

    def start(self) -> dict[str, psutil.Process]:
        """Start honcho and wait until all the Procfile's programs run; returns them by Procfile name."""
        self.runs += 1
        with open(self.folder / f"honcho-{self.runs}.log", "w") as log:
            self.proc = subprocess.Popen([str(REPO / ".venv/bin/honcho"), "start", "-c", CONCURRENCY], cwd=self.folder,
                                         env=self.env, stdout=log, stderr=subprocess.STDOUT)
        return wait_until(self.programs, "honcho started all the Procfile's programs", timeout=60)

    def programs(self) -> dict[str, psutil.Process] | None:
        """The running ``orders`` processes under honcho, if all are there."""
        assert self.proc is not None
        found = {}
        try:
            descendants = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            raise AssertionError(f"honcho exited {self.proc.poll()}: {self.log()}") from None
        for child in descendants:
            try:
                name = child.environ().get("HONCHO_PROCESS_NAME")
                running = "orders" in " ".join(child.cmdline()) and child.status() != psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                continue
            if name in PROGRAMS and running:
                found[name] = child
        return found if len(found) == len(PROGRAMS) else None

    def log(self) -> str:
        return (self.folder / f"honcho-{self.runs}.log").read_text(errors="replace")[-5000:]

    def stop(self) -> None:
        """TERM to honcho (it stops its processes), KILL to what is left after 30 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            descendants = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            descendants = []
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        for child in descendants:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass


def all_gone(processes: list[psutil.Process]) -> bool:
    def gone(p: psutil.Process) -> bool:
        try:
            return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True
    return all(gone(p) for p in processes)


@pytest.fixture
def pool_env():
    env = isolated_env("honcho", ORDERS_FAILURE_RATE="0.25", RETRY_BACKOFF_MS="200", BATCH_SIZE="500")
    yield env
    cleanup(Settings.from_env(env))


@pytest.fixture
def honcho(pool_env, tmp_path):
    honcho = Honcho(pool_env, tmp_path)
    yield honcho
    honcho.stop()


def test_a_worker_killed_under_honcho_stops_the_pool_and_loses_nothing(honcho, pool_env):
    settings = Settings.from_env(pool_env)
    programs = honcho.start()
    run_orders(pool_env, "produce", "--count", "2000", "--seed", "21")
    # All but the odd dead letter of the first 2000 (failure rate 0.25, 4 attempts).
    wait_until(lambda: stats(pool_env)["count"] >= 1900, "the pool counts the first orders", timeout=120)

    # Kill partition 1's worker while orders stream in.
    producing = subprocess.Popen([ORDERS, "produce", "--count", "4000", "--rate", "1000"],
                                 env={**pool_env, "PATH": "/usr/bin:/bin"}, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: stats(pool_env)["count"] > 2000, "the pool counts the streamed orders")
        others = [p for name, p in programs.items() if name != "consumer.2"]
        programs["consumer.2"].send_signal(signal.SIGKILL)

        # Honcho does not restart the worker: it stops every other program and exits.
        assert honcho.proc is not None
        assert honcho.proc.wait(timeout=30) != 0
        wait_until(lambda: all_gone(others), "every other program stopped", timeout=15, interval=0.2)

        # Orders produced from now on wait on the topic: with no worker left, the
        # aggregate stays where the pool left it.
        stopped_at = stats(pool_env)
        assert producing.wait(60) == 0
    finally:
        if producing.poll() is None:
            producing.kill()
    assert stats(pool_env) == stopped_at

    # Starting honcho again resumes from what Redis and Kafka recorded: exact.
    honcho.start()
    truth = check_invariants(pool_env, settings)
    assert truth.total >= 6000
    assert truth.count >= stopped_at["count"]
