"""Headers that travel with an order on the retry topic and the dead letter queue.

The value and key are always the original bytes; everything we know about the
order's history is in headers (UTF-8 strings), so any Kafka tool can read it.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

ATTEMPT = "orders.attempt"            # retry topic: the attempt this message is due for
ATTEMPTS = "orders.attempts"          # DLQ: attempts made before giving up
DUE_AT = "orders.due.at.ms"
ORIGINAL_TOPIC = "orders.original.topic"
ORIGINAL_PARTITION = "orders.original.partition"
ORIGINAL_OFFSET = "orders.original.offset"
ORIGINAL_TIMESTAMP = "orders.original.timestamp.ms"
ERROR_TYPE = "orders.error.type"
ERROR_MESSAGE = "orders.error.message"
FIRST_FAILED_AT = "orders.first.failed.at.ms"
DEAD_LETTERED_AT = "orders.dead.lettered.at.ms"
REPLAY_OF = "orders.replay.of"        # on `orders`: the dead letter (topic:partition:offset) it replays
# The message (topic:partition:offset) whose handling published this one: the log
# of record of which offsets of a source were parked rather than counted.
PARKED_FROM = "orders.parked.from"

_MAX_ERROR_CHARS = 2000


class MalformedEnvelope(ValueError):
    """A retry message lacks a header it needs or has a bad value in it."""


Headers = Iterable[tuple[str, str | bytes | None]] | Mapping[str, str | bytes | None] | None


def header_dict(headers: Headers) -> dict[str, str]:
    """Kafka headers as a dict of strings (last value wins)."""
    # Kafka gives a list: test for it first (isinstance against the Mapping ABC is slow per message).
    pairs = headers if isinstance(headers, list) else headers.items() if isinstance(headers, Mapping) else headers or ()
    out = {}
    for name, value in pairs:
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        out[name] = value if value is not None else ""
    return out


def encode(headers: Mapping[str, object]) -> list[tuple[str, bytes]]:
    return [(name, str(value).encode()) for name, value in headers.items() if value is not None]


@dataclass(frozen=True)
class Provenance:
    """Where an order first entered the system, and when it first failed."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    first_failed_at_ms: int
    replay_of: str | None = None  # set when the order is a replayed dead letter

    def encoded(self) -> list[tuple[str, bytes]]:
        """As Kafka headers; built per parked order, so as a list straight away."""
        pairs = [
            (ORIGINAL_TOPIC, self.topic.encode()),
            (ORIGINAL_PARTITION, b"%d" % self.partition),
            (ORIGINAL_OFFSET, b"%d" % self.offset),
            (ORIGINAL_TIMESTAMP, b"%d" % self.timestamp_ms),
            (FIRST_FAILED_AT, b"%d" % self.first_failed_at_ms),
        ]
        if self.replay_of is not None:
            pairs.append((REPLAY_OF, self.replay_of.encode()))
        return pairs

    @classmethod
    def from_headers(cls, h: dict[str, str]) -> Provenance:
        """Raises MalformedEnvelope naming the missing or bad header."""
        return cls(
            topic=_required(h, ORIGINAL_TOPIC, str),
            partition=_required(h, ORIGINAL_PARTITION, int),
            offset=_required(h, ORIGINAL_OFFSET, int),
            timestamp_ms=_required(h, ORIGINAL_TIMESTAMP, int),
            first_failed_at_ms=_required(h, FIRST_FAILED_AT, int),
            replay_of=h.get(REPLAY_OF) or None,
        )


def _required(h: dict[str, str], name: str, convert):
    if name not in h:
        raise MalformedEnvelope(f"header {name} is missing")
    try:
        return convert(h[name])
    except ValueError as exc:
        raise MalformedEnvelope(f"header {name}={h[name]!r} is invalid") from exc


def retry_headers(provenance: Provenance, *, parked_from: str, attempt: int, due_at_ms: int,
                  error_type: str, error_message: str) -> list[tuple[str, bytes]]:
    return [
        *provenance.encoded(),
        (PARKED_FROM, parked_from.encode()),
        (ATTEMPT, b"%d" % attempt),
        (DUE_AT, b"%d" % due_at_ms),
        (ERROR_TYPE, error_type.encode()),
        (ERROR_MESSAGE, error_message[:_MAX_ERROR_CHARS].encode()),
    ]


def dead_letter_headers(provenance: Provenance, *, parked_from: str, attempts: int, error_type: str,
                        error_message: str, dead_lettered_at_ms: int) -> list[tuple[str, bytes]]:
    return [
        *provenance.encoded(),
        (PARKED_FROM, parked_from.encode()),
        (ATTEMPTS, b"%d" % attempts),
        (ERROR_TYPE, error_type.encode()),
        (ERROR_MESSAGE, error_message[:_MAX_ERROR_CHARS].encode()),
        (DEAD_LETTERED_AT, b"%d" % dead_lettered_at_ms),
    ]


def retry_attempt(h: dict[str, str]) -> tuple[int, int]:
    """(attempt, due_at_ms) of a retry message; raises MalformedEnvelope."""
    return _required(h, ATTEMPT, int), _required(h, DUE_AT, int)


def parked_from(h: dict[str, str], orders_topic: str) -> tuple[str, int, int] | None:
    """The (topic, partition, offset) whose handling published a retry or DLQ message.

    Messages written before the PARKED_FROM header existed name it only when the
    original order itself was parked (first retry, or dead-lettered at once).
    None when it cannot be told.
    """
    raw = h.get(PARKED_FROM)
    try:
        if raw:
            topic, partition, offset = raw.rsplit(":", 2)
            return topic, int(partition), int(offset)
        first_attempt = h.get(ATTEMPT) == "2" or (ATTEMPT not in h and h.get(ATTEMPTS) in ("0", "1"))
        if first_attempt and h.get(ORIGINAL_TOPIC) == orders_topic:
            return orders_topic, int(h[ORIGINAL_PARTITION]), int(h[ORIGINAL_OFFSET])
    except (ValueError, KeyError):
        pass
    return None
