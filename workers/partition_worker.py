"""The partition worker: owns the partitions of ``orders`` that the consumer group gives it.

Every worker of every host is a member of one consumer group; Kafka's group
coordinator spreads the partitions over them (``--partition`` pins one partition
by explicit assignment instead, for debugging). Decodes, validates and processes each order; counts successes into its
partition's sum and count in Redis; sends transient failures to the retry topic
and permanent ones (including bytes that are not an order) to the DLQ. A failing
order never holds up the orders behind it.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

from confluent_kafka import Message

from .clients import wait_for
from .engine import BatchPlan, BatchWorker, source_of
from .store import Source, SourceBatch

log = logging.getLogger(__name__)

FIRST_ATTEMPT = 1


class PartitionWorker(BatchWorker):
    def __init__(self, settings, name: str, partition: int | None = None, **clients):
        super().__init__(settings, **clients)
        self.name = name
        if partition is None:
            self.subscription = [settings.orders_topic]
        else:
            self.sources = [Source(settings.orders_topic, partition)]

    def plan(self, messages: Sequence[Message]) -> BatchPlan:
        plan = BatchPlan()
        # Fetch unknown writer schemas first: a registry outage stalls the batch
        # (and is retried) instead of dead-lettering good orders.
        wait_for(lambda: self.serde.prefetch(m.value() for m in messages), "schema registry", should_stop=self.stop)
        batches: dict[tuple[str | None, int | None], tuple[SourceBatch, int]] = {}
        for msg in messages:
            key = msg.topic(), msg.partition()
            if key not in batches:
                source = source_of(msg)
                batches[key] = plan.batch_for(source, self.known[source]), self.fresh_from(source)
            batch, fresh = batches[key]
            self.settle(batch, plan, msg, batch.source.partition, FIRST_ATTEMPT, provenance=None, fresh=fresh)
        return plan
