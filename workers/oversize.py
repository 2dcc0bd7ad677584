"""Retry and DLQ messages too large to forward whole: dead-lettered as a reference.

The orders topic's size limit applies to the compressed record batch, so a value
that compresses well can be far larger than what the workers' producer may send
(``message.max.bytes``, checked before compression) or a parking topic accepts.
Forwarding it would fail on every attempt and stall its partition. Instead it is
dead-lettered as a reference: a DLQ message without the value, whose headers
keep the envelope (original topic, partition, offset, error) and say how large
the value was, its sha256, its first bytes and why it was not kept. The key is
kept unless it is too large itself (then it is described the same way).

``fit`` is the one place that decides; it depends only on the sizes and the
settings, so re-deciding a message after a crash decides the same.
"""
from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import Sequence

from confluent_kafka import KafkaError, Message

from .clients import producer_conf
from .settings import Settings
from .topics import PARKING_MAX_MESSAGE_BYTES

log = logging.getLogger(__name__)

VALUE_OMITTED = "orders.value.omitted"      # why the value is not in this dead letter
VALUE_SIZE = "orders.value.size"            # bytes of the original value
VALUE_SHA256 = "orders.value.sha256"        # hex
VALUE_HEAD = "orders.value.head.b64"        # its first HEAD_BYTES bytes, base64
KEY_SIZE = "orders.key.size"                # the same for a key too large to keep
KEY_SHA256 = "orders.key.sha256"
KEY_HEAD = "orders.key.head.b64"

HEAD_BYTES = 256
# Room for what librdkafka and Kafka add to a message (record and batch framing)
# and for lz4's worst case on incompressible bytes (+0.4%).
MARGIN_BYTES = 128 * 1024

Headers = list[tuple[str, bytes]]

# What the broker taught this process: a parking topic created elsewhere may take
# less than PARKING_MAX_MESSAGE_BYTES. topic -> the largest size allowed from now on
# (one less than the smallest message it rejected as too large). The rejected
# transaction is aborted and its batch decided again, now against this limit, so
# one failure is all it costs.
_learned: dict[str, int] = {}


def limit_bytes(settings: Settings, topic: str | None = None) -> int:
    """The largest retry/DLQ message (key + value + headers) forwarded whole (to ``topic``).

    The producer refuses anything over its message.max.bytes; a parking topic
    refuses a batch over its max.message.bytes, and a message this large is a
    batch of its own. A topic that rejected a smaller one is held to that.
    """
    limit = min(_producer_max(settings), PARKING_MAX_MESSAGE_BYTES) - MARGIN_BYTES
    return min(limit, _learned.get(topic, limit)) if topic else limit


_producer_max_of: dict[int, tuple[Settings, int]] = {}  # id(settings) -> (settings, message.max.bytes)


def _producer_max(settings: Settings) -> int:
    """The producer's message.max.bytes for these settings (asked once per retry: kept)."""
    kept = _producer_max_of.get(id(settings))
    if kept is None or kept[0] is not settings:
        kept = _producer_max_of[id(settings)] = settings, int(producer_conf(settings)["message.max.bytes"])
    return kept[1]


def size(key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes | None]] = ()) -> int:
    return len(key or b"") + len(value or b"") + sum(len(name) + len(v or b"") for name, v in headers)


def fits(settings: Settings, key: bytes | None, value: bytes | None,
         headers: Sequence[tuple[str, bytes | None]] = (), *, topic: str | None = None) -> bool:
    """Whether a message with this key, value and headers can be retried or dead-lettered whole."""
    return size(key, value, headers) <= limit_bytes(settings, topic)


def fit(settings: Settings, key: bytes | None, value: bytes | None, headers: Headers, *,
        where: str, topic: str | None = None) -> tuple[bytes | None, bytes | None, Headers]:
    """(key, value, headers) to dead-letter (to ``topic``): as they are if they fit, else a reference.

    ``where`` (topic:partition:offset of the message handled) is for the log line.
    """
    limit = limit_bytes(settings, topic)
    total = size(key, value, headers)
    if total <= limit:
        return key, value, headers
    rejected = " (the broker rejected one that size)" if topic in _learned else ""
    reason = (f"too large to retry or dead-letter whole: {total} bytes with key and headers, "
              f"over the {limit} that can be forwarded{rejected}")
    extra = {VALUE_OMITTED: reason, **_describe(value, VALUE_SIZE, VALUE_SHA256, VALUE_HEAD)}
    if size(key, None, headers) + 4096 > limit:  # the key alone is too large as well
        extra.update(_describe(key, KEY_SIZE, KEY_SHA256, KEY_HEAD))
        key = None
    log.warning("value not kept where=%s value_bytes=%d sha256=%s reason=%s action=dead_letter_reference",
                where, len(value or b""), extra[VALUE_SHA256], reason)
    return key, None, headers + [(name, str(v).encode()) for name, v in extra.items()]


def on_delivery(topic: str, key: bytes | None, value: bytes | None, headers: Headers):
    """A delivery callback for a retry/DLQ message: learns from the broker's "too large"."""
    total = size(key, value, headers)

    def report(err: KafkaError | None, msg: Message) -> None:
        if err is not None and err.code() == KafkaError.MSG_SIZE_TOO_LARGE:
            _learned[topic] = min(_learned.get(topic, total), total - 1)
            log.warning("broker rejected a message as too large topic=%s bytes=%d limit_now=%d "
                        "action=dead_letter_references_from_now_on", topic, total, _learned[topic])
    return report


def _describe(blob: bytes | None, size_header: str, sha_header: str, head_header: str) -> dict[str, object]:
    data = blob or b""
    return {size_header: len(data), sha_header: hashlib.sha256(data).hexdigest(),
            head_header: base64.b64encode(data[:HEAD_BYTES]).decode()}


def reference(headers: dict[str, str]) -> dict | None:
    """What a dead letter's headers say about a value (and key) not kept; None if it was kept."""
    if VALUE_OMITTED not in headers:
        return None
    out: dict = {"reason": headers[VALUE_OMITTED]}
    for name, size_header, sha_header, head_header in (("value", VALUE_SIZE, VALUE_SHA256, VALUE_HEAD),
                                                        ("key", KEY_SIZE, KEY_SHA256, KEY_HEAD)):
        if size_header in headers:
            try:
                out[f"{name}_size"] = int(headers[size_header])
            except ValueError:
                out[f"{name}_size"] = None
            out[f"{name}_sha256"] = headers.get(sha_header)
            out[f"{name}_head"] = headers.get(head_header)
    return out
