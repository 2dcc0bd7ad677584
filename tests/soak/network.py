"""The soak's network: each host in a namespace of its own, joined to the servers by veth pairs.

Per host, one veth pair per kind of server (``kafka``: the brokers; ``redis``: the
Redis Cluster nodes; ``registry``: the lane's schema registry), from the host's
namespace to a relay namespace; the gateway (tests/soak/gateway.py) carries the
traffic from the host's loopback over the veth to the servers on the root
namespace's 127.0.0.1. A network partition takes the relay's end of one pair down:
the host's packets to those servers are dropped (a blackhole, not a refusal) until
it is brought up again.

Everything is created here and deleted here: the namespaces are named after the
bed's Kafka port (one set per test lane), created by ``open()`` after deleting any a
killed run left behind, and deleted by ``close()`` (the veths go with them), which
the runner calls in a ``finally``. The veths are created inside the namespaces and
never exist in the root namespace; their addresses (10.77.x.y) route only there;
nothing listens in the root namespace.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from ..lanes import REPO
from .schedule import PARTITION_FROM

log = logging.getLogger(__name__)

IP = shutil.which("ip") or "/usr/sbin/ip"  # absolute: it also runs under the hosts' PATH
READY_TIMEOUT_S = 30
STOP_TIMEOUT_S = 10
KAFKA, REDIS, REGISTRY = "kafka", "redis", "registry"
# The links a partition may cut; the registry's is never cut (its restart is a fault of its own).
CUTTABLE = PARTITION_FROM
assert set(CUTTABLE) == {KAFKA, REDIS}


class NetworkError(RuntimeError):
    """A namespace, veth or the gateway could not be set up (not root, no ``ip netns``)."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([IP, *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise NetworkError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


