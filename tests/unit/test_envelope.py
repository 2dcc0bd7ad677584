import pytest

from workers import envelope as env


def test_retry_headers_round_trip():
    p = env.Provenance("orders", 2, 41, 1700000000000, 1700000000500)
    headers = env.retry_headers(p, parked_from="orders-retry:1:7", attempt=3, due_at_ms=1700000009999,
                                error_type="DownstreamUnavailable", error_message="boom")
    h = env.header_dict(headers)
    assert env.Provenance.from_headers(h) == p
    assert env.retry_attempt(h) == (3, 1700000009999)
    assert h[env.ERROR_TYPE] == "DownstreamUnavailable"
    assert env.parked_from(h, "orders") == ("orders-retry", 1, 7)


def test_missing_header_is_named():
    with pytest.raises(env.MalformedEnvelope, match="orders.original.partition"):
        env.Provenance.from_headers({env.ORIGINAL_TOPIC: "orders"})


def test_bad_header_value_is_named():
    with pytest.raises(env.MalformedEnvelope, match="orders.attempt"):
        env.retry_attempt({env.ATTEMPT: "x", env.DUE_AT: "1"})


def test_long_error_messages_are_cut():
    p = env.Provenance("orders", 0, 0, 0, 0)
    h = env.header_dict(env.dead_letter_headers(p, parked_from="orders:0:0", attempts=1, error_type="X",
                                                error_message="e" * 10000, dead_lettered_at_ms=1))
    assert len(h[env.ERROR_MESSAGE]) == 2000


def test_parked_from_of_messages_without_the_header():
    """Older messages name their source only when the original order itself was parked."""
    p = env.Provenance("orders", 2, 41, 0, 0)
    first_retry = {env.ATTEMPT: 2, env.DUE_AT: 5}
    later_retry = {env.ATTEMPT: 3, env.DUE_AT: 5}
    dead_at_once = {env.ATTEMPTS: 1}
    dead_after_retries = {env.ATTEMPTS: 4}
    as_read = [env.header_dict(p.encoded() + env.encode(h))
               for h in (first_retry, later_retry, dead_at_once, dead_after_retries)]
    assert [env.parked_from(h, "orders") for h in as_read] == [("orders", 2, 41), None, ("orders", 2, 41), None]
    assert env.parked_from({env.PARKED_FROM: "not-coordinates"}, "orders") is None


def test_headers_read_back_as_written():
    """Retry and dead-letter headers are the provenance and decision, as strings any Kafka tool shows."""
    p = env.Provenance("orders", 2, 41, 1_700_000_000_000, 1_700_000_000_500, replay_of="orders-dlq:0:7")
    retry = env.header_dict(env.retry_headers(p, parked_from="orders:2:41", attempt=2, due_at_ms=99,
                                              error_type="DownstreamUnavailable", error_message="down"))
    assert env.Provenance.from_headers(retry) == p
    assert env.retry_attempt(retry) == (2, 99)
    assert (retry[env.PARKED_FROM], retry[env.ERROR_TYPE], retry[env.ERROR_MESSAGE]) == \
        ("orders:2:41", "DownstreamUnavailable", "down")
    dead = env.header_dict(env.dead_letter_headers(env.Provenance("orders", 0, 1, 2, 3), parked_from="orders:0:1",
                                                   attempts=4, error_type="X", error_message="e",
                                                   dead_lettered_at_ms=5))
    assert env.REPLAY_OF not in dead
    assert (dead[env.ATTEMPTS], dead[env.DEAD_LETTERED_AT], dead[env.ORIGINAL_OFFSET]) == ("4", "5", "1")
