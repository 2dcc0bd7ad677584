"""The soak's network (tests/soak/network.py, gateway.py) against a local echo server: traffic
from a host's namespace reaches 127.0.0.1 over the veth, a partition cuts it, a heal restores
it, and everything is deleted afterwards, also when setting up fails half-way.

Needs root (``ip netns``); marked ``soak``, so it runs with the soak (``-m soak``), not by default.
"""
from __future__ import annotations

import socket
import socketserver
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.soak.gateway import Namespaces
from tests.soak.network import Network, NetworkError

pytestmark = pytest.mark.soak

HOSTS = ("host-a", "host-b")


class Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(1024):
            self.request.sendall(data)


@contextmanager
def echo_server() -> Iterator[int]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def echo_from(namespace: str, port: int, timeout: float = 3.0) -> bool:
    """Whether a connection made inside ``namespace`` to its own 127.0.0.1:port gets an echo."""
    with Namespaces().inside(namespace):
        sock = socket.socket()
    with sock:
        sock.settimeout(timeout)
        try:
            sock.connect(("127.0.0.1", port))
            sock.sendall(b"ping")
            return sock.recv(4) == b"ping"
        except OSError:
            return False


def namespaces(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(prefix)]


def test_a_partition_cuts_one_host_from_one_kind_of_server_until_healed(tmp_path):
    with echo_server() as kafka_port, echo_server() as redis_port:
        network = Network(tag="t-unit", hosts=HOSTS, folder=tmp_path,
                          ports={"kafka": [kafka_port], "redis": [redis_port], "registry": []})
        try:
            network.open()
            a, b = network.namespace("host-a"), network.namespace("host-b")
            assert echo_from(a, kafka_port) and echo_from(a, redis_port) and echo_from(b, kafka_port)

            network.partition("host-a", "kafka")
            assert not echo_from(a, kafka_port)
            assert echo_from(a, redis_port) and echo_from(b, kafka_port)  # only that host, only that link

            network.heal("host-a", "kafka")
            assert echo_from(a, kafka_port)
        finally:
            network.close()
        assert namespaces(network.prefix) == []
        assert network.gateway is not None and network.gateway.poll() is not None


def test_a_failed_setup_leaves_nothing_behind(tmp_path):
    network = Network(tag="t-unit", hosts=HOSTS, folder=tmp_path,
                      ports={"kafka": [1], "redis": [2], "registry": [-5]})  # -5: the gateway cannot bind it
    with pytest.raises(NetworkError):
        network.open()
    assert namespaces(network.prefix) == []
    assert network.gateway is None or network.gateway.poll() is not None
