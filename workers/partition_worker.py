"""The partition worker: owns one partition of ``orders`` by explicit assignment.

Decodes, validates and processes each order; counts successes into its
partition's sum and count in Redis; sends transient failures to the retry topic
and permanent ones (including bytes that are not an order) to the DLQ. A failing
order never holds up the orders behind it.
"""
from __future__ import annotations

import logging
from typing import Sequence

from confluent_kafka import Message

from .clients import wait_for
from .engine import BatchPlan, BatchWorker, replay_of
from .store import Source

log = logging.getLogger(__name__)

FIRST_ATTEMPT = 1


class PartitionWorker(BatchWorker):
    def __init__(self, settings, partition: int, **clients):
        super().__init__(settings, **clients)
        self.partition = partition
        self.name = f"partition-{partition}"
        self.source = Source(settings.orders_topic, partition)
        self.sources = [self.source]

    def plan(self, messages: Sequence[Message]) -> BatchPlan:
        plan = BatchPlan()
        # Fetch unknown writer schemas first: a registry outage stalls the batch
        # (and is retried) instead of dead-lettering good orders.
        wait_for(lambda: self.serde.prefetch(m.value() for m in messages), "schema registry", should_stop=self.stop)
        batch = plan.batch_for(self.source, self.known[self.source])
        for msg in messages:
            offset = msg.offset()
            cents, out, order = self.decider.attempt(msg, FIRST_ATTEMPT, provenance=None)
            if cents is not None:
                # A replayed dead letter counts once per orderId, however often it is replayed.
                tag = order["orderId"] if replay_of(msg) else ""
                batch.count(offset, self.partition, cents, tag)
                plan.timestamps_ms.append(msg.timestamp()[1])
                log.debug("counted partition=%d offset=%d order_id=%s cents=%d",
                          self.partition, offset, order["orderId"], cents)
            else:
                batch.park(offset, out.kind)
                if self.needs_side_effects(self.source, offset):
                    plan.out.append(out)
            batch.to_offset = offset + 1
        return plan
