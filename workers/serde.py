"""Orders in the Confluent Avro wire format: magic byte 0, 4-byte schema id, Avro body.

Schemas live in the schema registry (subject ``<topic>-value``, the topic name
strategy); bodies are written and read with fastavro. Readers resolve any
registered writer schema into our Order schema, so a producer with a newer,
compatible schema (an added optional field) is read by old workers.

Workers keep a copy of every writer schema they resolve (in Redis, see
``AggregateStore.keep_schema``) and fall back to it when the registry answers
that it has no such id: a registry that forgets must not turn orders that were
counted into dead letters when they are read again.
"""
from __future__ import annotations

import io
import json
import logging
import struct
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol, cast

import fastavro
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError
from fastavro.types import Schema as AvroSchema

from .errors import ConfigError, SchemaMismatch, ServiceUnavailable, UndecodableMessage, UnknownSchema

log = logging.getLogger(__name__)

MAGIC_BYTE = 0
_HEADER = struct.Struct(">BI")  # unsigned: errors show the magic byte as 0..255
# The registry's own code for "no schema with this id" (Confluent's API, and
# Apicurio's ccompat API). A 404 without it is not about the id: usually a
# SCHEMA_REGISTRY_URL with a wrong path, which must stall the pool, not empty it
# into the DLQ.
SCHEMA_NOT_FOUND = 40403
# How long a miss (the registry has no such id, and no copy was kept) is
# remembered. Not for the life of the process: an id can become readable later
# (a registry restored while the pool runs, a replica catching up with the one
# the producer registered on), and a worker should not need a restart to see
# it. Not zero either: hostile bytes can name a new id in every message, and a
# miss costs a registry round trip; 30 s bounds that to one lookup per id per
# 30 s per worker, and batches are prefetched, so never a lookup per message.
MISS_TTL_S = 30.0


class SchemaCopies(Protocol):
    """Where writer schemas are kept by id (the aggregate store, in Redis)."""

    def keep_schema(self, schema_id: int, schema: str) -> str: ...

    def kept_schema(self, schema_id: int) -> str | None: ...


def load_schema(path: Path | str) -> dict:
    """Read and parse an Avro schema file; raises ConfigError."""
    try:
        raw = json.loads(Path(path).read_text())
        fastavro.parse_schema(raw)
    except (OSError, ValueError, fastavro.schema.SchemaParseException) as exc:
        raise ConfigError(f"cannot load Avro schema {path}: {exc}") from exc
    return raw


def subject_for(topic: str) -> str:
    """The subject of a topic's values under the topic name strategy."""
    return f"{topic}-value"


def _is_unavailable(exc: Exception) -> bool:
    status = getattr(exc, "http_status_code", None)
    return not isinstance(exc, SchemaRegistryError) or status is None or status >= 500 or status in (-1, 408, 429)


def schema_not_found(exc: Exception) -> bool:
    """True if the registry answered that it has no schema with the id asked for.

    Anything else a lookup raises (no answer, 5xx, 401, a 404 from a wrong URL)
    is an outage of the registry, not a fact about a message.
    """
    return (isinstance(exc, SchemaRegistryError) and exc.http_status_code == 404
            and exc.error_code == SCHEMA_NOT_FOUND)


def _same_schema(a: str, b: str) -> bool:
    try:
        return json.loads(a) == json.loads(b)
    except ValueError:
        return a == b


