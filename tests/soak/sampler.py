"""Samples the pool once a second while the soak runs: counted, lag, retry backlog, DLQ size.

In process, through ``orders status``'s own StatusReader (one Redis pipeline and one
offsets request a sample): a CLI call per second would cost a Python start each on
two cores. A sample that a fault makes unreadable is kept, with its error, as a gap.
"""
from __future__ import annotations

import logging
import threading
import time

from confluent_kafka import KafkaException

from workers.clients import make_admin, make_redis
from workers.errors import OrdersError
from workers.settings import Settings
from workers.status import StatusReader
from workers.store import AggregateStore

log = logging.getLogger(__name__)

INTERVAL_S = 1.0


class Sampler:
    """A thread taking a status snapshot every second; ``samples`` are plain dicts."""

    def __init__(self, settings: Settings, t0: float):
        self.reader = StatusReader(settings, AggregateStore(lambda: make_redis(settings), settings.redis_prefix),
                                   make_admin(settings))
        self.t0 = t0
        self.samples: list[dict] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="sampler", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(30)

    def _loop(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            self.samples.append(self.sample())
            self.stop.wait(max(0.0, INTERVAL_S - (time.monotonic() - started)))

    def sample(self) -> dict:
        t = round(time.monotonic() - self.t0, 2)
        try:
            snap = self.reader.snapshot()
        except (OrdersError, KafkaException) as exc:
            return {"t": t, "error": f"{type(exc).__name__}: {exc}"[:200]}
        except Exception as exc:  # an unforeseen client error must not end the sampling
            log.warning("sample failed", exc_info=True)
            return {"t": t, "error": f"{type(exc).__name__}: {exc}"[:200]}
        # A partition whose end Kafka could not give (no leader while a broker is down) has no lag.
        known = [p for p in snap["partitions"] if p["lag"] is not None]
        lags = [p["lag"] for p in known]
        return {
            "t": t,
            "counted": snap["global"]["count"],
            "lag": sum(lags),
            "lag_unknown": len(snap["partitions"]) - len(known),
            "retry_backlog": snap["retry"]["backlog"],
            "dlq": snap["dlq"]["size"],
            "workers_alive": snap["pool"]["workers_alive"],
            "partitions_owned": snap["pool"]["partitions_owned"],
            "partitions": snap["pool"]["partitions"],
        }


def per_second(samples: list[dict]) -> list[dict]:
    """Counted orders per second between readable samples (what the timeline draws)."""
    out = []
    previous = None
    for sample in samples:
        if "counted" not in sample:
            continue
        if previous is not None and sample["t"] > previous["t"]:
            rate = (sample["counted"] - previous["counted"]) / (sample["t"] - previous["t"])
            out.append({"t": sample["t"], "counted_per_s": round(rate, 1)})
        previous = sample
    return out
