"""A TCP forwarder on loopback that a test can cut: ``cut()`` closes every connection and
refuses new ones (what a stopped server looks like to its clients), ``start()`` listens again
on the same port (the server back, with its data). The broker scenarios of the fault suite and
the gallery's Redis-outage test put one in front of a real server."""

from __future__ import annotations

import contextlib
import socket
import threading


class TcpProxy:
    """Forwards 127.0.0.1:``port`` to 127.0.0.1:``target``, one thread per direction."""

    def __init__(self, port: int, target: int) -> None:
        self.port = port
        self.target = target
        self.cut_connections = 0  # connections closed by cut()
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()

    @property
    def up(self) -> bool:
        return self._listener is not None

    def start(self) -> None:
        """Listen (again) on the same port."""
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        """Stop listening (new connections are refused) and close every open connection."""
        listener, self._listener = self._listener, None
        if listener is not None:
            # shutdown() first: close() alone does not wake the thread blocked in accept().
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            conns, self._conns = self._conns, set()
        self.cut_connections += len(conns) // 2
        for conn in conns:
            close(conn)

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                close(client)
                continue
            upstream.settimeout(None)
            with self._lock:
                if self._listener is not listener:  # cut meanwhile
                    close(client)
                    close(upstream)
                    return
                self._conns |= {client, upstream}
            threading.Thread(target=self._forward, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._copy, args=(upstream, client), daemon=True).start()

    def _forward(self, client: socket.socket, upstream: socket.socket) -> None:
        """Client to server; a subclass may look at what passes."""
        self._copy(client, upstream)

    def _copy(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        self._drop(source, sink)

    def _drop(self, *conns: socket.socket) -> None:
        with self._lock:
            self._conns -= set(conns)
        for conn in conns:
            close(conn)


def close(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)
    conn.close()
