"""What processing one order means: validate, hand it downstream, price it.

Pure logic, no I/O; both the partition worker and the retry worker call it, so an
order's fate depends only on (order, attempt, the dead letter it replays if any):
handling it again after a crash decides exactly as the first run did.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

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


# Copied per attempt: cheaper than building a hash object from its parameters each time.
_FAULT_HASH = hashlib.blake2b(digest_size=8, person=b"orders.fault")


_ALWAYS = 2**64


def attempt_fails(order_id: str, attempt: int, failure_rate: float, replay_of: str | None = None) -> bool:
    """Whether the fault injector fails this attempt: a pure function of its inputs.

    ``replay_of`` (the dead letter a replayed order comes from) makes a replay's
    attempts new draws: a replay at an unchanged failure rate can succeed.
    """
    return _fails(order_id, attempt, _threshold(failure_rate), replay_of)


def _threshold(failure_rate: float) -> int:
    return max(0, min(_ALWAYS, int(failure_rate * _ALWAYS)))


def _fails(order_id: str, attempt: int, threshold: int, replay_of: str | None) -> bool:
    return threshold == _ALWAYS or (threshold > 0 and _fault_draw(order_id, attempt, replay_of) < threshold)


def _fault_draw(order_id: str, attempt: int, replay_of: str | None) -> int:
    """A uniform 64-bit draw per (order, attempt, replay); a cryptographic hash keeps them independent."""
    h = _FAULT_HASH.copy()
    h.update(f"{order_id}:{attempt}".encode() if replay_of is None else f"{order_id}:{attempt}:{replay_of}".encode())
    return int.from_bytes(h.digest(), "big")


@dataclass(frozen=True)
class Downstream:
    """The step after validation (a payment or fulfilment call in a real system).

    Here it only has the fault injector: ``failure_rate`` is the chance that one
    attempt fails transiently.
    """

    failure_rate: float = 0.0
    # handle() runs per order: it compares the draw with this precomputed integer.
    _threshold: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_threshold", _threshold(self.failure_rate))

    def handle(self, order: dict, attempt: int, replay_of: str | None = None) -> None:
        """Raises DownstreamUnavailable when this attempt fails (a replay's attempts are new draws)."""
        if self._threshold and _fails(order["orderId"], attempt, self._threshold, replay_of):
            raise DownstreamUnavailable(f"downstream refused order (injected failure, attempt {attempt})")
