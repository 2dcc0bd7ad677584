"""The nemesis: applies a schedule's faults to the bed, the hosts and the load, and heals them.

Each fault runs in a thread of its own from its scheduled time: act, wait its
duration, heal. Faults therefore overlap as the schedule says; a heal that waits for
a restarted server (``scripts/stack start`` waits for readiness) delays nothing else.
What actually happened (applied and healed times, or why a fault was skipped or
failed) is recorded per fault for the report and the timeline.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from confluent_kafka import KafkaException
from confluent_kafka.admin import NewPartitions

from workers.clients import make_admin
from workers.settings import Settings

from ..bed import Bed
from ..pool import SupervisedPool, stack
from . import schedule as s
from .load import Load
from .network import Network

log = logging.getLogger(__name__)
# The server kind a fault holds from its start to its heal (Nemesis._held).
HELD_BY = {s.BROKER_KILL: "kafka", s.BROKER_RESTART: "kafka", s.REDIS_KILL: "redis"}

HOST_START_TIMEOUT_S = 120
# A broker's start after a SIGKILL took up to ~110 s on two busy cores (scripts/stack waits 120 s
# by default); below tests/pool.py stack()'s own 240 s.
STACK_START_TIMEOUT_S = "200"
PARTITIONS_ADD_TIMEOUT_S = 180  # a broker restart on two busy cores took up to 60 s


class FaultSkipped(Exception):
    """The fault's target was not there to hit (a worker restarting); nothing was done."""


@dataclass
class Applied:
    """One scheduled fault as it happened; times in seconds after the load started."""

    fault: s.Fault
    applied_s: float | None = None   # when the action began
    active_s: float | None = None    # when it had taken effect (a stack command may wait for another's lock)
    healed_s: float | None = None
    outcome: str = "pending"   # healed | skipped | failed
    detail: str = ""

    def as_dict(self) -> dict:
        return {**self.fault.as_dict(), "applied_s": self.applied_s, "active_s": self.active_s,
                "healed_s": self.healed_s,
                "outcome": self.outcome, "detail": self.detail}


