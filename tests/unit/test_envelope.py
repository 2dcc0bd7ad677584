import pytest

from workers import envelope as env


def test_retry_headers_round_trip():
    p = env.Provenance("orders", 2, 41, 1700000000000, 1700000000500)
    headers = env.retry_headers(p, attempt=3, due_at_ms=1700000009999, error_type="DownstreamUnavailable",
                                error_message="boom")
    h = env.header_dict(headers)
    assert env.Provenance.from_headers(h) == p
    assert env.retry_attempt(h) == (3, 1700000009999)
    assert h[env.ERROR_TYPE] == "DownstreamUnavailable"


def test_missing_header_is_named():
    with pytest.raises(env.MalformedEnvelope, match="orders.original.partition"):
        env.Provenance.from_headers({env.ORIGINAL_TOPIC: "orders"})


def test_bad_header_value_is_named():
    with pytest.raises(env.MalformedEnvelope, match="orders.attempt"):
        env.retry_attempt({env.ATTEMPT: "x", env.DUE_AT: "1"})


def test_long_error_messages_are_cut():
    p = env.Provenance("orders", 0, 0, 0, 0)
    h = env.header_dict(env.dead_letter_headers(p, attempts=1, error_type="X", error_message="e" * 10000,
                                                dead_lettered_at_ms=1))
    assert len(h[env.ERROR_MESSAGE]) == 2000
