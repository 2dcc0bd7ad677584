"""A broker outage longer than every transaction timeout, under load, with commits in flight.

Kafka is stopped for OUTAGE_S (longer than transaction.timeout.ms, KAFKA_TIMEOUT_S
and the transaction watchdog) while orders stream in, then started again. Each
worker is then in one of the states a failed transactional call can leave behind:
an offsets-only commit whose send_offsets_to_transaction failed, a commit that
timed out, an abort that cannot finish. Whatever it was, each must end clean:
aborted, or exited and restarted by supervisor. No worker may sit alive with a
stopped heartbeat or rewind forever without committing.

Once the broker is back, every worker must resume within RESUME_BOUND_S: its
heartbeat in Redis is written again, by the process supervisor runs for it, and
each partition worker counts again. Then the counts must be exact
(check_invariants), every worker's committed Kafka offset K must reach the end of
what it consumed, and every program must be RUNNING without anybody's help.

Under load the outage rarely catches a worker between send_offsets and the end
of commit_transaction (most hang in send_offsets, which the watchdog ends), so
test_transaction_in_flight_when_the_broker_stops forces the paths: one real
worker (tests/integration/txn_driver.py) has a transaction with a message open,
or only offsets to commit, when the broker stops, and commits then. Before
workers/transaction.py the first case wedged: commit_transaction timed out, the
worker tried to abort, and librdkafka answered "Conflicting commit_transaction
API call is already in progress" for ever, outside any watchdog.
"""
from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from confluent_kafka import TopicPartition

from workers.clients import make_consumer, make_redis, make_registry
from workers.serde import OrderSerde, load_schema
from workers.settings import Settings
from workers.store import AggregateStore, Source
from workers.transaction import EXIT_STUCK

from ..conftest import isolated_env
from ..pool import (
    ORDERS,
    REPO,
    SupervisedPool,
    Truth,
    check_invariants,
    read_retries,
    read_topic,
    run_orders,
    stack,
    wait_until_quiet,
)
from .conftest import cleanup

pytestmark = [pytest.mark.slow, pytest.mark.timeout(480)]

RATE = 1000            # orders/s of the load, before, during and after the outage
OUTAGE_S = 65          # > watchdog (45 s) > KAFKA_TIMEOUT_S (15 s) > transaction.timeout.ms (10 s)
# From the moment the broker is ready again. A transactional call that hangs
# across the broker's return is ended by the watchdog (45 s); supervisor restarts
# the worker at once, which then needs its start-up (bootstrap, init_transactions,
# committed offsets: ~10-20 s on two busy cores). 90 s covers that with a margin.
RESUME_BOUND_S = 90
# supervisor's program name -> the worker's name (its heartbeat key)
WORKERS = {"consumer:consumer-0": ("consumer", 0), "consumer:consumer-1": ("consumer", 1),
           "consumer:consumer-2": ("consumer", 2), "retry:retry-0": ("retry", 0)}


@pytest.fixture(params=["0", "0.3"], ids=["failures-0", "failures-0.3"])
def env(request):
    env = isolated_env("outage", ORDERS_FAILURE_RATE=request.param, RETRY_BACKOFF_MS="200",
                       PRODUCE_RATE="0.001")
    yield env
    cleanup(Settings.from_env(env))


def supervised_pid(pool: SupervisedPool, program: str) -> int | None:
    try:
        return pool.pid(program) or None
    except ValueError:  # not running right now (being restarted)
        return None


def check_counts(env: dict, settings: Settings) -> None:
    """check_invariants; without failures there are no retries for it to check, so the rest of it."""
    if settings.failure_rate:
        check_invariants(env, settings)
        return
    serde = OrderSerde(make_registry(settings), load_schema(settings.schema_path))
    truth = Truth(read_topic(settings.bootstrap_servers, settings.orders_topic), serde, settings)
    stats, dlq = wait_until_quiet(env, truth.count, 0)
    assert dlq == []
    assert stats["count"] == truth.count == truth.total
    assert round(stats["sum"] * 100) == truth.cents
    for p in stats["partitions"]:
        assert p["count"] == truth.count_by_partition.get(p["partition"], 0)


