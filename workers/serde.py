"""Orders in the Confluent Avro wire format: magic byte 0, 4-byte schema id, Avro body.

Schemas live in the schema registry (subject ``<topic>-value``, the topic name
strategy); bodies are written and read with fastavro. Readers resolve any
registered writer schema into our Order schema, so a producer with a newer,
compatible schema (an added optional field) is read by old workers.
"""
from __future__ import annotations

import io
import json
import struct
from pathlib import Path
from typing import Iterable

import fastavro
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError

from .errors import ConfigError, SchemaMismatch, ServiceUnavailable, UndecodableMessage, UnknownSchema

MAGIC_BYTE = 0
_HEADER = struct.Struct(">BI")  # unsigned: errors show the magic byte as 0..255


def load_schema(path: Path) -> dict:
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


class OrderSerde:
    """Encodes and decodes orders against one registry and one reader schema."""

    def __init__(self, registry: SchemaRegistryClient, reader_schema: dict):
        self._registry = registry
        self._reader_raw = reader_schema
        self._reader = fastavro.parse_schema(reader_schema)
        self._writers: dict[int, dict] = {}
        self._writer_id: int | None = None
        self._writer: dict | None = None

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
        self._writer = fastavro.parse_schema(raw)
        self._writers[schema_id] = self._writer
        return schema_id

    def encode(self, order: dict) -> bytes:
        """Serialize one order with the registered writer schema."""
        if self._writer is None:
            raise RuntimeError("register() must be called before encode()")
        out = io.BytesIO()
        out.write(_HEADER.pack(MAGIC_BYTE, self._writer_id))
        fastavro.schemaless_writer(out, self._writer, order)
        return out.getvalue()

    # -- reading ---------------------------------------------------------------
    @staticmethod
    def schema_id_of(value: bytes | None) -> int:
        """The schema id in a wire-format value; raises UndecodableMessage."""
        if value is None:
            raise UndecodableMessage("null value (tombstone) is not an order")
        if len(value) < _HEADER.size:
            raise UndecodableMessage(f"value of {len(value)} bytes is too short for the wire format")
        magic, schema_id = _HEADER.unpack_from(value)
        if magic != MAGIC_BYTE:
            raise UndecodableMessage(f"unknown magic byte {magic} (expected {MAGIC_BYTE})")
        return schema_id

    def prefetch(self, values: Iterable[bytes | None]) -> None:
        """Look up every writer schema these values need, before any is decoded.

        Raises ServiceUnavailable if the registry cannot be reached, so a batch
        is retried as a whole instead of blaming its messages for an outage.
        """
        for value in values:
            try:
                schema_id = self.schema_id_of(value)
            except UndecodableMessage:
                continue
            if schema_id not in self._writers:
                self._fetch_writer(schema_id)

    def _fetch_writer(self, schema_id: int) -> dict | None:
        try:
            schema = self._registry.get_schema(schema_id)
        except Exception as exc:  # classify the client's errors
            if _is_unavailable(exc):
                raise ServiceUnavailable(f"schema registry: {exc}") from exc
            self._writers[schema_id] = None  # remember the miss: one lookup per id
            return None
        try:
            parsed = fastavro.parse_schema(json.loads(schema.schema_str))
        except (ValueError, fastavro.schema.SchemaParseException):
            parsed = None
        if parsed == self._reader:
            parsed = self._reader  # the same object: fastavro then skips schema resolution per message
        self._writers[schema_id] = parsed
        return parsed

    def decode(self, value: bytes | None) -> dict:
        """Decode one value into an Order dict.

        Raises UndecodableMessage (or its UnknownSchema/SchemaMismatch kinds) for
        bytes that can never be read, ServiceUnavailable if the registry is down.
        """
        schema_id = self.schema_id_of(value)
        if schema_id in self._writers:
            writer = self._writers[schema_id]
        else:
            writer = self._fetch_writer(schema_id)
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
        return order
