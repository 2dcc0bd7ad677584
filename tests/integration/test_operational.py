"""Start-up ordering and liveness: wait for servers with backoff, fail fast on what cannot heal."""
from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from confluent_kafka import Producer

from workers.clients import make_consumer, make_registry
from workers.dlq import read_dead_letters
from workers.serde import OrderSerde, load_schema
from workers.settings import Settings

from ..conftest import isolated_env
from ..pool import ORDERS, dead_letters, run_orders, stats, wait_until
from .conftest import cleanup

pytestmark = pytest.mark.timeout(180)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def env():
    env = isolated_env("ops")
    yield env
    cleanup(Settings.from_env(env))


class Worker:
    """One `orders consume` process, logging to a file; stopped by pid."""

    def __init__(self, env: dict, log_path: Path, *args: str):
        self.log_path = log_path
        self.log_file = open(log_path, "w")
        self.proc = subprocess.Popen([ORDERS, *(args or ("consume", "--partition", "0"))],
                                     env={**env, "PATH": os.environ["PATH"]},
                                     stdout=self.log_file, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_for_log(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log():
                return
            assert self.proc.poll() is None, f"worker exited {self.proc.returncode}:\n{self.log()}"
            time.sleep(0.2)
        raise AssertionError(f"{text!r} not logged:\n{self.log()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(30)
        self.log_file.close()
        return code


def wait_count(env: dict, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stats(env)["count"] == count:
            return
        time.sleep(0.5)
    raise AssertionError(f"count stayed {stats(env)['count']}, expected {count}")


def test_worker_started_before_redis_waits_then_counts(env, tmp_path):
    port = free_port()
    late_env = {**env, "REDIS_URL": f"redis://127.0.0.1:{port}/0", "ORDERS_PARTITIONS": "1"}
    run_orders(late_env, "produce", "--count", "50")
    worker = Worker(late_env, tmp_path / "worker.log")
    redis_proc = None
    try:
        worker.wait_for_log("reason=redis")  # it reached the wait (a sync point, not the assertion)
        time.sleep(3)
        assert worker.proc.poll() is None  # waiting, not crash-looping
        redis_proc = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                                       "--appendonly", "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
        wait_count(late_env, 50)
        assert worker.stop() == 0
    finally:
        worker.stop()
        if redis_proc:
            redis_proc.terminate()
            redis_proc.wait(10)


def test_worker_started_before_kafka_waits_and_stops_cleanly(env, tmp_path):
    down_env = {**env, "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"}
    worker = Worker(down_env, tmp_path / "worker.log")
    worker.wait_for_log("waiting for kafka", timeout=40)
    assert worker.proc.poll() is None
    started = time.monotonic()
    assert worker.stop() == 0
    assert time.monotonic() - started < 15  # well inside supervisor's stopwaitsecs


def test_registry_outage_stalls_instead_of_dead_lettering(env, tmp_path):
    env = {**env, "ORDERS_PARTITIONS": "1"}
    run_orders(env, "produce", "--count", "30")
    down_env = {**env, "SCHEMA_REGISTRY_URL": f"http://127.0.0.1:{free_port()}/apis/ccompat/v7"}
    worker = Worker(down_env, tmp_path / "down.log")
    try:
        worker.wait_for_log("waiting for schema registry")
        time.sleep(2)
        assert stats(env)["count"] == 0
    finally:
        assert worker.stop() == 0
    assert dead_letters(env) == []  # an outage is nobody's fault: nothing dead-lettered
    worker = Worker(env, tmp_path / "up.log")  # the registry is back
    try:
        wait_count(env, 30)
    finally:
        assert worker.stop() == 0


def test_partition_the_topic_does_not_have_is_refused(env):
    result = run_orders(env, "consume", "--partition", "7", check=False, timeout=60)
    assert result.returncode == 2
    assert "partitions 0..2, not 7" in result.stderr


class LateProxy:
    """A TCP forwarder to Kafka's bootstrap address on 127.0.0.1:``port``, listening only once started:
    until then a client that bootstraps through it finds Kafka down."""

    def __init__(self, port: int, target: str):
        host, _, target_port = target.rpartition(":")
        self.port, self.target = port, (host, int(target_port))
        self.server: socket.socket | None = None

    def start(self) -> None:
        self.server = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        assert self.server is not None
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection(self.target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                s.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


def test_dlq_follower_waits_for_kafka_instead_of_exiting(env):
    """`orders dlq --follow` is a long-running program: Kafka not answering when it reads the
    end offsets (a broker restarting, a partition's leader still being elected just after
    `orders init`) is waited for, as the workers do. It exited with 1 instead, and honcho then
    stopped the whole pool (a run of test_pipeline's honcho test saw it)."""
    settings = Settings.from_env(env)
    run_orders(env, "init")
    port = free_port()
    proxy = LateProxy(port, settings.bootstrap_servers)
    late = dataclasses.replace(settings, bootstrap_servers=f"127.0.0.1:{port}")
    consumer = make_consumer(late, late.group_id("dlq-viewer"))
    letters: list = []
    errors: list[BaseException] = []
    waits = threading.Event()  # the reader asked whether to stop: it met Kafka down and is waiting
    done = threading.Event()

    def should_stop() -> bool:
        waits.set()
        return done.is_set()

    def follow() -> None:
        try:
            for letter in read_dead_letters(consumer, settings.dlq_topic, OrderSerde(make_registry(settings),
                                             load_schema(settings.schema_path)), follow=True, stop=should_stop):
                letters.append(letter)
        except BaseException as exc:  # noqa: BLE001  (the assertion below shows it)
            errors.append(exc)

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    try:
        wait_until(lambda: errors or waits.is_set(), "the reader met Kafka down", timeout=60)
        assert not errors, f"the follower ended: {errors[0]!r}"
        proxy.start()
        producer = Producer({"bootstrap.servers": settings.bootstrap_servers})
        producer.produce(settings.dlq_topic, key=b"late", value=b"not an order")
        assert producer.flush(30) == 0
        wait_until(lambda: letters or errors, "the follower prints the dead letter", timeout=60)
        assert not errors, f"the follower ended: {errors[0]!r}"
        assert [letter.key for letter in letters] == [b"late"]
    finally:
        done.set()
        reader.join(30)
        consumer.close()
        proxy.close()
