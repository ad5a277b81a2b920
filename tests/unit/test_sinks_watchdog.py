"""The watchdog that wakes calls blocked on a server that hangs, and its use by PgConnection."""

from __future__ import annotations

import socket
import threading
import time
from types import SimpleNamespace

import psycopg
import pytest

from sinks.pg import PgConnection, PgTimeouts, StoreUnavailable
from sinks.watchdog import Watchdog, shutdown_socket


def test_a_deadline_fires_once_and_a_disarmed_one_never():
    dog = Watchdog("test-watchdog")
    fired: list[str] = []
    late = dog.arm(0.2, lambda: fired.append("late"))
    early = dog.arm(5.0, lambda: fired.append("early"))
    kept = dog.arm(0.1, lambda: fired.append("disarmed"))
    assert dog.disarm(kept)
    time.sleep(0.5)
    assert fired == ["late"]
    assert not dog.disarm(late), "a fired deadline cannot be disarmed"
    assert dog.disarm(early)
    assert dog.armed == 0


def test_a_failing_callback_does_not_stop_the_watchdog():
    dog = Watchdog("test-watchdog")
    fired = threading.Event()
    dog.arm(0.05, lambda: 1 / 0)
    dog.arm(0.1, fired.set)
    assert fired.wait(2.0)


def test_shutdown_wakes_a_blocked_reader():
    ours, theirs = socket.socketpair()
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(ours.recv(10)))
    reader.start()
    time.sleep(0.1)
    assert reader.is_alive(), "the peer sends nothing: recv blocks"
    shutdown_socket(ours.fileno())
    reader.join(2.0)
    assert not reader.is_alive() and got == [b""]
    ours.close()
    theirs.close()
    shutdown_socket(12345678)  # a descriptor that is gone: nothing to do, no error


class _HungConnection:
    """Looks like a psycopg connection whose server never answers: a call blocks reading a
    socket that nothing writes to, and fails like psycopg when the socket is shut."""

    def __init__(self) -> None:
        self.sock, self.peer = socket.socketpair()
        self.pgconn = SimpleNamespace(socket=self.sock.fileno())
        self.closed = False
        self.broken = False

    def call(self) -> None:
        if self.sock.recv(10) == b"":
            self.broken = True
            raise psycopg.OperationalError("server closed the connection unexpectedly")

    def close(self) -> None:
        self.closed = True
        self.sock.close()
        self.peer.close()


def _store_on(conn: _HungConnection, call_s: float) -> PgConnection:
    store = PgConnection("postgresql://u@127.0.0.1:1/db", timeouts=PgTimeouts(call_s=call_s))
    store._started = True
    store._conn = conn  # type: ignore[assignment]
    return store


def test_a_stuck_call_fails_as_unavailable_within_its_deadline_and_reconnects_next():
    conn = _HungConnection()
    store = _store_on(conn, call_s=0.3)
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable, match=r"no answer within 0\.3s"), store.session("write"):
        conn.call()
    assert time.monotonic() - t0 < 2.0
    assert conn.closed and store._conn is None, "the next call must reconnect"


def test_per_call_deadline_overrides_and_a_quick_call_is_untouched():
    conn = _HungConnection()
    store = _store_on(conn, call_s=0.1)
    with store.session("quick", timeout_s=5.0):
        conn.peer.send(b"x")
        conn.call()  # answered in time
    time.sleep(0.3)  # past the connection's own deadline: nothing fires afterwards
    assert not conn.closed and store._conn is conn
    with pytest.raises(StoreUnavailable), store.session("slow", timeout_s=0.2):
        conn.call()


def test_unbounded_calls_have_no_deadline():
    conn = _HungConnection()
    store = _store_on(conn, call_s=0.1)
    store._timeouts = PgTimeouts(call_s=0.1, statement_ms=0)  # no SET around the call
    threading.Timer(0.4, lambda: conn.peer.send(b"x")).start()
    with store.session("index build", unbounded=True):
        conn.call()  # answered after 0.4 s, past the connection's 0.1 s
    assert not conn.closed


def test_timeouts_reach_the_connection_arguments():
    t = PgTimeouts(connect_s=2.5, statement_ms=1500, idle_in_transaction_ms=0)
    kwargs = t.connect_kwargs()
    assert kwargs["connect_timeout"] == 3 and kwargs["keepalives"] == 1
    assert kwargs["keepalives_idle"] > 0 and kwargs["keepalives_count"] > 0
    assert "statement_timeout = 1500" in t.session_sql()
    assert "idle_in_transaction_session_timeout = 0" in t.session_sql()
