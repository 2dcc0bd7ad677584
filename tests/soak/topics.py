"""The topics a soak run's pool uses: the one place the soak names them.

Issue 14 changes the retry topics' layout (one per delay level, named from
RETRY_TOPIC and the backoff settings); only ``retry_topics`` needs to follow it.
"""
from __future__ import annotations

from workers.settings import Settings


def retry_topics(settings: Settings) -> list[str]:
    """The retry topics of the pool's settings (today one, RETRY_TOPIC)."""
    return [settings.retry_topic]


def pool_topics(settings: Settings) -> list[str]:
    """Every topic the pool creates: the orders, the retry topics, the dead letters."""
    return [settings.orders_topic, *retry_topics(settings), settings.dlq_topic]