def not_resumed(pool: SupervisedPool, store: AggregateStore, settings: Settings, since_ms: int) -> list[str]:
    """The workers that have not yet resumed since ``since_ms``, each with why."""
    sources = [Source(settings.orders_topic, p) for p in range(settings.partitions)]
    names = {program: settings.member(*slot) for program, slot in WORKERS.items()}
    snap = store.snapshot(settings.partitions, sources=sources, workers=list(names.values()))
    waiting = []
    for program, name in names.items():
        beat, pid = snap["workers"][name], supervised_pid(pool, program)
        if beat is None:
            waiting.append(f"{name}: no heartbeat (supervisor pid {pid})")
        elif beat["at_ms"] < since_ms:
            waiting.append(f"{name}: heartbeat {since_ms - beat['at_ms']} ms older than the broker's return")
        elif beat["pid"] != pid:
            waiting.append(f"{name}: heartbeat from pid {beat['pid']}, supervisor runs {pid}")
    for source in sources:
        if snap["sources"][source].get("updated_ms", 0) < since_ms:
            waiting.append(f"{source}: nothing counted since the broker's return")
    return waiting


def wait_until_resumed(pool, store, settings, since_ms: int, timeout: float) -> float:
    """Wait until every worker resumed; returns the seconds it took."""
    start = time.monotonic()
    while True:
        waiting = not_resumed(pool, store, settings, since_ms)
        if not waiting:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not resumed {timeout}s after the broker came back: {waiting}\n{pool.logs(15)}")
        time.sleep(0.5)


def consumed_ends(settings: Settings) -> dict[str, dict[Source, int]]:
    """For each worker's group: where its committed offset must end, per source it consumed."""
    orders = {}
    reader = make_consumer(settings, "t-outage-watermarks")
    try:
        for p in range(settings.partitions):
            _, high = reader.get_watermark_offsets(TopicPartition(settings.orders_topic, p), timeout=10)
            if high > 0:
                orders[Source(settings.orders_topic, p)] = high  # no transaction markers on orders
    finally:
        reader.close()
    retry: dict[Source, int] = {}
    for msg in read_retries(settings):
        source = Source(msg.topic(), msg.partition())
        retry[source] = max(retry.get(source, 0), msg.offset() + 1)  # the retry topic has markers
    ends = {settings.group_id("workers"): orders}
    if retry:
        ends[settings.group_id("retry-workers")] = retry
    return ends


def uncommitted(settings: Settings, ends: dict[str, dict[Source, int]]) -> list[str]:
    behind = []
    for group, sources in ends.items():
        consumer = make_consumer(settings, group)
        try:
            tps = consumer.committed([TopicPartition(s.topic, s.partition) for s in sources], timeout=10)
        finally:
            consumer.close()
        for tp in tps:
            end = sources[Source(tp.topic, tp.partition)]
            if tp.offset != end:
                behind.append(f"{group} {tp.topic}:{tp.partition} committed {tp.offset}, consumed to {end}")
    return behind


def test_broker_outage_longer_than_transaction_timeouts(env, pool, tmp_path: Path):
    settings = Settings.from_env(env)
    store = AggregateStore(make_redis(settings), settings.redis_prefix)
    load_log = tmp_path / "load.log"
    load = subprocess.Popen([ORDERS, "produce", "--count", "0", "--rate", str(RATE),
                             "--record", str(tmp_path / "delivered.jsonl")],
                            env={**env, "PATH": os.environ["PATH"]}, stderr=load_log.open("w"))
    try:
        # Steady load, and (with failures) transactions carrying retries open all the time.
        deadline = time.monotonic() + 90
        while True:
            total = store.snapshot(0)["total"]
            if total.count >= 5 * RATE and (settings.failure_rate == 0 or total.retried > 0):
                break
            assert time.monotonic() < deadline, f"the pool did not get going: {total}\n{pool.logs()}"
            time.sleep(0.2)
        stack("stop", "kafka")
        time.sleep(OUTAGE_S)  # the fault itself: the broker stays away this long
        stack("start", "kafka")  # returns once a transaction commits on it
        back_ms = int(time.time() * 1000)

        try:
            took = wait_until_resumed(pool, store, settings, back_ms, RESUME_BOUND_S)
        except AssertionError as exc:
            tail = "\n".join(load_log.read_text(errors="replace").splitlines()[-30:])
            raise AssertionError(f"{exc}\n--- the load producer (running: {load.poll() is None}):\n{tail}") from None
        print(f"every worker resumed {took:.1f} s after the broker was ready again (bound {RESUME_BOUND_S} s)")
    finally:
        if load.poll() is None:
            load.send_signal(signal.SIGTERM)  # it flushes what it has before exiting
    assert load.wait(120) == 0, "the load producer reported undelivered orders"

    check_counts(env, settings)
    ends = consumed_ends(settings)
    deadline = time.monotonic() + 60  # offsets-only commits run every COMMIT_INTERVAL_S (5 s)
    while behind := uncommitted(settings, ends):
        assert time.monotonic() < deadline, f"committed offsets stuck: {behind}\n{pool.logs(15)}"
        time.sleep(1)
    # Nobody had to step in: every program runs, and each worker's heartbeat is
    # written by the very process supervisor runs for it.
    pool.wait_all_running(timeout=30)
    assert not_resumed(pool, store, settings, back_ms) == []


