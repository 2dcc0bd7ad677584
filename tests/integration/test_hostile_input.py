"""Hostile and malformed input on the real stack: bad bytes are dead-lettered once, good orders counted.

Raw bytes go to the orders topic with a plain producer, interleaved with good
orders on every partition, while real partition workers and a retry worker run
(subprocesses of the ``orders`` CLI, stopped by pid with SIGTERM). Each bad
message must come out of the DLQ exactly once with its original bytes, a
precise error type and message; every good order must be counted; no worker may
crash on any of it.
"""
from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import signal
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import fastavro
import httpx
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from workers import envelope as env_headers
from workers.clients import make_admin, make_registry
from workers.processing import price_cents
from workers.serde import OrderSerde, load_schema, subject_for
from workers.settings import Settings
from workers.topics import ensure_topics

from ..conftest import isolated_env
from ..pool import ORDERS, read_retries, read_topic, run_orders, wait_until_quiet
from .conftest import cleanup

BIG_VALUE_BYTES = 1_000_000   # fits the broker's default message.max.bytes (1048588) with framing
UNKNOWN_SCHEMA_ID = 2_147_000_123


# -- helpers shared with test_schema_evolution -------------------------------------------------

class Workers:
    """``orders consume --partition N`` for every partition plus ``orders retry``, as subprocesses.

    Each writes its log to its own file; ``stop`` sends SIGTERM to each pid it
    started (SIGKILL to that pid only if it does not exit in time).
    """

    def __init__(self, env: dict, folder: Path, partitions: int):
        self.env = {"PATH": os.environ["PATH"], **env}
        self.folder = folder
        self.roles = {f"partition-{p}": ["consume", "--partition", str(p)] for p in range(partitions)}
        self.roles["retry"] = ["retry"]
        # The name each logs as: a pinned worker its partition, the retry worker its group membership.
        self.names = {role: role for role in self.roles}
        self.names["retry"] = Settings.from_env(env).member("retry", 0)
        # What each logs once it consumes (a sync point for start, not an assertion).
        self.ready = {role: f"start worker={name} " for role, name in self.names.items()}
        self.procs: dict[str, subprocess.Popen] = {}

    def log_path(self, role: str) -> Path:
        return self.folder / f"{role}.log"

    def log(self, role: str) -> str:
        return self.log_path(role).read_text(errors="replace")

    def logs(self, tail: int = 40) -> str:
        return "\n".join(f"--- {role}\n" + "\n".join(self.log(role).splitlines()[-tail:]) for role in self.procs)

    def start(self, timeout: float = 30) -> None:
        for role, args in self.roles.items():
            with open(self.log_path(role), "w") as out:
                self.procs[role] = subprocess.Popen([ORDERS, *args], env=self.env, stdout=out,
                                                    stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        pending = set(self.roles)
        while pending and time.monotonic() < deadline:
            for role in list(pending):
                if self.procs[role].poll() is not None:
                    raise AssertionError(f"{role} exited with {self.procs[role].returncode}:\n{self.logs()}")
                if self.ready[role] in self.log(role):
                    pending.discard(role)
            time.sleep(0.2)
        if pending:
            raise AssertionError(f"workers not started after {timeout}s: {sorted(pending)}\n{self.logs()}")

    def assert_alive_and_clean(self) -> None:
        """Every worker is still the process we started, and none logged a traceback or an error."""
        for role, proc in self.procs.items():
            assert proc.poll() is None, f"{role} died (rc={proc.returncode}):\n{self.logs()}"
            log = self.log(role)
            assert "Traceback" not in log, f"{role} logged a traceback:\n{log[-5000:]}"
            assert " ERROR " not in log, f"{role} logged an error:\n{log[-5000:]}"

    def stop(self, timeout: float = 30) -> dict[str, int]:
        """SIGTERM each started pid, wait for it; returns the exit codes."""
        for proc in self.procs.values():
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
        codes = {}
        for role, proc in self.procs.items():
            try:
                codes[role] = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                codes[role] = proc.wait(10)
        return codes


def delete_subjects(settings: Settings, *subjects: str) -> None:
    """Remove this test's schema registry subjects (soft, then permanent delete)."""
    base = settings.schema_registry_url.rstrip("/")
    with httpx.Client(timeout=10) as client:
        for subject in subjects:
            for params in ({}, {"permanent": "true"}):
                response = client.delete(f"{base}/subjects/{subject}", params=params)
                if response.status_code not in (200, 404):
                    response.raise_for_status()


def end_offsets(settings: Settings, topic: str) -> dict[int, int]:
    """The high watermark of each partition of ``topic``."""
    consumer = Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": "test-offsets"})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in sorted(partitions)}
    finally:
        consumer.close()


# -- the cases -------------------------------------------------------------------------------

@dataclass
class Case:
    name: str
    key: bytes | None
    value: bytes | None
    order: dict | None = None           # counted: the order; dead-lettered: what the DLQ shows decoded
    error_type: str | None = None       # None: a good order that must be counted
    message: str | None = None          # regex the DLQ error message must fully match
    partition: int = -1                 # set from the delivery report
    offset: int = -1

    @property
    def good(self) -> bool:
        return self.error_type is None


def avro_body(schema: dict, record) -> bytes:
    out = io.BytesIO()
    fastavro.schemaless_writer(out, fastavro.parse_schema(schema), record)
    return out.getvalue()


def build_cases(serde: OrderSerde, schema_id: int, alien_id: int, alien_schema: dict) -> list[Case]:
    n = 0

    def good(key_from_id: bool = True, price: float | None = None) -> Case:
        nonlocal n
        n += 1
        order: dict = {"orderId": f"good-{n}", "product": "desk",
                 "price": price if price is not None else round(1 + n * 1.37, 2)}
        return Case(f"good-{n}", order["orderId"].encode() if key_from_id else None, serde.encode(order), order)

    def invalid(name: str, order: dict, message: str) -> Case:
        return Case(name, name.encode(), serde.encode(order), order, "InvalidOrder", re.escape(message))

    valid = serde.encode({"orderId": "x-1", "product": "desk", "price": 19.99})
    header = struct.pack(">bI", 0, schema_id)
    big = bytes([7]) + bytes((i * 31 + 7) % 251 for i in range(BIG_VALUE_BYTES - 1))
    json_order = json.dumps({"orderId": "json-1", "product": "desk", "price": 10.0}).encode()
    bad = [
        Case("json", b"json", json_order, None, "UndecodableMessage",
             re.escape("unknown magic byte 123 (expected 0)")),
        Case("text", b"text", b"hello, this is not an order", None, "UndecodableMessage",
             re.escape("unknown magic byte 104 (expected 0)")),
        Case("wrong-magic", b"wrong-magic", b"\x01" + valid[1:], None, "UndecodableMessage",
             re.escape("unknown magic byte 1 (expected 0)")),
        Case("unknown-schema", b"unknown-schema", struct.pack(">bI", 0, UNKNOWN_SCHEMA_ID) + valid[5:], None,
             "UnknownSchema", re.escape(f"schema id {UNKNOWN_SCHEMA_ID} is not an Avro schema in the registry")),
        Case("alien-schema", b"alien-schema",
             struct.pack(">bI", 0, alien_id) + avro_body(alien_schema, {"orderId": "a-1", "product": "desk",
                                                                       "price": "12.50"}),
             None, "SchemaMismatch", rf"schema id {alien_id} cannot be read as Order: .*string is not double.*"),
        Case("truncated", b"truncated", valid[:-3], None, "UndecodableMessage",
             rf"corrupt Avro body \(schema id {schema_id}\): EOFError: .*"),
        Case("header-only", b"header-only", header, None, "UndecodableMessage",
             rf"corrupt Avro body \(schema id {schema_id}\): EOFError: .*"),
        Case("too-short", b"too-short", b"\x00\x00\x00", None, "UndecodableMessage",
             re.escape("value of 3 bytes is too short for the wire format")),
        Case("empty-value", b"empty-value", b"", None, "UndecodableMessage",
             re.escape("value of 0 bytes is too short for the wire format")),
        Case("trailing", b"trailing", valid + b"\x00\x00", None, "UndecodableMessage",
             re.escape(f"2 trailing bytes after the Avro body (schema id {schema_id})")),
        Case("tombstone", b"tombstone", None, None, "UndecodableMessage",
             re.escape("null value (tombstone) is not an order")),
        Case("garbage-null-key", None, b"\xde\xad\xbe\xef garbage with no key", None, "UndecodableMessage",
             re.escape("unknown magic byte 222 (expected 0)")),
        Case("binary-key", b"\xff\xfe\x00key", b"\x05binary key, garbage value", None, "UndecodableMessage",
             re.escape("unknown magic byte 5 (expected 0)")),
        Case("big", b"big", big, None, "UndecodableMessage", re.escape("unknown magic byte 7 (expected 0)")),
        Case("big-avro", b"big-avro", header + b"\xff" * (BIG_VALUE_BYTES - len(header)), None,
             "UndecodableMessage", rf"corrupt Avro body \(schema id {schema_id}\): \w+Error: .*"),
        invalid("price-nan", {"orderId": "price-nan", "product": "desk", "price": math.nan}, "price nan is not finite"),
        invalid("price-inf", {"orderId": "price-inf", "product": "desk", "price": math.inf}, "price inf is not finite"),
        invalid("price-negative", {"orderId": "price-negative", "product": "desk", "price": -5.0},
                "price -5.0 is not positive"),
        invalid("price-zero", {"orderId": "price-zero", "product": "desk", "price": 0.0}, "price 0.0 is not positive"),
        invalid("price-huge", {"orderId": "price-huge", "product": "desk", "price": 1e300},
                "price 1e+300 is above the limit 1000000.0"),
        invalid("price-over-limit", {"orderId": "price-over-limit", "product": "desk", "price": 1_000_000.01},
                "price 1000000.01 is above the limit 1000000.0"),
        invalid("price-3-decimals", {"orderId": "price-3-decimals", "product": "desk", "price": 12.345},
                "price 12.345 has more than two decimals"),
        invalid("empty-order-id", {"orderId": "", "product": "desk", "price": 5.0}, "orderId is missing or empty"),
        invalid("blank-order-id", {"orderId": "   ", "product": "desk", "price": 5.0}, "orderId is missing or empty"),
        invalid("empty-product", {"orderId": "empty-product", "product": "", "price": 5.0},
                "product is missing or empty"),
    ]
    # Good orders around every bad one (also at the price limits, and with a null key).
    cases = [good()]
    for b in bad:
        cases += [b, good()]
    cases += [good(key_from_id=False), good(price=0.01), good(key_from_id=False, price=1_000_000.0), good()]
    return cases


def produce(settings: Settings, cases: list[Case]) -> None:
    """Send every case with a plain producer, round-robin over the partitions, in order."""
    producer = Producer({"bootstrap.servers": settings.bootstrap_servers, "enable.idempotence": True,
                         "message.max.bytes": 2 * BIG_VALUE_BYTES, "linger.ms": 5})
    errors = []

    def report(case: Case):
        def on_delivery(err, msg):
            if err is not None:
                errors.append(f"{case.name}: {err.str()}")
            else:
                case.partition, case.offset = msg.partition(), msg.offset()
        return on_delivery

    for i, case in enumerate(cases):
        big = case.value is not None and len(case.value) > 100_000
        if big:
            producer.flush(30)  # alone in its batch: the topic's limit is per record batch
        producer.produce(settings.orders_topic, key=case.key, value=case.value, partition=i % settings.partitions,
                         on_delivery=report(case))
        if big:
            producer.flush(30)
        producer.poll(0)
    assert producer.flush(30) == 0
    assert not errors, errors
    assert all(c.offset >= 0 for c in cases)


# -- fixtures --------------------------------------------------------------------------------

@pytest.fixture
def hostile_env():
    # Small batches: bad messages land in batches of their own, mixed with good ones, and
    # at batch edges; every batch with a dead letter is its own Kafka transaction.
    env = isolated_env("hostile", ORDERS_FAILURE_RATE="0", RETRY_BACKOFF_MS="200", BATCH_SIZE="3")
    settings = Settings.from_env(env)
    yield env
    cleanup(settings)
    delete_subjects(settings, subject_for(settings.orders_topic), subject_for(settings.orders_topic + "-alien"))


@pytest.fixture
def workers(hostile_env, tmp_path):
    pool = Workers(hostile_env, tmp_path, Settings.from_env(hostile_env).partitions)
    try:
        yield pool
    finally:
        pool.stop()


# -- the test --------------------------------------------------------------------------------

@pytest.mark.timeout(300)  # a hang guard: under load the CLI calls alone take tens of seconds
def test_hostile_values_are_dead_lettered_once_and_good_orders_counted(hostile_env, workers):
    settings = Settings.from_env(hostile_env)
    ensure_topics(make_admin(settings), settings)
    serde = OrderSerde(make_registry(settings), load_schema(settings.schema_path))
    schema_id = serde.register(settings.orders_topic)
    # A real Avro schema, registered elsewhere, that is not an Order (price is a string).
    alien_schema = {"type": "record", "name": "Order", "namespace": "io.orders.v1",
                    "fields": [{"name": "orderId", "type": "string"}, {"name": "product", "type": "string"},
                               {"name": "price", "type": "string"}]}
    alien_id = OrderSerde(make_registry(settings), alien_schema).register(settings.orders_topic + "-alien")
    assert alien_id != schema_id
    cases = build_cases(serde, schema_id, alien_id, alien_schema)
    good = [c for c in cases if c.good]
    bad = [c for c in cases if not c.good]

    workers.start()
    produce(settings, cases)
    expected_cents = sum(price_cents(c.order or {}) for c in good)
    stats, _ = wait_until_quiet(hostile_env, len(good), len(bad), timeout=45)
    dlq_lines = [line for line in run_orders(hostile_env, "dlq", "--json").stdout.splitlines() if line.strip()]
    dlq = [json.loads(line) for line in dlq_lines]  # Python's lenient parser; strictness is checked below

    # Every good order is counted, on its own partition.
    assert stats["count"] == len(good)
    assert round(stats["sum"] * 100) == expected_cents
    for p in stats["partitions"]:
        assert p["count"] == sum(1 for c in good if c.partition == p["partition"]), stats

    # Every bad message is dead-lettered exactly once, from where it was sent.
    assert len(dlq) == len(bad), sorted(d["error_type"] for d in dlq)
    by_origin = {}
    for d in dlq:
        origin = (d["original_partition"], d["original_offset"])
        assert origin not in by_origin, f"dead-lettered twice: {d}"
        by_origin[origin] = d
    assert set(by_origin) == {(c.partition, c.offset) for c in bad}

    # The DLQ holds the original key and bytes of each one (also of those that decoded).
    parked = {}
    for msg in read_topic(settings.bootstrap_servers, settings.dlq_topic):
        h = env_headers.header_dict(msg.headers())
        parked[(int(h[env_headers.ORIGINAL_PARTITION]), int(h[env_headers.ORIGINAL_OFFSET]))] = msg
    assert len(parked) == len(bad)
    for case in bad:
        msg = parked[(case.partition, case.offset)]
        assert msg.value() == case.value, case.name
        assert msg.key() == case.key, case.name
    # Nothing permanent was sent for a retry.
    assert read_retries(settings) == []

    # No worker crashed or restarted; all of them still shut down cleanly.
    workers.assert_alive_and_clean()
    for role in workers.roles:
        if role.startswith("partition-"):
            assert "dead letter" in workers.log(role), f"{role} handled no bad message"
    codes = workers.stop()
    assert codes == {role: 0 for role in workers.roles}, f"{codes}\n{workers.logs()}"
    for role in workers.roles:
        assert f"stopped worker={workers.names[role]}" in workers.log(role)

    # What `orders dlq --json` tells an operator about each one (checked last, all
    # together, so one wrong detail does not hide the others).
    wrong: list[tuple] = []
    names = {(c.partition, c.offset): c.name for c in bad}
    for line, d in zip(dlq_lines, dlq, strict=True):
        try:
            json.loads(line, parse_constant=reject_constant)
        except ValueError as exc:
            wrong.append((names[(d["original_partition"], d["original_offset"])], f"`orders dlq --json` line: {exc}"))
    for case in bad:
        d = by_origin[(case.partition, case.offset)]
        got = {k: d[k] for k in ("original_topic", "error_type", "attempts", "key")}
        want = {"original_topic": settings.orders_topic, "error_type": case.error_type, "attempts": 1,
                "key": case.key.decode("utf-8", "replace") if case.key is not None else None}
        if got != want:
            wrong.append((case.name, got, want))
        pattern = case.message or ""
        if not re.fullmatch(pattern, d["error_message"] or "", re.S):
            wrong.append((case.name, d["error_message"][:300], "expected: " + pattern.replace("\\", "")))
        if case.error_type == "InvalidOrder":
            # It decoded: shown as the order, not as raw bytes.
            if d["raw"] is not None or d["order"] is None or not same_order(d["order"], case.order or {}):
                wrong.append((case.name, d["order"], d["raw"] and d["raw"][:80], case.order))
        else:
            expected_raw = base64.b64encode(case.value).decode() if case.value is not None else None
            if d["order"] is not None or d["raw"] != expected_raw:
                wrong.append((case.name, d["order"], d["raw"] and d["raw"][:80], "raw bytes as sent"))
    assert not wrong, "\n".join(map(repr, wrong))


def reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON (RFC 8259): strict parsers (JavaScript, Go, serde_json) reject it")


NON_FINITE_NAMES = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def same_order(shown: dict, sent: dict) -> bool:
    """The DLQ's decoded order is the one sent; a non-finite price may be shown by its name."""
    def same(shown_value, sent_value):
        if isinstance(sent_value, float) and not math.isfinite(sent_value):
            return shown_value == NON_FINITE_NAMES[repr(sent_value)] or (
                isinstance(shown_value, float) and repr(shown_value) == repr(sent_value))
        return shown_value == sent_value
    return shown.keys() == sent.keys() and all(same(shown[k], sent[k]) for k in sent)
