import pytest

from workers.errors import UndecodableMessage
from workers.serde import OrderSerde, load_schema
from workers.settings import DEFAULT_SCHEMA_PATH


@pytest.mark.parametrize("value,reason", [
    (None, "tombstone"),
    (b"", "too short"),
    (b"\x00\x00\x01", "too short"),
    (b"\x01\x00\x00\x00\x01abc", "magic byte 1"),
    (b"{\"orderId\": 1}", "magic byte"),
])
def test_values_outside_the_wire_format_are_rejected(value, reason):
    with pytest.raises(UndecodableMessage, match=reason):
        OrderSerde.schema_id_of(value)


def test_schema_id_is_read_big_endian():
    assert OrderSerde.schema_id_of(b"\x00\x00\x00\x01\x02body") == 258


def test_order_schema_loads_from_the_repo_not_the_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    schema = load_schema(DEFAULT_SCHEMA_PATH)
    assert schema["name"] == "Order"
    assert [f["name"] for f in schema["fields"]] == ["orderId", "product", "price"]
