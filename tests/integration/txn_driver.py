"""Drives one partition worker's Kafka transaction by hand, for test_broker_outage.py.

Run as ``python -m tests.integration.txn_driver MODE`` with a test's environment
(its topics must exist and partition 0 of ``orders`` must hold messages). It
builds the real worker with real clients, exactly as ``orders consume`` does, and
talks to the test on stdin/stdout:

* prints ``ready`` once the worker has started and, by MODE:
  ``commit``: a transaction is open with one message in it (``_publish``);
  ``offsets``: the worker has handled partition 0 up to its end, uncommitted;
  ``restart``: nothing (a fresh process after one that exited);
* waits for ``stopped`` (the test stopped the broker), calls ``_commit()`` and
  prints ``returned`` if that call comes back (``restart`` skips this step);
* waits for ``started`` (the broker is back), then publishes and commits until
  the worker's committed offset is partition 0's end. Exits 0 when it is,
  1 if it is not within RECOVER_S, FATAL_EXIT on a FatalWorkerError (the CLI
  would exit and supervisor restart it). The watchdog may end it with EXIT_STUCK
  at any point.
"""
from __future__ import annotations

import logging
import sys
import time

from confluent_kafka import TopicPartition

from workers.clients import make_admin, make_consumer, make_producer, make_redis, make_registry
from workers.engine import FatalWorkerError, OutMessage, StopFlag
from workers.partition_worker import PartitionWorker
from workers.serde import OrderSerde, load_schema
from workers.settings import Settings
from workers.store import DEAD, AggregateStore, Source

RECOVER_S = 60
FATAL_EXIT = 4


def say(word: str) -> None:
    print(word, flush=True)


def wait_for_line(word: str) -> None:
    line = sys.stdin.readline().strip()
    if line != word:
        raise SystemExit(f"expected {word!r} on stdin, got {line!r}")


def main(mode: str) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = Settings.from_env()
    role = "partition-0"
    worker = PartitionWorker(
        settings, role, partition=0,
        consumer=make_consumer(settings, settings.group_id(role)),
        producer=make_producer(settings, transactional_id=settings.transactional_id(role)),
        admin=make_admin(settings),
        store=AggregateStore(make_redis(settings), settings.redis_prefix),
        serde=OrderSerde(make_registry(settings), load_schema(settings.schema_path)),
        stop=StopFlag().install(),
    )
    source = Source(settings.orders_topic, 0)
    _, end = worker.consumer.get_watermark_offsets(TopicPartition(source.topic, source.partition), timeout=10)
    assert end > 0, "partition 0 of orders is empty"

    def message(key: str) -> OutMessage:
        return OutMessage(source, settings.dlq_topic, key.encode(), b"driver", [], DEAD)

    try:
        worker.start()
        if mode == "commit":
            worker._publish([message("before-outage")])
        elif mode == "offsets":
            worker.position[source] = end
        say("ready")
        if mode != "restart":
            wait_for_line("stopped")
            worker._commit()
            say("returned")
            wait_for_line("started")
        deadline = time.monotonic() + RECOVER_S
        while worker.committed.get(source) != end:
            if time.monotonic() > deadline:
                logging.error("not recovered: committed=%s end=%s", worker.committed.get(source), end)
                return 1
            worker.position[source] = end
            worker._publish([message("after-outage")])
            worker._commit()
        say("recovered")
        return 0
    except FatalWorkerError:
        logging.exception("fatal")
        return FATAL_EXIT
    finally:
        worker.consumer.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