class OrderSerde:
    """Encodes and decodes orders against one registry and one reader schema.

    ``copies``, when given, keeps every writer schema this serde resolves and
    answers for ids the registry no longer has. ``clock`` (monotonic seconds)
    times how long a miss is remembered.
    """

    def __init__(self, registry: SchemaRegistryClient, reader_schema: dict, *,
                 copies: SchemaCopies | None = None, clock: Callable[[], float] = time.monotonic):
        self._registry = registry
        self._reader_raw = reader_schema
        self._reader = fastavro.parse_schema(reader_schema)
        self._copies = copies
        self._clock = clock
        # id -> parsed writer schema; None: the registry has it, but it is not Avro.
        self._writers: dict[int, AvroSchema | None] = {}
        self._misses: dict[int, float] = {}  # id -> when the miss is forgotten (clock)
        self._writer_id: int | None = None
        self._header = b""
        self._out = io.BytesIO()  # encode's buffer, reused
        self._writer: AvroSchema | None = None

    # -- writing ---------------------------------------------------------------
    def register(self, topic: str, schema: dict | None = None) -> int:
        """Register ``schema`` (default: the reader schema) under the topic's subject.

        Raises SchemaMismatch when the registry's compatibility check rejects it,
        ServiceUnavailable when the registry cannot be reached.
        """
        raw = schema or self._reader_raw
        try:
            schema_id = self._registry.register_schema(subject_for(topic), Schema(json.dumps(raw), "AVRO"))
        except Exception as exc:  # the client raises several types; classify them
            if _is_unavailable(exc):
                raise ServiceUnavailable(f"schema registry: {exc}") from exc
            raise SchemaMismatch(f"registry rejected the schema for subject {subject_for(topic)}: {exc}") from exc
        self._writer_id = schema_id
        self._header = _HEADER.pack(MAGIC_BYTE, schema_id)
        self._writer = fastavro.parse_schema(raw)
        self._writers[schema_id] = self._writer
        return schema_id

    def encode(self, order: dict) -> bytes:
        """Serialize one order with the registered writer schema (into one reused buffer)."""
        if self._writer is None or self._writer_id is None:
            raise RuntimeError("register() must be called before encode()")
        out = self._out
        out.seek(0)
        out.truncate()
        out.write(self._header)
        fastavro.schemaless_writer(out, self._writer, order)
        return out.getvalue()

    # -- reading ---------------------------------------------------------------
    @staticmethod
    def _split(value: bytes | None) -> tuple[bytes, int]:
        if value is None:
            raise UndecodableMessage("null value (tombstone) is not an order")
        if len(value) < _HEADER.size:
            raise UndecodableMessage(f"value of {len(value)} bytes is too short for the wire format")
        magic, schema_id = _HEADER.unpack_from(value)
        if magic != MAGIC_BYTE:
            raise UndecodableMessage(f"unknown magic byte {magic} (expected {MAGIC_BYTE})")
        return value, schema_id

    @staticmethod
    def schema_id_of(value: bytes | None) -> int:
        """The schema id in a wire-format value; raises UndecodableMessage."""
        return OrderSerde._split(value)[1]

    def prefetch(self, values: Iterable[bytes | None]) -> None:
        """Look up every writer schema these values need, before any is decoded.

        Raises ServiceUnavailable if the registry (or the kept copies) cannot be
        reached, so a batch is retried as a whole instead of blaming its messages
        for an outage.
        """
        ids = set()
        for value in values:
            try:
                ids.add(self.schema_id_of(value))
            except UndecodableMessage:
                continue
        for schema_id in ids:
            self._writer_for(schema_id)

    def _writer_for(self, schema_id: int) -> AvroSchema | None:
        if schema_id in self._writers:
            return self._writers[schema_id]
        forget_at = self._misses.get(schema_id)
        if forget_at is not None and self._clock() < forget_at:
            return None
        return self._fetch_writer(schema_id)

    def _fetch_writer(self, schema_id: int) -> AvroSchema | None:
        try:
            text = self._registry.get_schema(schema_id).schema_str
        except Exception as exc:  # the client raises several types; classify them
            if not schema_not_found(exc):
                raise ServiceUnavailable(f"schema registry: {exc}") from exc
            text = self._copies.kept_schema(schema_id) if self._copies is not None else None
            if text is None:
                self._misses[schema_id] = self._clock() + MISS_TTL_S
                log.warning("schema id=%d is not in the registry; its messages are undecodable "
                            "for the next %.0f s", schema_id, MISS_TTL_S)
                return None
            log.warning("schema id=%d is not in the registry any more; reading it with the copy kept "
                        "in redis", schema_id)
        else:
            if self._copies is not None and text is not None:
                kept = self._copies.keep_schema(schema_id, text)
                if not _same_schema(kept, text):
                    # The registry forgot its ids and gave this one to another schema:
                    # messages written before and after cannot be told apart.
                    log.error("schema id=%d differs between the registry and the copy kept in redis; "
                              "using the registry's", schema_id)
        self._misses.pop(schema_id, None)
        parsed: AvroSchema | None
        try:
            parsed = fastavro.parse_schema(json.loads(text)) if text is not None else None
        except (ValueError, fastavro.schema.SchemaParseException):
            parsed = None
        if parsed == self._reader:
            parsed = self._reader  # the same object: fastavro then skips schema resolution per message
        self._writers[schema_id] = parsed
        return parsed

    def decode(self, value: bytes | None) -> dict:
        """Decode one value into an Order dict.

        Raises UndecodableMessage (or its UnknownSchema/SchemaMismatch kinds) for
        bytes that cannot be read, ServiceUnavailable if the registry is down.
        """
        value, schema_id = self._split(value)
        writer = self._writers.get(schema_id)
        if writer is None:
            writer = self._writer_for(schema_id)
        if writer is None:
            raise UnknownSchema(f"schema id {schema_id} is not an Avro schema in the registry")
        body = io.BytesIO(value)
        body.seek(_HEADER.size)
        try:
            order = fastavro.schemaless_reader(body, writer, self._reader)
        except fastavro.read.SchemaResolutionError as exc:
            raise SchemaMismatch(f"schema id {schema_id} cannot be read as Order: {exc}") from exc
        except (EOFError, ValueError, TypeError, IndexError, UnicodeDecodeError, OverflowError) as exc:
            raise UndecodableMessage(f"corrupt Avro body (schema id {schema_id}): {type(exc).__name__}: {exc}") from exc
        if body.tell() != len(value):
            raise UndecodableMessage(
                f"{len(value) - body.tell()} trailing bytes after the Avro body (schema id {schema_id})")
        return cast(dict, order)  # the reader schema is a record
