"""Secrets never reach a log or the CLI's output; hostile message text is shown escaped, on one line.

Real ``orders`` processes run against the real stack (Kafka, registry) with every
librdkafka secret set, and against a password-protected redis-server that this
test starts on a free local port (and stops by pid), reached with the password
in each URL form. Their whole output is searched for the secrets.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest
import redis
from confluent_kafka import Producer

from workers.clients import make_admin, make_registry
from workers.serde import OrderSerde, load_schema, subject_for
from workers.settings import Settings
from workers.topics import ensure_topics

from ..conftest import isolated_env
from ..pool import ORDERS, run_orders, wait_until
from .conftest import cleanup
from .test_hostile_input import Workers, delete_subjects

SECRET = "S3CRET"  # every secret value below contains it
# Each librdkafka property flagged _RK_SENSITIVE that an environment variable can
# set; librdkafka accepts all of them on a PLAINTEXT connection (and ignores them).
KAFKA_SECRETS = {
    "KAFKA_SASL_USERNAME": f"user-{SECRET}-1",
    "KAFKA_SASL_PASSWORD": f"pw-{SECRET}-2",
    "KAFKA_SSL_KEY_PASSWORD": f"keypw-{SECRET}-3",
    "KAFKA_SSL_KEYSTORE_PASSWORD": f"storepw-{SECRET}-4",
    "KAFKA_SASL_OAUTHBEARER_CONFIG": f"principal=orders scope=x secret={SECRET}-5",
    "KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET": f"client-{SECRET}-6",
    "KAFKA_SASL_OAUTHBEARER_ASSERTION_PRIVATE_KEY_PASSPHRASE": f"phrase-{SECRET}-7",
    "KAFKA_SSL_KEY_PEM": f"-----BEGIN PRIVATE KEY-----{SECRET}-8",
    "KAFKA_SSL_CA_PEM": f"-----BEGIN CERTIFICATE-----{SECRET}-9",
    "KAFKA_SSL_KEY_LOCATION": f"/nonexistent/{SECRET}-10.key",
    "KAFKA_SASL_OAUTHBEARER_ASSERTION_PRIVATE_KEY_PEM": f"pem-{SECRET}-11",
    "KAFKA_SASL_OAUTHBEARER_ASSERTION_PRIVATE_KEY_FILE": f"/nonexistent/{SECRET}-12.pem",
    "KAFKA_SASL_OAUTHBEARER_CLIENT_CREDENTIALS_CLIENT_SECRET": f"alias-{SECRET}-13",
}
REDIS_PASSWORD = f"redis-{SECRET}-pw"          # the default user's
REDIS_USER_PASSWORD = f"orders-{SECRET}-pw"    # the ACL user ``orders``'s

HOSTILE = b"\x1b[31mFAKE\nERROR x=1\r\x07"
HOSTILE_SHOWN = "\\x1b[31mFAKE\\nERROR x=1\\r\\x07"
CONTROL = [chr(c) for c in range(32) if chr(c) != "\n"] + ["\x7f", "\x9b"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def private_redis(tmp_path):
    """A redis-server with a password (and an ACL user), on 127.0.0.1 only; stopped by its pid."""
    port = free_port()
    conf = tmp_path / "redis.conf"
    conf.write_text(f"port {port}\nbind 127.0.0.1\nsave \"\"\nappendonly no\ndir {tmp_path}\n"
                    f"requirepass {REDIS_PASSWORD}\nuser orders on >{REDIS_USER_PASSWORD} ~* &* +@all\n")
    with open(tmp_path / "redis.log", "w") as out:
        proc = subprocess.Popen(["redis-server", str(conf)], stdout=out, stderr=subprocess.STDOUT)
    try:
        client = redis.Redis(host="127.0.0.1", port=port, password=REDIS_PASSWORD, socket_connect_timeout=1)

        def answers() -> bool:
            assert proc.poll() is None, (tmp_path / "redis.log").read_text()
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False
        wait_until(answers, "the private redis-server answers", timeout=20, interval=0.1)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def assert_no_secret(what: str, text: str) -> None:
    assert SECRET not in text, f"{what} shows a secret:\n" + "\n".join(
        line for line in text.splitlines() if SECRET in line)


def run_worker_until_started(env: dict, log_path: Path) -> str:
    """Start ``orders consume --partition 0``, wait until it runs, stop it by pid; returns its log."""
    with open(log_path, "w") as out:
        proc = subprocess.Popen([ORDERS, "consume", "--partition", "0"], env={"PATH": os.environ["PATH"], **env},
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: proc.poll() is not None or "start worker=partition-0 " in log_path.read_text(),
                   "the worker started", timeout=60, interval=0.2)
        assert proc.poll() is None, log_path.read_text()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)
    return log_path.read_text()


@pytest.mark.timeout(240)
def test_no_secret_in_any_output(private_redis, tmp_path):
    forms = {
        "default user in the URL": f"redis://:{REDIS_PASSWORD}@127.0.0.1:{private_redis}/0",
        "user and password in the URL": f"redis://orders:{REDIS_USER_PASSWORD}@127.0.0.1:{private_redis}/0",
        "password as a query parameter": f"redis://127.0.0.1:{private_redis}/0?password={REDIS_PASSWORD}",
    }
    env = isolated_env("secrets", **KAFKA_SECRETS, SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO=f"orders:reg-{SECRET}-pw",
                       REDIS_URL=forms["default user in the URL"])
    settings = Settings.from_env(env)
    try:
        assert_no_secret("orders init", str(run_orders(env, "init")))
        for n, (form, url) in enumerate(forms.items(), start=1):
            env["REDIS_URL"] = url
            log = run_worker_until_started(env, tmp_path / f"worker-{n}.log")
            assert "settings " in log and "redis_url=redis://" in log, log  # the settings were logged, hidden
            assert_no_secret(f"the worker's log ({form})", log)
            produced = run_orders(env, "produce", "--count", "2")
            assert_no_secret(f"orders produce ({form})", produced.stdout + produced.stderr)
            for args in (("stats",), ("stats", "--json"), ("dlq",), ("dlq", "--json"), ("dlq", "--summary"),
                         ("status", "--json"), ("dlq", "replay", "--dry-run")):
                result = run_orders(env, *args)
                assert_no_secret(f"orders {' '.join(args)} ({form})", result.stdout + result.stderr)
        # The registry's password in its URL instead (the client takes user info from the URL).
        registry_url = env["SCHEMA_REGISTRY_URL"].replace("://", f"://orders:reg-{SECRET}-url@", 1)
        registry = {**env, "SCHEMA_REGISTRY_URL": registry_url}
        del registry["SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO"]
        assert_no_secret("orders init (registry URL)", str(run_orders(registry, "init")))
        log = run_worker_until_started(registry, tmp_path / "worker-r.log")
        assert_no_secret("the worker's log (registry URL)", log)
        # TLS against a plain server fails: the error and the retries must hide the password too.
        env["REDIS_URL"] = f"rediss://:{REDIS_PASSWORD}@127.0.0.1:{private_redis}/0"
        failed = run_orders(env, "stats", check=False)
        assert failed.returncode == 1, failed
        assert_no_secret("a failing orders stats (rediss)", failed.stdout + failed.stderr)
        # An unknown librdkafka setting fails by name, without echoing the secrets set beside it.
        bad = run_orders({**env, "KAFKA_NO_SUCH_SETTING": "1"}, "produce", "--count", "1", check=False)
        assert bad.returncode != 0 and "no.such.setting" in bad.stdout + bad.stderr, bad
        assert_no_secret("a failing orders produce", bad.stdout + bad.stderr)
    finally:
        cleanup(Settings.from_env({**env, "REDIS_URL": forms["default user in the URL"]}))
        delete_subjects(settings, subject_for(settings.orders_topic))


# -- hostile text --------------------------------------------------------------------------------

@pytest.fixture
def hostile_env():
    env = isolated_env("escapes", ORDERS_FAILURE_RATE="0", BATCH_SIZE="5")
    settings = Settings.from_env(env)
    yield env
    cleanup(settings)
    delete_subjects(settings, subject_for(settings.orders_topic))


@pytest.fixture
def workers(hostile_env, tmp_path):
    pool = Workers(hostile_env, tmp_path, Settings.from_env(hostile_env).partitions)
    try:
        yield pool
    finally:
        pool.stop()


def assert_one_harmless_line(what: str, text: str) -> None:
    found = [repr(c) for c in CONTROL if c in text]
    assert not found, f"{what} has control characters {found}:\n{text!r}"
    assert not any(line.startswith("ERROR x=1") for line in text.splitlines()), f"{what} has a fake line:\n{text}"


@pytest.mark.timeout(120)
def test_hostile_keys_and_products_are_shown_escaped(hostile_env, workers):
    settings = Settings.from_env(hostile_env)
    ensure_topics(make_admin(settings), settings)
    serde = OrderSerde(make_registry(settings), load_schema(settings.schema_path))
    serde.register(settings.orders_topic)
    hostile_text = HOSTILE.decode()
    letters = [  # (key, value): each is dead-lettered
        (HOSTILE, b"not an order"),
        (HOSTILE, serde.encode({"orderId": hostile_text, "product": hostile_text, "price": -5.0})),
    ]
    good = [(f"good-{i}".encode(), serde.encode({"orderId": f"good-{i}", "product": "desk", "price": 10.0}))
            for i in range(4)]
    workers.start()
    producer = Producer({"bootstrap.servers": settings.bootstrap_servers, "enable.idempotence": True})
    for key, value in [good[0], letters[0], good[1], letters[1], good[2], good[3]]:
        producer.produce(settings.orders_topic, key=key, value=value, partition=0)
    assert producer.flush(30) == 0

    wait_until(lambda: len(run_orders(hostile_env, "dlq", "--json").stdout.splitlines()) == len(letters),
               "both hostile messages are dead-lettered", timeout=60)
    log = workers.log("partition-0")
    assert log.count(f"key={HOSTILE_SHOWN} ") == len(letters), log
    assert_one_harmless_line("the worker's log", log)

    shown = run_orders(hostile_env, "dlq")
    assert len(shown.stdout.splitlines()) == len(letters), shown.stdout
    assert_one_harmless_line("orders dlq", shown.stdout + shown.stderr)
    assert f"key={HOSTILE_SHOWN} " in shown.stdout
    assert f"order={HOSTILE_SHOWN} product={HOSTILE_SHOWN} " in shown.stdout
    for args in (("dlq", "--summary"), ("dlq", "replay", "--dry-run")):
        result = run_orders(hostile_env, *args)
        assert_one_harmless_line(f"orders {' '.join(args)}", result.stdout + result.stderr)

    # --json stays lossless: the exact key and order come back, escaped by JSON itself.
    lines = run_orders(hostile_env, "dlq", "--json").stdout.splitlines()
    assert len(lines) == len(letters)
    assert_one_harmless_line("orders dlq --json", "\n".join(lines))
    decoded = [json.loads(line) for line in lines]
    assert [d["key"] for d in decoded] == [hostile_text, hostile_text]
    assert decoded[1]["order"] == {"orderId": hostile_text, "product": hostile_text, "price": -5.0}

    # --follow (the dlq-viewer program) prints the same escaped lines as they come.
    follow_log = workers.folder / "follow.log"
    with open(follow_log, "w") as out:
        proc = subprocess.Popen([ORDERS, "dlq", "--follow"], env=workers.env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: follow_log.read_text().count(HOSTILE_SHOWN) >= 3, "dlq --follow printed both", timeout=30)
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(30)
    assert_one_harmless_line("orders dlq --follow", follow_log.read_text())
    workers.assert_alive_and_clean()