@dataclass
class Nemesis:
    bed: Bed
    hosts: dict[str, SupervisedPool]
    load: Load
    settings: Settings
    lane_env: dict[str, str]         # the lane's own stack (its schema registry)
    network: Network
    stop: threading.Event = field(default_factory=threading.Event)
    applied: list[Applied] = field(default_factory=list)
    paused: set[int] = field(default_factory=set)
    _threads: list[threading.Thread] = field(default_factory=list)
    _t0: float = 0.0
    # One fault per server kind from its start to its heal, as the schedule draws them: a heal
    # slower than drawn (a broker start on busy cores) delays the next fault of its kind
    # instead of overlapping it (a Redis replica killed while its master is still down).
    _held: dict[str, threading.Lock] = field(
        default_factory=lambda: {kind: threading.Lock() for kind in set(HELD_BY.values())})

    def start(self, faults: list[s.Fault], t0: float) -> None:
        """Start one thread per fault; each waits for its time."""
        self._t0 = t0
        for fault in faults:
            record = Applied(fault)
            self.applied.append(record)
            thread = threading.Thread(target=self._run, args=(record,), name=f"nemesis-{fault.kind}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def join(self, timeout: float) -> bool:
        """Wait until every fault is healed (or skipped or failed); False if some still run."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    def abort(self) -> None:
        """Cut every remaining wait short: the faults still pending are skipped, active ones heal now."""
        self.stop.set()
        for pid in list(self.paused):
            _signal(pid, signal.SIGCONT)

    def now(self) -> float:
        return round(time.monotonic() - self._t0, 1)

    def _run(self, record: Applied) -> None:
        fault = record.fault
        if self.stop.wait(max(0.0, self._t0 + fault.at_s - time.monotonic())):
            record.outcome, record.detail = "skipped", "aborted before its time"
            return
        action = getattr(self, "_" + fault.kind.replace("-", "_"))
        held = self._held.get(HELD_BY.get(fault.kind, ""))
        if held is not None and not self._take(held):
            record.outcome, record.detail = "skipped", "aborted while the last fault of its kind healed"
            return
        try:
            record.applied_s = self.now()
            log.info("fault kind=%s target=%s duration_s=%s at_s=%s", fault.kind, fault.target,
                     fault.duration_s, record.applied_s)
            action(fault, lambda: self._hold(record))
            record.outcome = "healed"
        except FaultSkipped as exc:
            record.outcome, record.detail = "skipped", str(exc)
        except (subprocess.SubprocessError, OSError, AssertionError, ValueError, RuntimeError, KafkaException) as exc:
            # A heal that failed (a server that did not come back): the run is reported as failed.
            record.outcome, record.detail = "failed", f"{type(exc).__name__}: {exc}"
            log.error("fault failed kind=%s target=%s error=%s", fault.kind, fault.target, record.detail)
        finally:
            if held is not None:
                held.release()
            record.healed_s = self.now()
            log.info("fault over kind=%s target=%s outcome=%s at_s=%s", fault.kind, fault.target,
                     record.outcome, record.healed_s)

    def _take(self, held: threading.Lock) -> bool:
        """Wait until the last fault of this kind has healed; False if the run is aborted meanwhile."""
        while not held.acquire(timeout=1.0):
            if self.stop.is_set():
                return False
        return True

    def _hold(self, record: Applied) -> None:
        """The fault is in effect: keep it for its duration (less if the run is aborted)."""
        record.active_s = self.now()
        self.stop.wait(record.fault.duration_s)

    def _bed_env(self) -> dict[str, str]:
        return {**self.bed.env, "STACK_START_TIMEOUT": STACK_START_TIMEOUT_S}

    # One method per fault kind: act, ``wait()`` the fault's duration, heal.

    def _worker_pid(self, target: str) -> tuple[SupervisedPool, int]:
        host_name, program = target.split("/", 1)
        host = self.hosts[host_name]
        out = host.ctl("pid", program).strip()
        # supervisorctl says 0 for a program that is not running: never signal pid 0 (our own group).
        if not out.isdigit() or int(out) <= 1:
            raise FaultSkipped(f"{program} on {host_name} not running ({out!r})")
        return host, int(out)

    def _worker_kill(self, fault: s.Fault, wait: Callable[[], None]) -> None:
        _, pid = self._worker_pid(fault.target)
        _signal(pid, signal.SIGKILL)
        wait()

    def _worker_pause(self, fault: s.Fault, wait: Callable[[], None]) -> None:
        _, pid = self._worker_pid(fault.target)
        self.paused.add(pid)
        _signal(pid, signal.SIGSTOP)
        try:
            wait()
        finally:
            _signal(pid, signal.SIGCONT)
            self.paused.discard(pid)

    def _host_kill(self, fault: s.Fault, wait: Callable[[], None]) -> None:
        host = self.hosts[fault.target]
        host.kill_host()
        wait()
        host.start(timeout=HOST_START_TIMEOUT_S)

    def _broker_kill(self, fault: s.Fault, wait: Callable[[], None]) -> None:
        stack("kill", fault.target, env=self._bed_env())
        try:
            wait()
        finally:
            stack("start", fault.target, env=self._bed_env())

    def _broker_restart(self, fault: s.Fault, wait: Callable[[], None]) -> None:
        stack("restart", fault.target, env=self._bed_env())

    def _redis_kill(self, fault: s.Fault, wait: Callable[[], None]) -> None:
        stack("kill", fault.target, env=self._bed_env())
        try:
            wait()
        finally:
            stack("start", fault.target, env=self._bed_env())

    def _producer_crash(self, fault: s.Fault, wait: Callable[[], None]) -> None:
        self.load.crash()
        try:
            wait()
        finally:
            self.load.start()

    def _partitions_add(self, fault: s.Fault, wait: Callable[[], None]) -> None:
        """+2 partitions. While a broker restarts Kafka refuses (3 replicas need 3 brokers) or times
        out waiting for its controller: as an operator would, try again until it took."""
        admin = make_admin(self.settings)
        topic = self.settings.orders_topic
        count = self._partitions(admin)
        want = count + s.PARTITIONS_ADDED
        deadline = time.monotonic() + PARTITIONS_ADD_TIMEOUT_S
        while True:
            try:
                admin.create_partitions([NewPartitions(topic, want)])[topic].result(60)
                break
            except KafkaException as exc:
                # A timed-out request may still have been carried out.
                if self._partitions(admin) >= want:
                    break
                if time.monotonic() > deadline:
                    raise
                log.info("partitions-add tries again: %s", exc.args[0].str())
                if self.stop.wait(2):
                    raise FaultSkipped("aborted while Kafka refused the new partitions") from exc
        wait()
        log.info("partitions added topic=%s from=%d to=%d", topic, count, want)

    def _partitions(self, admin) -> int:
        topic = self.settings.orders_topic
        return len(admin.list_topics(topic, timeout=30).topics[topic].partitions)

    def _partition(self, fault: s.Fault, wait: Callable[[], None]) -> None:
        host, kind = fault.target.split("/", 1)
        try:
            self.network.partition(host, kind)
            wait()
        finally:
            self.network.heal(host, kind)

    def _registry_restart(self, fault: s.Fault, wait: Callable[[], None]) -> None:
        stack("restart", "registry", env={**self.lane_env, "STACK_START_TIMEOUT": STACK_START_TIMEOUT_S})


def _signal(pid: int, sig: signal.Signals) -> None:
    if pid <= 1:
        raise ValueError(f"refusing to signal pid {pid}")
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        log.info("pid=%d gone before %s", pid, sig.name)
