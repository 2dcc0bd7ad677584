import itertools
import uuid

from workers.processing import validate
from workers.producer import RateLimiter, random_orders


def take(n, seed=None):
    return list(itertools.islice(random_orders(seed), n))


def test_orders_are_valid_and_ids_are_uuid4():
    for order in take(1000):
        validate(order, max_price=1e6)
        assert uuid.UUID(order["orderId"]).version == 4


def test_ids_are_unique_across_runs_even_with_the_same_seed():
    first, second = take(5000, seed=42), take(5000, seed=42)
    ids = [o["orderId"] for o in first + second]
    assert len(set(ids)) == len(ids)
    # the seed fixes what is ordered, not who ordered it
    assert [(o["product"], o["price"]) for o in first] == [(o["product"], o["price"]) for o in second]


def test_unlimited_rate_never_waits():
    limiter = RateLimiter(0, stop=lambda: False)
    waited: list[float] = []
    for _ in range(1000):
        limiter.wait(waited.append)
    assert waited == []


def test_a_paced_wait_hands_its_time_to_idle():
    limiter = RateLimiter(20, stop=lambda: False)
    waited: list[float] = []
    for _ in range(3):
        limiter.wait(waited.append)
    assert waited and all(0 < w <= 0.5 for w in waited)
