"""The soak's steady load: one unbounded ``orders produce --transactional``, which the nemesis may crash and restart.

Each incarnation records every order whose transaction committed (``--record``), one
file each, so the checker can tell that every delivered order is on the topic once.
In transactions no order reaches the topic twice (the idempotent producer could
write one twice during a leader change: bug 6 of the soak's README).
"""
from __future__ import annotations

import json
import logging
import signal
import subprocess
import threading
from pathlib import Path

from ..pool import ORDERS

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 120  # a stopped producer flushes what it holds; a broker restart may be in the way


class Load:
    """``orders produce --count 0 --rate R`` by pid; crash() and start() may come from another thread."""

    def __init__(self, env: dict, folder: Path, rate: int, seed: int):
        # The producer looks for new partitions every 2 s (librdkafka's default is 5 minutes).
        self.env = {**env, "PATH": "/usr/bin:/bin", "KAFKA_TOPIC_METADATA_REFRESH_INTERVAL_MS": "2000"}
        self.folder = folder
        self.rate = rate
        self.seed = seed
        self.incarnations = 0
        self.crashed = 0
        self.proc: subprocess.Popen | None = None
        self.lock = threading.Lock()

    def start(self) -> None:
        with self.lock:
            if self.proc is not None and self.proc.poll() is None:
                return
            n = self.incarnations
            self.incarnations += 1
            # Another product/price sequence per incarnation; order ids are unique anyway.
            args = [ORDERS, "produce", "--transactional", "--count", "0", "--rate", str(self.rate),
                    "--seed", str(self.seed + n),
                    "--record", str(self.folder / f"delivered-{n}.jsonl")]
            with open(self.folder / f"load-{n}.log", "ab") as out:
                self.proc = subprocess.Popen(args, env=self.env, stdout=out, stderr=out)
            log.info("load started incarnation=%d pid=%d rate=%d", n, self.proc.pid, self.rate)

    def crash(self) -> None:
        """SIGKILL the producer: its open transaction aborts, what it recorded was committed."""
        with self.lock:
            if self.proc is None or self.proc.poll() is not None:
                return
            self.proc.kill()
            self.proc.wait(10)
            self.crashed += 1
            log.info("load crashed pid=%d", self.proc.pid)

    def stop(self) -> int | None:
        """SIGTERM: it commits what it holds and exits 0 if every order it sent was committed; its exit code."""
        with self.lock:
            if self.proc is None:
                return None
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
            log.info("load stopped pid=%d exit=%s", self.proc.pid, self.proc.returncode)
            return self.proc.returncode

    def kill(self) -> None:
        """Cleanup on failure: whatever runs, by pid."""
        with self.lock:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)

    def delivered(self) -> list[dict]:
        """Every order any incarnation recorded as delivered (a crash may cut the last line short)."""
        out = []
        for path in sorted(self.folder.glob("delivered-*.jsonl")):
            for line in path.read_text().splitlines():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # the line a SIGKILL cut: that order's delivery was not recorded
        return out
