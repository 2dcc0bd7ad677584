import math

import pytest

from workers.errors import DownstreamUnavailable, InvalidOrder
from workers.processing import Downstream, attempt_fails, price_cents, validate
from workers.settings import backoff_ms

GOOD = {"orderId": "a-1", "product": "mouse", "price": 12.5}


def test_a_good_order_passes():
    validate(GOOD, max_price=1e6)


@pytest.mark.parametrize("change,reason", [
    ({"orderId": ""}, "orderId"),
    ({"orderId": "   "}, "orderId"),
    ({"product": ""}, "product"),
    ({"price": math.nan}, "not finite"),
    ({"price": math.inf}, "not finite"),
    ({"price": 0.0}, "not positive"),
    ({"price": -3.0}, "not positive"),
    ({"price": 1e300}, "above the limit"),
    ({"price": 1.234}, "two decimals"),
    ({"price": "12"}, "not a number"),
])
def test_invalid_orders_say_why(change, reason):
    with pytest.raises(InvalidOrder, match=reason):
        validate({**GOOD, **change}, max_price=1e6)


def test_missing_field_is_invalid():
    with pytest.raises(InvalidOrder, match="orderId"):
        validate({"product": "x", "price": 1.0}, max_price=1e6)


def test_price_cents_is_exact():
    assert price_cents({"price": 0.29}) == 29
    assert price_cents({"price": 199.99}) == 19999
    assert sum(price_cents({"price": 0.1}) for _ in range(10)) == 100


def test_backoff_schedule_defaults():
    assert [backoff_ms(k, 1000, 2) for k in (1, 2, 3)] == [1000, 2000, 4000]
    assert backoff_ms(2, 100, 1.5) == 150
    with pytest.raises(ValueError):
        backoff_ms(0, 1000, 2)


def test_fault_injector_is_deterministic_and_near_its_rate():
    ids = [f"order-{i}" for i in range(20000)]
    first = [attempt_fails(i, 1, 0.1) for i in ids]
    assert first == [attempt_fails(i, 1, 0.1) for i in ids]
    assert 0.08 < sum(first) / len(ids) < 0.12
    # attempts are independent: retries of a failed order mostly succeed
    second = [attempt_fails(i, 2, 0.1) for i, f in zip(ids, first, strict=True) if f]
    assert sum(second) < len(second) * 0.2


def test_fault_injector_extremes():
    assert not attempt_fails("x", 1, 0.0)
    assert attempt_fails("x", 1, 1.0)


def test_downstream_raises_transient_error():
    with pytest.raises(DownstreamUnavailable):
        Downstream(1.0).handle(GOOD, 1)
    Downstream(0.0).handle(GOOD, 1)


def test_a_replay_draws_afresh():
    """The dead letter a replay comes from is part of the draw: its attempts are independent of the first run's."""
    ids = [f"order-{i}" for i in range(4000)]
    dead = [i for i in ids if attempt_fails(i, 1, 0.5)]
    replayed = [attempt_fails(i, 1, 0.5, replay_of="orders-dlq:0:7") for i in dead]
    assert replayed == [attempt_fails(i, 1, 0.5, replay_of="orders-dlq:0:7") for i in dead]  # still pure
    assert 0.4 < sum(replayed) / len(dead) < 0.6
    d = Downstream(0.5)
    assert all(_raises(lambda i=i: d.handle({"orderId": i}, 1, "orders-dlq:0:7")) == fails
               for i, fails in zip(dead, replayed, strict=True))


def _raises(call) -> bool:
    try:
        call()
    except DownstreamUnavailable:
        return True
    return False