# -- forcing the paths: one worker's transaction, in flight when the broker stops --

FATAL_EXIT = 4  # txn_driver: a FatalWorkerError (the CLI exits, supervisor restarts)
# From the broker's return: the rest of a watchdog period (45 s) at most, then a
# commit on the recovered broker.
RECOVER_BOUND_S = 90


class Driver:
    """tests/integration/txn_driver.py in its own process (the watchdog may end it); stopped by pid."""

    def __init__(self, env: dict, mode: str, log_path: Path):
        self.log_path = log_path
        self.log_file = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.integration.txn_driver", mode], cwd=REPO,
                                     env={**env, "PATH": os.environ["PATH"], "PYTHONPATH": str(REPO)},
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log_file, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def expect(self, word: str, timeout: float) -> None:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"driver did not say {word!r} within {timeout}s:\n{self.log()}") from None
        assert line == word, f"driver said {line!r}, expected {word!r}:\n{self.log()}"

    def send(self, word: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(word + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # it exited meanwhile (the watchdog): its exit code tells

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"driver still running {timeout}s after the broker came back (wedged):\n"
                                 f"{self.log()}") from None

    def log(self) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-40:])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.log_file.close()


@pytest.fixture
def driver_env():
    env = isolated_env("txn", ORDERS_FAILURE_RATE="0")
    run_orders(env, "init")
    run_orders(env, "produce", "--count", "300")
    yield env
    cleanup(Settings.from_env(env))


# "offsets" (txn_driver.py) is left out of CI: against a real broker send_offsets_to_transaction
# hangs rather than fails, the watchdog ends it as in the outage test above, and it never
# reproduced a wedge; each run costs a 65 s outage. Run it by hand with -k offsets after
# adding it here.
@pytest.mark.parametrize("mode", ["commit"])
def test_transaction_in_flight_when_the_broker_stops(driver_env, mode, tmp_path: Path):
    """``commit``: commit_transaction of an open transaction times out. ``offsets``: an
    offsets-only commit (begin + send_offsets_to_transaction) with the broker gone.

    Either way the worker must end clean without help: the call returns and the
    worker commits again once the broker is back, or the process exits (watchdog,
    fatal error) and a restarted one commits. Never alive and stuck.
    """
    settings = Settings.from_env(driver_env)
    driver = Driver(driver_env, mode, tmp_path / "driver.log")
    restarted = None
    try:
        driver.expect("ready", 90)
        stack("stop", "kafka")
        driver.send("stopped")
        time.sleep(OUTAGE_S)  # the fault itself
        stack("start", "kafka")
        driver.send("started")
        code = driver.wait(RECOVER_BOUND_S)
        assert code in (0, EXIT_STUCK, FATAL_EXIT), f"driver exited {code}:\n{driver.log()}"
        if code != 0:  # exited for the supervisor: a restart must be clean
            restarted = Driver(driver_env, "restart", tmp_path / "restarted.log")
            assert restarted.wait(RECOVER_BOUND_S) == 0, restarted.log()
    finally:
        driver.kill()
        if restarted:
            restarted.kill()
    group = settings.group_id("partition-0")  # the driver pins partition 0 (explicit assignment)
    ends = {s: end for s, end in consumed_ends(settings)[settings.group_id("workers")].items() if s.partition == 0}
    assert uncommitted(settings, {group: ends}) == []
