"""Deadlines for blocking calls that no timeout of their own can bound.

A PostgreSQL server that hangs (SIGSTOP, a stuck disk, a frozen VM) still has its kernel
acknowledge every TCP segment: TCP keepalives and ``tcp_user_timeout`` see a healthy peer,
and the server-side ``statement_timeout`` never fires because the server does not run. A
call blocked on such a server waits forever. :class:`Watchdog` runs one thread for the whole
process: a caller arms a deadline before the call and disarms it after; when a deadline
passes first, its callback runs (``sinks.pg`` shuts the connection's socket down, so the
blocked call fails at once with a connection error and the next call reconnects).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class Watchdog:
    """Deadlines armed by any thread, fired by one daemon thread started on first use."""

    def __init__(self, name: str = "watchdog") -> None:
        self._name = name
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int]] = []
        self._armed: dict[int, Callable[[], None]] = {}
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None

    def arm(self, timeout_s: float, on_expiry: Callable[[], None]) -> int:
        """Run ``on_expiry`` (in the watchdog's thread) unless :meth:`disarm` comes within
        ``timeout_s``; returns the token to disarm with."""
        token = next(self._ids)
        with self._cond:
            self._armed[token] = on_expiry
            heapq.heappush(self._heap, (time.monotonic() + timeout_s, token))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify()
        return token

    def disarm(self, token: int) -> bool:
        """Cancel a deadline; False when it had fired already (or was never armed)."""
        with self._cond:
            return self._armed.pop(token, None) is not None

    @property
    def armed(self) -> int:
        with self._cond:
            return len(self._armed)

    def _run(self) -> None:
        while True:
            due: list[Callable[[], None]] = []
            with self._cond:
                while not due:
                    # Disarmed deadlines are dropped lazily, when they reach the top.
                    while self._heap and self._heap[0][1] not in self._armed:
                        heapq.heappop(self._heap)
                    now = time.monotonic()
                    while self._heap and self._heap[0][0] <= now:
                        _, token = heapq.heappop(self._heap)
                        callback = self._armed.pop(token, None)
                        if callback is not None:
                            due.append(callback)
                    if due:
                        break
                    self._cond.wait(self._heap[0][0] - now if self._heap else None)
            for callback in due:
                try:
                    callback()
                except Exception:  # one failing callback must not stop the others
                    log.exception("watchdog: a deadline callback failed")


def shutdown_socket(fd: int) -> None:
    """Shut a connected socket down for both directions through a duplicate of ``fd``: a
    thread blocked reading it wakes up with end-of-file. The descriptor itself is left
    open for its owner to close (closing it under a blocked call could reuse the number)."""
    try:
        dup = os.dup(fd)
    except OSError as err:
        log.debug("watchdog: fd %d is gone: %s", fd, err)
        return
    try:
        sock = socket.socket(fileno=dup)
    except OSError as err:
        os.close(dup)
        log.debug("watchdog: fd %d is not a socket: %s", fd, err)
        return
    with sock:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError as err:  # not connected any more: nothing is blocked on it
            log.debug("watchdog: shutdown of fd %d: %s", fd, err)


# The process's one watchdog (one thread, however many connections).
WATCHDOG = Watchdog()
