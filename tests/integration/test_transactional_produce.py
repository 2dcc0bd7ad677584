"""`orders produce --transactional`: what it reports delivered is exactly what is on the topic, once.

The idempotent producer cannot promise that. A request in flight when its broker
stalls has an unknown outcome: librdkafka reports the orders timed out, and the
broker may append them when it wakes. `orders produce` then says "not delivered"
about orders that are on the topic; whoever sends them again writes them twice.
Under leader changes librdkafka can even send a batch again itself
(confluentinc/librdkafka#4953, the soak's bug 6). In transactions an order with an
unknown outcome belongs to a transaction that aborts, so no read_committed reader
ever sees it, and the producer sends it again in a new one.

The scenario: the lane's broker is paused (SIGSTOP, as a long GC pause or a frozen
VM would) for longer than the producer's message timeout while orders stream in.
On the code before transactions the producer exited 1 with 7,023 of 42,862 orders
"not delivered", 9 of which were on the topic (this test's settings).
"""
from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from confluent_kafka import KafkaException

from workers.clients import make_admin
from workers.settings import Settings

from ..conftest import isolated_env
from ..pool import ORDERS, read_topic, wait_until
from .conftest import cleanup

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[2]
MESSAGE_TIMEOUT_MS = 5000  # librdkafka's default is 300 s: the scenario is the same, the pause shorter
PAUSE_S = 8                # longer than the message timeout, shorter than the broker's session (9 s)
TRANSACTION_TIMEOUT_MS = 4000
PRODUCER_PAUSE_S = 9       # past the transaction timeout and the broker's 1 s check for expired ones
RATE = 2000


def produce_env(name: str, **extra: str) -> dict[str, str]:
    # PRODUCE_TRANSACTIONAL rather than --transactional: the code before it ignored the variable,
    # so the first test ran there, in the idempotent mode, and failed.
    return isolated_env(name, PRODUCE_TRANSACTIONAL="1", **extra)


def lane_broker_pid() -> int:
    """The pid of this lane's Kafka (scripts/stack's pid file), checked to be that stack's java."""
    stack_dir = Path(os.environ.get("STACK_DIR", REPO / ".stack"))
    pid = int((stack_dir / "run" / "kafka.pid").read_text().strip())
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    assert "java" in cmdline and str(stack_dir) in cmdline, f"pid {pid} is not this stack's broker: {cmdline[:200]}"
    return pid


def recorded(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def wait_for_broker(settings: Settings) -> None:
    """The broker leads the test topic again (after a pause it may fence itself for a moment)."""
    admin = make_admin(settings)

    def leads() -> bool:
        try:
            topic = admin.list_topics(settings.orders_topic, timeout=5).topics[settings.orders_topic]
        except (KafkaException, KeyError):
            return False
        return bool(topic.partitions) and all(p.leader >= 0 and p.error is None for p in topic.partitions.values())
    wait_until(leads, "the broker leads the orders topic again", timeout=60)


def running(producer: subprocess.Popen, log_path: Path) -> bool:
    """True while it runs; an exit before it was asked to stop fails the test at once, with its last words."""
    status = producer.poll()
    if status is not None:
        raise AssertionError(f"orders produce exited {status}: "
                             f"{log_path.read_text(errors='replace').splitlines()[-2:]}")
    return True


def produce_through(env: dict, tmp_path: Path, pause: Callable[[subprocess.Popen], None]) -> None:
    """`orders produce` at RATE; ``pause`` once 1,000 orders are recorded; stopped once it delivers again.

    Then what it recorded must be exactly what is on the topic, each order once, and it exits 0.
    """
    settings = Settings.from_env(env)
    record = tmp_path / "delivered.jsonl"
    log_path = tmp_path / "produce.log"
    with open(log_path, "ab") as log_file:
        producer = subprocess.Popen([ORDERS, "produce", "--count", "0", "--rate", str(RATE), "--record", str(record)],
                                    env={**env, "PATH": "/usr/bin:/bin"}, stdout=log_file, stderr=log_file)
    try:
        wait_until(lambda: running(producer, log_path) and len(recorded(record)) >= 1000,
                   "the producer reported 1,000 deliveries", timeout=90, interval=0.2)
        pause(producer)
        before = len(recorded(record))
        wait_until(lambda: running(producer, log_path) and len(recorded(record)) >= before + 2 * RATE,
                   "the producer delivers again after the pause", timeout=90, interval=0.2)
        producer.send_signal(signal.SIGTERM)
        status = producer.wait(90)
    finally:
        if producer.poll() is None:
            producer.kill()
            producer.wait(10)
        wait_for_broker(settings)

    reported = collections.Counter(o["orderId"] for o in recorded(record))
    on_topic = collections.Counter(m.key().decode() for m in read_topic(settings.bootstrap_servers,
                                                                          settings.orders_topic, timeout=60))
    assert [k for k, n in on_topic.items() if n > 1] == [], "an order is on the topic twice"
    assert [k for k, n in reported.items() if n > 1] == [], "an order was reported delivered twice"
    assert set(on_topic) - set(reported) == set(), "orders on the topic that the producer did not report delivered"
    assert set(reported) - set(on_topic) == set(), "orders reported delivered that are not on the topic"
    log_text = log_path.read_text(errors="replace")
    assert status == 0, f"orders produce exited {status}: {log_text.splitlines()[-3:]}"
    assert len(reported) > before


def paused(pid: int, seconds: float) -> None:
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(seconds)  # the fault's length, not a wait for a condition
    finally:
        os.kill(pid, signal.SIGCONT)


def test_a_broker_paused_past_the_message_timeout_leaves_every_order_on_the_topic_once(tmp_path):
    env = produce_env("txnproduce", KAFKA_MESSAGE_TIMEOUT_MS=str(MESSAGE_TIMEOUT_MS))
    try:
        broker = lane_broker_pid()
        produce_through(env, tmp_path, lambda producer: paused(broker, PAUSE_S))
    finally:
        cleanup(Settings.from_env(env))


def test_a_producer_paused_past_its_transaction_timeout_sends_that_transaction_again(tmp_path):
    """Soak run 8 (bug 9): the coordinator expired the paused producer's open transaction.

    On its return its orders timed out (abortable) and the abort was refused as fenced
    (run 8, and this test on the old code), or the commit itself was refused as fenced
    (this test, once the first was fixed). The producer took either for a commit of
    unknown outcome and exited 1 with the transaction's orders undelivered, though an
    expired transaction is aborted and no other process uses the producer's id.
    """
    env = produce_env("txnpause", TRANSACTION_TIMEOUT_MS=str(TRANSACTION_TIMEOUT_MS))
    try:
        produce_through(env, tmp_path, lambda producer: paused(producer.pid, PRODUCER_PAUSE_S))
    finally:
        cleanup(Settings.from_env(env))
