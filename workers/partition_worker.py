"""The partition worker: owns one partition of ``orders`` by explicit assignment.

Decodes, validates and processes each order; counts successes into its
partition's sum and count in Redis; sends transient failures to the retry topic
and permanent ones (including bytes that are not an order) to the DLQ. A failing
order never holds up the orders behind it.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

from confluent_kafka import Message

from .clients import wait_for
from .engine import BatchPlan, BatchWorker
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
        fresh = self.fresh_from(self.source)
        for msg in messages:
            self.settle(batch, plan, msg, self.partition, FIRST_ATTEMPT, provenance=None, fresh=fresh)
        return plan
