"""What processing one order means: validate, hand it downstream, price it.

Pure logic, no I/O; both the partition worker and the retry worker call it, so an
order's fate depends only on (order, attempt): a replay after a crash decides
exactly as the first run did.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

from .errors import DownstreamUnavailable, InvalidOrder


def validate(order: dict, *, max_price: float) -> None:
    """Check the business rules; raises InvalidOrder saying which one failed."""
    for name in ("orderId", "product"):
        value = order.get(name)
        if not isinstance(value, str) or not value.strip():
            raise InvalidOrder(f"{name} is missing or empty")
    price = order.get("price")
    if isinstance(price, bool) or not isinstance(price, (int, float)):
        raise InvalidOrder(f"price {price!r} is not a number")
    if not math.isfinite(price):
        raise InvalidOrder(f"price {price} is not finite")
    if price <= 0:
        raise InvalidOrder(f"price {price} is not positive")
    if price > max_price:
        raise InvalidOrder(f"price {price} is above the limit {max_price}")
    if round(price, 2) != price:
        raise InvalidOrder(f"price {price} has more than two decimals")


def price_cents(order: dict) -> int:
    """The price in cents: the aggregate sums integers so it never drifts."""
    return int(round(order["price"] * 100))


def attempt_fails(order_id: str, attempt: int, failure_rate: float) -> bool:
    """Whether the fault injector fails this attempt: a pure function of its inputs."""
    if failure_rate <= 0:
        return False
    if failure_rate >= 1:
        return True
    digest = hashlib.blake2b(f"{order_id}:{attempt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < failure_rate


@dataclass(frozen=True)
class Downstream:
    """The step after validation (a payment or fulfilment call in a real system).

    Here it only has the fault injector: ``failure_rate`` is the chance that one
    attempt fails transiently.
    """

    failure_rate: float = 0.0

    def handle(self, order: dict, attempt: int) -> None:
        """Raises DownstreamUnavailable when this attempt fails."""
        if attempt_fails(order["orderId"], attempt, self.failure_rate):
            raise DownstreamUnavailable(f"downstream refused order (injected failure, attempt {attempt})")


def backoff_ms(retry_number: int, base_ms: int, multiplier: float) -> int:
    """Delay before retry ``retry_number`` (1-based): base * multiplier**(n-1)."""
    if retry_number < 1:
        raise ValueError("retry_number starts at 1")
    return int(base_ms * multiplier ** (retry_number - 1))
