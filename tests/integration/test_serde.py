import dataclasses
import json
import struct

import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.schema_registry import SchemaRegistryClient, topic_subject_name_strategy
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from workers.clients import make_admin, make_registry
from workers.errors import SchemaMismatch, ServiceUnavailable, UndecodableMessage, UnknownSchema
from workers.serde import OrderSerde, load_schema, subject_for
from workers.topics import ensure_topics

ORDER = {"orderId": "o-1", "product": "desk", "price": 99.95}


@pytest.fixture
def serde(settings):
    return OrderSerde(make_registry(settings), load_schema(settings.schema_path))


def test_order_round_trips_through_real_kafka(settings, serde):
    ensure_topics(make_admin(settings), settings)
    schema_id = serde.register(settings.orders_topic)
    value = serde.encode(ORDER)
    assert value[0] == 0 and struct.unpack(">I", value[1:5])[0] == schema_id

    producer = Producer({"bootstrap.servers": settings.bootstrap_servers})
    producer.produce(settings.orders_topic, key=b"o-1", value=value, partition=1)
    assert producer.flush(10) == 0
    consumer = Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": settings.group_id("rt"),
                         "auto.offset.reset": "earliest"})
    consumer.subscribe([settings.orders_topic])
    msg = None
    for _ in range(40):
        msg = consumer.poll(0.5)
        if msg is not None and msg.error() is None:
            break
    consumer.close()
    assert msg is not None and msg.error() is None
    fresh = OrderSerde(make_registry(settings), load_schema(settings.schema_path))  # no cached writer schema
    assert fresh.decode(msg.value()) == ORDER


def test_interoperates_with_confluent_avro_serializers(settings, serde):
    serde.register(settings.orders_topic)
    # A timeout: without one, a registry that never answers hangs the suite.
    registry = SchemaRegistryClient({"url": settings.schema_registry_url, "timeout": 10})
    schema_str = json.dumps(load_schema(settings.schema_path))
    ctx = SerializationContext(settings.orders_topic, MessageField.VALUE)
    theirs = AvroSerializer(registry, schema_str, conf={"subject.name.strategy": topic_subject_name_strategy,
                                                        "auto.register.schemas": False, "use.latest.version": True})
    assert serde.decode(theirs(ORDER, ctx)) == ORDER
    # The topic strategy, as the serializer above: client 2.16's default asks the
    # registry's associations API first, which Apicurio does not serve (404).
    reader = AvroDeserializer(registry, schema_str, conf={"subject.name.strategy": topic_subject_name_strategy})
    assert reader(serde.encode(ORDER), ctx) == ORDER
    assert registry.get_latest_version(subject_for(settings.orders_topic)).schema_id == \
        struct.unpack(">I", serde.encode(ORDER)[1:5])[0]


def test_unknown_schema_id_is_permanent(serde):
    with pytest.raises(UnknownSchema, match="schema id 987654"):
        serde.decode(b"\x00" + struct.pack(">I", 987654) + b"\x02a")


def test_truncated_body_is_undecodable(settings, serde):
    serde.register(settings.orders_topic)
    value = serde.encode(ORDER)
    with pytest.raises(UndecodableMessage, match="corrupt Avro body"):
        serde.decode(value[:-3])
    with pytest.raises(UndecodableMessage, match="trailing bytes"):
        serde.decode(value + b"\x00\x00")


def test_writer_schema_that_cannot_be_read_as_order(settings, serde):
    other = {"type": "record", "name": "Order", "namespace": "io.orders.v1",
             "fields": [{"name": "orderId", "type": "string"}]}
    other_topic = settings.orders_topic + "-other"
    writer = OrderSerde(make_registry(settings), other)
    writer.register(other_topic)
    value = writer.encode({"orderId": "x"})
    with pytest.raises(SchemaMismatch, match="cannot be read as Order"):
        serde.decode(value)


def test_registry_down_is_unavailable_not_a_bad_message(settings):
    down = dataclasses.replace(settings, schema_registry_url="http://127.0.0.1:1")
    serde = OrderSerde(make_registry(down), load_schema(settings.schema_path))
    with pytest.raises(ServiceUnavailable, match="schema registry"):
        serde.prefetch([b"\x00\x00\x00\x00\x07xx"])
    with pytest.raises(ServiceUnavailable):
        serde.register(settings.orders_topic)
