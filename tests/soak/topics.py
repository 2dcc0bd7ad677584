"""The topics a soak run's pool uses: the one place the soak names them."""
from __future__ import annotations

from collections.abc import Iterable

from workers.settings import Settings


def pool_topics(settings: Settings, existing: Iterable[str]) -> list[str]:
    """Every topic of the pool among ``existing``: the orders, every retry level (one per
    delay, of any backoff settings), the dead letters."""
    return sorted(t for t in existing if settings.is_pool_topic(t))
