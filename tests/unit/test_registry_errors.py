"""Which registry answers make a schema id unknown, and which are an outage."""
from __future__ import annotations

import httpx
import pytest
from confluent_kafka.schema_registry.error import SchemaRegistryError

from workers.serde import schema_not_found


def test_the_registry_saying_it_has_no_such_schema_is_a_miss():
    assert schema_not_found(SchemaRegistryError(404, 40403, "Schema 7 not found."))


@pytest.mark.parametrize("exc", [
    SchemaRegistryError(500, 50001, "Error in the backend data store"),
    SchemaRegistryError(503, -1, "Unknown Schema Registry Error: b'<html>Service Unavailable</html>'"),
    SchemaRegistryError(401, 40101, "Unauthorized"),
    SchemaRegistryError(404, -1, "Unknown Schema Registry Error: b''"),  # a URL with the wrong path
    SchemaRegistryError(404, 40401, "Subject not found."),
    httpx.ConnectError("connection refused"),
    httpx.ReadTimeout("timed out"),
], ids=["500", "503 html", "401", "404 not the api", "404 subject", "refused", "timeout"])
def test_anything_else_is_an_outage(exc):
    assert not schema_not_found(exc)