@dataclass
class Network:
    tag: str                         # unique per lane: the bed's Kafka port
    hosts: tuple[str, ...]
    ports: dict[str, list[int]]      # per link kind, the server ports it carries
    folder: Path                     # the gateway's spec and log
    gateway: subprocess.Popen | None = None
    cut: set[tuple[str, str]] = field(default_factory=set)

    @property
    def prefix(self) -> str:
        return f"soak{self.tag}-"

    @property
    def relay(self) -> str:
        return self.prefix + "relay"

    def namespace(self, host: str) -> str:
        """The host's network namespace (its supervisord runs under ``ip netns exec`` it)."""
        return self.prefix + host

    def exec_prefix(self, host: str) -> list[str]:
        return [IP, "netns", "exec", self.namespace(host)]

    def _relay_end(self, host: str, kind: str) -> str:
        return f"{host}-{kind}"[-15:]  # an interface name has at most 15 characters

    def _addresses(self, host: str, kind: str) -> tuple[str, str]:
        """The relay's and the host's address on the pair: a /30 of its own per host and kind."""
        net = self.hosts.index(host) * 4 + list(self.ports).index(kind)
        return f"10.77.{net}.1", f"10.77.{net}.2"

    @property
    def _pidfile(self) -> Path:
        return REPO / "run" / "soak" / f".gateway-{self.tag}.pid"

    def open(self) -> None:
        """Create the namespaces and veths and start the gateway; on failure, delete what was made."""
        self._remove_leftovers()
        try:
            for name in (self.relay, *(self.namespace(h) for h in self.hosts)):
                ip("netns", "add", name)
                ip("-n", name, "link", "set", "lo", "up")
            links = []
            for host in self.hosts:
                for kind, ports in self.ports.items():
                    relay_addr, host_addr = self._addresses(host, kind)
                    host_end, relay_end = f"v-{kind}", self._relay_end(host, kind)
                    ip("link", "add", host_end, "netns", self.namespace(host), "type", "veth",
                       "peer", "name", relay_end, "netns", self.relay)
                    ip("-n", self.namespace(host), "addr", "add", f"{host_addr}/30", "dev", host_end)
                    ip("-n", self.relay, "addr", "add", f"{relay_addr}/30", "dev", relay_end)
                    ip("-n", self.namespace(host), "link", "set", host_end, "up")
                    ip("-n", self.relay, "link", "set", relay_end, "up")
                    links.append({"ns": self.namespace(host), "relay_ns": self.relay, "relay_addr": relay_addr,
                                  "ports": ports})
            self._start_gateway(links)
        except BaseException:
            self.close()
            raise
        log.info("network up relay=%s hosts=%s links=%s", self.relay, [self.namespace(h) for h in self.hosts],
                 {k: len(v) for k, v in self.ports.items()})

    def _start_gateway(self, links: list[dict]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        spec = self.folder / "gateway.json"
        spec.write_text(json.dumps({"links": links}, indent=1))
        with open(self.folder / "gateway.log", "ab") as err:
            self.gateway = subprocess.Popen([sys.executable, "-m", "tests.soak.gateway", str(spec)], cwd=REPO,
                                            stdout=subprocess.PIPE, stderr=err)
        self._pidfile.parent.mkdir(parents=True, exist_ok=True)
        self._pidfile.write_text(str(self.gateway.pid))
        assert self.gateway.stdout is not None
        # The gateway prints "ready" once every listener is bound (it binds in well under a second).
        deadline = time.monotonic() + READY_TIMEOUT_S
        line = b""
        while time.monotonic() < deadline and self.gateway.poll() is None:
            line = self.gateway.stdout.readline()
            if line.strip() == b"ready":
                return
        raise NetworkError(f"the gateway did not start (exit {self.gateway.poll()}, said {line!r}); "
                           f"see {self.folder / 'gateway.log'}")

    def partition(self, host: str, kind: str) -> None:
        """Cut ``host`` from the ``kind`` servers: the relay's end of their veth down."""
        if kind not in CUTTABLE:
            raise ValueError(f"no partition from {kind!r}: one of {CUTTABLE}")
        ip("-n", self.relay, "link", "set", self._relay_end(host, kind), "down")
        self.cut.add((host, kind))
        log.info("partition host=%s from=%s", host, kind)

    def heal(self, host: str, kind: str) -> None:
        ip("-n", self.relay, "link", "set", self._relay_end(host, kind), "up")
        self.cut.discard((host, kind))
        log.info("partition healed host=%s from=%s", host, kind)

    def close(self) -> None:
        """Stop the gateway (by pid) and delete the namespaces with their veths. Call after the hosts stopped:
        a namespace with a process still in it outlives its name."""
        if self.gateway is not None and self.gateway.poll() is None:
            self.gateway.send_signal(signal.SIGTERM)
            try:
                self.gateway.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.gateway.kill()
                self.gateway.wait(STOP_TIMEOUT_S)
        self._pidfile.unlink(missing_ok=True)
        for name in self._namespaces():
            ip("netns", "del", name, check=False)
        left = self._namespaces()
        if left:
            log.error("namespaces not deleted: %s", left)

    def _namespaces(self) -> list[str]:
        names = [line.split()[0] for line in ip("netns", "list").stdout.splitlines() if line.strip()]
        return [n for n in names if n.startswith(self.prefix)]

    def _remove_leftovers(self) -> None:
        """A run of this lane that was SIGKILLed left its gateway (pidfile) and namespaces: remove them."""
        if self._pidfile.exists():
            try:
                proc = psutil.Process(int(self._pidfile.read_text()))
                if "tests.soak.gateway" in " ".join(proc.cmdline()):
                    log.warning("stopping a leftover gateway pid=%d", proc.pid)
                    proc.kill()
            except (psutil.NoSuchProcess, ValueError):
                pass
            self._pidfile.unlink(missing_ok=True)
        for name in self._namespaces():
            log.warning("deleting a leftover namespace %s", name)
            ip("netns", "del", name, check=False)


def check_available() -> None:
    """Fail early, by name, where namespaces cannot be made (not root)."""
    if os.geteuid() != 0:
        raise NetworkError("the soak's network partitions need root (ip netns, veth pairs)")
