"""A partition worker whose group assigns and then revokes partitions within one ``poll()``.

Run as ``python -m tests.integration.rebalance_driver`` with a test's environment
(its orders topic must exist with 2 or more partitions). It builds the real
worker with real clients, as ``orders consume`` does, and joins the group. When
the group first gives it partitions (its ``on_assign`` ran: state loaded), a
second member joins from a thread, so the coordinator takes some of them back;
the worker's ``on_revoke`` then runs inside the same long ``poll()``.

confluent-kafka keeps a callback's state per client and thread; a call into the
same consumer from inside a callback that itself waits on Kafka (``list_topics``)
clears it, and the next callback of that poll aborts the process (SIGABRT,
"CallState_get: Assertion `cs != NULL' failed"). Prints ``assigned=N revoked=M``
and exits 0 once a poll saw both; 1 if the group never took partitions back.
"""
from __future__ import annotations

import logging
import sys
import threading
import time

from workers.clients import make_admin, make_consumer, make_producer, make_redis, make_registry
from workers.engine import StopFlag
from workers.partition_worker import PartitionWorker
from workers.serde import OrderSerde, load_schema
from workers.settings import Settings
from workers.store import AggregateStore

POLL_S = 20.0  # one poll: long enough for the second member's join to reach this one
ROUNDS = 3


def main() -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    settings = Settings.from_env()
    group = settings.group_id("workers")
    membership = {"group.protocol": "consumer"}
    worker = PartitionWorker(
        settings, "driver-0",
        consumer=make_consumer(settings, group, **membership),
        producer=make_producer(settings, transactional_id=settings.transactional_id("driver-0")),
        admin=make_admin(settings),
        store=AggregateStore(make_redis(settings), settings.redis_prefix),
        serde=OrderSerde(make_registry(settings), load_schema(settings.schema_path)),
        stop=StopFlag(),
    )
    done = threading.Event()
    joined: list[threading.Thread] = []
    assigned: list[int] = []
    revoked: list[int] = []

    def second_member() -> None:
        other = make_consumer(settings, group, **membership)
        other.subscribe([settings.orders_topic])
        while not done.is_set():
            other.poll(0.2)
        other.close()

    def on_assigned(sources) -> None:
        assigned.append(len(sources))
        if not joined:  # inside the first on_assign: the second member joins now
            joined.append(threading.Thread(target=second_member, daemon=True))
            joined[0].start()

    worker.on_assigned = on_assigned  # type: ignore[method-assign]
    worker.on_released = lambda sources: revoked.append(len(sources))  # type: ignore[method-assign]
    worker.start()
    try:
        deadline = time.monotonic() + ROUNDS * POLL_S
        while not revoked and time.monotonic() < deadline:
            worker.consumer.poll(POLL_S)  # returns early only for a message (the topic is empty)
        print(f"assigned={sum(assigned)} revoked={sum(revoked)}", flush=True)
        return 0 if revoked else 1
    finally:
        done.set()
        worker.consumer.close()
        if joined:
            joined[0].join(10)

if __name__ == "__main__":
    sys.exit(main())
