"""The log of record is read to the end of what Kafka has committed, past other producers' open transactions.

A rebuild (Redis wiped or behind) asks the retry and DLQ topics which offsets
below K were parked. Those messages were committed with K, but they may sit
behind another producer's transaction that is still open: a worker SIGKILLed
mid-transaction leaves one until it is fenced or times out. A ``read_committed``
consumer's "end" is the last stable offset, which stops at that open transaction,
so reading "to the end" missed the parked offsets behind it. The rebuild then took
them for counted: each was counted at its source and again where its retry
succeeded (the registry-restart fault test over-counted by 272 so, under load).
"""
from __future__ import annotations

import threading

from workers.clients import make_admin, make_consumer, make_producer
from workers.envelope import PARKED_FROM
from workers.ledger import published_decisions
from workers.settings import Settings
from workers.store import RETRIED, Source

from ..conftest import isolated_env
from ..pool import run_orders
from .conftest import cleanup

OPEN_FOR_S = 2.0  # how long the other producer's transaction stays open while the ledger reads


def test_the_ledger_reads_past_another_producers_open_transaction():
    env = isolated_env("ledger", ORDERS_PARTITIONS="1", RETRY_PARTITIONS="1")
    settings = Settings.from_env(env)
    source = Source(settings.orders_topic, 0)
    run_orders(env, "init")
    try:
        # A worker dies with a transaction open on the retry topic: its message comes first.
        zombie = make_producer(settings, transactional_id=settings.transactional_id("ledger-zombie"))
        zombie.init_transactions()
        zombie.begin_transaction()
        zombie.produce(settings.retry_topics[0], key=b"open", value=b"x", partition=0)
        assert zombie.flush(30) == 0
        # Another worker parks offset 5 of the source and commits, with its K, after it.
        worker = make_producer(settings, transactional_id=settings.transactional_id("ledger-worker"))
        worker.init_transactions()
        worker.begin_transaction()
        worker.produce(settings.retry_topics[0], key=b"parked", value=b"y", partition=0,
                       headers=[(PARKED_FROM, f"{source}:5".encode())])
        worker.commit_transaction(30)
        # The zombie's transaction ends (fenced, or timed out by the broker) while the ledger reads.
        ender = threading.Timer(OPEN_FOR_S, zombie.abort_transaction)
        ender.start()
        try:
            found = published_decisions(lambda: make_consumer(settings, settings.group_id("ledger")),
                                        make_admin(settings), settings, [source])
        finally:
            ender.join()
        assert found == {source: {5: RETRIED}}, "a committed parked offset was missed"
    finally:
        cleanup(settings)
