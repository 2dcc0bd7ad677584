"""``python -m tests.soak.gateway SPEC``: carries a host namespace's traffic to the servers over its veths.

The servers (the bed's brokers and Redis nodes, the lane's registry) listen on the
root namespace's 127.0.0.1 and advertise it, so a pool in a host namespace connects to
127.0.0.1 too, its own loopback. This process, started and stopped by pid by the soak
(tests/soak/network.py), joins the two through the veth pairs, so that taking a veth's
link down cuts exactly that traffic:

    pool in host ns --lo--> [listener 127.0.0.1:P in host ns]
        --veth--> [listener <relay address>:P in the relay ns]
        --lo--> server on 127.0.0.1:P in the root namespace

Each listener is bound inside a namespace the soak created; nothing listens in the
root namespace. A socket stays in the namespace it was created in, so the one thread
switches namespace (setns) only around creating a socket.

SPEC is a JSON file: {"links": [{"ns": ..., "relay_ns": ..., "relay_addr": ..., "ports": [...]}, ...]}.
Writes "ready" to stdout once every listener is bound.
"""
from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("tests.soak.gateway")

CLONE_NEWNET = 0x40000000
# A connect over a link that is down gets no answer: give up like a client would, well before TCP does.
CONNECT_TIMEOUT_S = 10.0
CHUNK = 65536

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


class Namespaces:
    """File descriptors of the root namespace and of named ones (``/run/netns/<name>``)."""

    def __init__(self) -> None:
        self.root = os.open("/proc/self/ns/net", os.O_RDONLY)
        self.fds: dict[str, int] = {}

    @contextmanager
    def inside(self, name: str | None) -> Iterator[None]:
        """This thread in namespace ``name`` (None: the root one) for the block."""
        if name is None:
            yield
            return
        if name not in self.fds:
            self.fds[name] = os.open(f"/run/netns/{name}", os.O_RDONLY)
        _setns(self.fds[name])
        try:
            yield
        finally:
            _setns(self.root)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()  # backpressure: a stalled link stalls the sender, as a network would
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def _connect(nss: Namespaces, ns: str | None, addr: str, port: int
                   ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    with nss.inside(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (addr, port)), CONNECT_TIMEOUT_S)
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock)


def _forward(nss: Namespaces, to_ns: str | None, addr: str, port: int):
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await _connect(nss, to_ns, addr, port)
        except (TimeoutError, OSError):
            writer.close()  # the far side unreachable: the client sees its connection closed
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
    return handle


async def _listen(nss: Namespaces, ns: str, addr: str, port: int, handler) -> asyncio.Server:
    with nss.inside(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((addr, port))
    sock.listen(128)
    sock.setblocking(False)
    return await asyncio.start_server(handler, sock=sock)


async def serve(spec: dict) -> None:
    nss = Namespaces()
    servers = []
    for link in spec["links"]:
        for port in link["ports"]:
            # host ns loopback -> across the veth -> relay ns -> root namespace's loopback
            servers.append(await _listen(nss, link["ns"], "127.0.0.1", port,
                                         _forward(nss, link["ns"], link["relay_addr"], port)))
            servers.append(await _listen(nss, link["relay_ns"], link["relay_addr"], port,
                                         _forward(nss, None, "127.0.0.1", port)))
    print("ready", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for server in servers:
        server.close()


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    with open(argv[0]) as f:
        spec = json.load(f)
    asyncio.run(serve(spec))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
