import base64
import hashlib

from confluent_kafka import KafkaError

from workers import envelope as env
from workers import oversize
from workers.settings import Settings

SETTINGS = Settings.from_env({})
HEADERS = env.encode({env.ORIGINAL_TOPIC: "orders", env.ERROR_TYPE: "UndecodableMessage"})


def test_the_limit_is_below_what_the_producer_and_the_parking_topics_take():
    limit = oversize.limit_bytes(SETTINGS)
    assert 0 < limit < 8 * 1024 * 1024


def test_a_message_that_fits_is_forwarded_whole():
    value = b"v" * (oversize.limit_bytes(SETTINGS) - 1000)
    assert oversize.fits(SETTINGS, b"k", value, HEADERS)
    assert oversize.fit(SETTINGS, b"k", value, HEADERS, where="orders:0:1") == (b"k", value, HEADERS)


def test_a_value_too_large_becomes_a_reference():
    value = bytes(range(256)) * (12 * 4096)
    assert not oversize.fits(SETTINGS, b"k", value)
    key, kept, headers = oversize.fit(SETTINGS, b"k", value, HEADERS, where="orders:0:1")
    assert (key, kept) == (b"k", None)
    assert headers[:len(HEADERS)] == HEADERS
    ref = oversize.reference(env.header_dict(headers))
    assert ref is not None
    assert ref["value_size"] == len(value)
    assert ref["value_sha256"] == hashlib.sha256(value).hexdigest()
    assert base64.b64decode(ref["value_head"]) == value[:oversize.HEAD_BYTES]
    assert "too large" in ref["reason"] and "key_size" not in ref
    assert oversize.size(key, kept, headers) < 4096


def test_a_key_too_large_is_described_too():
    key = b"K" * (9 * 1024 * 1024)
    new_key, kept, headers = oversize.fit(SETTINGS, key, b"small", HEADERS, where="orders:0:1")
    assert (new_key, kept) == (None, None)
    ref = oversize.reference(env.header_dict(headers))
    assert ref is not None and ref["key_size"] == len(key) and ref["value_size"] == 5


def test_a_kept_message_has_no_reference():
    assert oversize.reference(env.header_dict(HEADERS)) is None


def test_a_topic_that_rejected_a_size_gets_references_from_then_on():
    topic = "small-dlq-unit"
    value = b"x" * 600_000
    assert oversize.fits(SETTINGS, b"k", value, HEADERS, topic=topic)
    report = oversize.on_delivery(topic, b"k", value, HEADERS)
    report(None, None)  # delivered: nothing learned
    assert oversize.fits(SETTINGS, b"k", value, HEADERS, topic=topic)
    report(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE), None)
    assert not oversize.fits(SETTINGS, b"k", value, HEADERS, topic=topic)
    assert oversize.fits(SETTINGS, b"k", value[:-1000], HEADERS, topic=topic)
    assert oversize.fits(SETTINGS, b"k", value, HEADERS, topic="another-topic")
    key, kept, headers = oversize.fit(SETTINGS, b"k", value, HEADERS, where="orders:0:1", topic=topic)
    ref = oversize.reference(env.header_dict(headers))
    assert kept is None and ref is not None and "rejected" in ref["reason"]
