"""The Postgres connection that the store's modules share, and the decoding of pgvector rows.

``PgStore`` (``sinks.store``) is a ``PgConnection``; its version registry
(``sinks.registry``), its replay and validate history (``sinks.history``) and the gallery
reads (``sinks.gallery_reads``) run on the same connection through ``session``, so that a
reconnect, and a lost connection reported as ``StoreUnavailable``, behave the same for every
call. Kept apart from the store so that the registry and the history, which the store builds,
can name the connection without importing the store.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
from pgvector import Vector
from pgvector.psycopg import register_vector

from sinks.records import DeerCentroid
from sinks.redaction import add_url_secrets, redact
from sinks.watchdog import WATCHDOG, shutdown_socket

log = logging.getLogger(__name__)

# Serialises the creation of new deer across workers (same key everywhere, distinct from the
# migration lock). New deer are rare, so the contention costs little. Curation changes
# (sinks.curation) hold it exclusively too, and every other batch write (and replay write)
# holds it shared: a merge or split never interleaves with a write.
NEW_DEER_LOCK_KEY = 0x4445_4552_0000_0002


class StoreUnavailable(RuntimeError):
    """The database could not be reached or the connection was lost; back off and retry.

    Nothing of the failed call was committed. The next call reconnects.
    """


@dataclass(frozen=True)
class PgTimeouts:
    """What bounds each connection's calls (REID_PG_* settings, docs/operations.md).

    ``statement_ms`` and ``idle_in_transaction_ms`` are set on the server side of every
    connection (0 = none); ``call_s`` is the client-side deadline of one ``session`` (0 =
    none): a hung server (it still ACKs TCP, so keepalives and server timeouts cannot fire)
    gets its socket shut down by the watchdog after that long. It must exceed ``statement_ms``
    so that the server's own timeout answers first whenever the server runs at all.
    """

    connect_s: float = 5.0
    statement_ms: int = 30_000
    idle_in_transaction_ms: int = 60_000
    call_s: float = 60.0
    keepalives_idle_s: int = 10
    keepalives_interval_s: int = 5
    keepalives_count: int = 3

    def connect_kwargs(self) -> dict[str, Any]:
        """psycopg.connect() arguments: connect timeout and TCP keepalives (a peer that
        vanished, a cut network); the statement timeouts are SET after connecting, so that
        ``options`` in the DSN are kept."""
        return {
            "connect_timeout": max(1, math.ceil(self.connect_s)),
            "keepalives": 1,
            "keepalives_idle": self.keepalives_idle_s,
            "keepalives_interval": self.keepalives_interval_s,
            "keepalives_count": self.keepalives_count,
        }

    def session_sql(self) -> str:
        return (
            f"SET statement_timeout = {int(self.statement_ms)}; "
            f"SET idle_in_transaction_session_timeout = {int(self.idle_in_transaction_ms)}"
        )


# The process's defaults; the stream sets them from its settings (set_default_timeouts) and
# every connection made afterwards without its own uses them.
_DEFAULT_TIMEOUTS = [PgTimeouts()]


def set_default_timeouts(timeouts: PgTimeouts) -> None:
    _DEFAULT_TIMEOUTS[0] = timeouts


def default_timeouts() -> PgTimeouts:
    return _DEFAULT_TIMEOUTS[0]


def pg_connect(
    dsn: str, *, timeouts: PgTimeouts | None = None, **kwargs: Any
) -> psycopg.Connection[Any]:
    """``psycopg.connect`` with the connect timeout, keepalives and server-side timeouts of
    ``timeouts`` (default: the process's); for the connections outside ``PgConnection``
    (migrations, scratch databases). ``kwargs`` win over the timeouts' arguments."""
    t = timeouts or default_timeouts()
    add_url_secrets(dsn)
    conn = psycopg.connect(dsn, **{**t.connect_kwargs(), **kwargs})
    try:
        conn.execute(t.session_sql())  # type: ignore[arg-type]  # no parameters: two statements
        if not conn.autocommit:
            conn.commit()
    except BaseException:
        conn.close()
        raise
    return conn


class PgConnection:
    """One connection, opened by ``start()``, reopened by the first call after it was lost,
    closed by ``stop()``; owned by one thread at a time.

    Every call runs under ``timeouts`` (default: the process's, ``set_default_timeouts``):
    connect timeout, keepalives, server-side statement and idle-in-transaction timeouts, and
    the client-side deadline of ``session`` (``call_timeout_s`` overrides it per connection,
    ``session(..., timeout_s=)`` per call).
    """

    def __init__(
        self,
        dsn: str,
        *,
        connect_timeout: float | None = None,
        timeouts: PgTimeouts | None = None,
        call_timeout_s: float | None = None,
    ) -> None:
        self._dsn = dsn
        add_url_secrets(dsn)  # a driver may echo the DSN in an error: never log its password
        self._timeouts = timeouts
        self._connect_timeout = connect_timeout
        self._call_timeout_s = call_timeout_s
        self._conn: psycopg.Connection[Any] | None = None
        self._close_lock = threading.Lock()
        self._started = False

    @property
    def timeouts(self) -> PgTimeouts:
        t = self._timeouts or default_timeouts()
        if self._connect_timeout is not None:
            t = PgTimeouts(**{**t.__dict__, "connect_s": self._connect_timeout})
        return t

    @property
    def call_timeout_s(self) -> float:
        return self._call_timeout_s if self._call_timeout_s is not None else self.timeouts.call_s

    def start(self) -> None:
        """Open the connection; raises StoreUnavailable when the database cannot be reached."""
        self._started = True
        self._connection()

    def stop(self) -> None:
        self._started = False
        self._drop()

    def ping(self) -> None:
        with self.session("ping") as conn:
            conn.execute("SELECT 1")

    @contextmanager
    def session(
        self, what: str, *, timeout_s: float | None = None, unbounded: bool = False
    ) -> Iterator[psycopg.Connection[Any]]:
        """The connection for one call (``what`` names the call in errors and logs),
        connecting first when there is none. It is in autocommit mode: group statements with
        ``conn.transaction()``. A lost connection raises StoreUnavailable, and the next call
        reconnects.

        The call (connecting included) must end within ``timeout_s`` (default: the
        connection's call timeout; 0 = no deadline), else the watchdog shuts the socket down
        and it fails with StoreUnavailable. ``unbounded`` is for work that is long by nature
        (an HNSW index build): no deadline, and no server statement timeout for the call.
        """
        deadline = 0.0 if unbounded else (self.call_timeout_s if timeout_s is None else timeout_s)
        fired: list[float] = []
        token = WATCHDOG.arm(deadline, lambda: self._abort(what, deadline, fired)) if (
            deadline > 0) else None  # fmt: skip
        try:
            with self._guarded(what, fired, deadline) as conn:
                if unbounded and self.timeouts.statement_ms:
                    conn.execute("SET statement_timeout = 0")
                try:
                    yield conn
                finally:
                    if (
                        unbounded
                        and self.timeouts.statement_ms
                        and not (conn.closed or conn.broken)
                    ):
                        conn.execute(f"SET statement_timeout = {int(self.timeouts.statement_ms)}")
        finally:
            if token is not None and not WATCHDOG.disarm(token):
                # Fired while the call was ending anyway: the socket is shut; start afresh.
                self._drop()

    @contextmanager
    def _guarded(
        self, what: str, fired: list[float], deadline: float
    ) -> Iterator[psycopg.Connection[Any]]:
        try:
            conn = self._connection()
        except psycopg.OperationalError as err:  # e.g. register_vector on a dying server
            self._drop()
            raise StoreUnavailable(redact(f"store: {what}: {_why(err, fired)}")) from err
        try:
            yield conn
        except psycopg.Error as err:
            if not (isinstance(err, psycopg.OperationalError) or fired):
                raise  # a bad statement: the caller's bug or data, not an outage
            # Deadlocks and serialisation failures leave the connection usable (the
            # transaction was rolled back); a lost server does not.
            lost = conn.closed or conn.broken or bool(fired)
            if lost:
                self._drop()
            reason = _why(err, fired)
            log.warning("store: %s failed connection_lost=%s: %s", what, lost, redact(reason))
            raise StoreUnavailable(redact(f"store: {what} failed: {reason}")) from err

    def _abort(self, what: str, deadline: float, fired: list[float]) -> None:
        """Watchdog: the call ``what`` passed its deadline; wake it by shutting the socket."""
        fired.append(deadline)
        log.warning("store: %s got no answer within %.1fs; aborting the connection", what,
                    deadline)  # fmt: skip
        # Under the lock that _drop closes with: the descriptor cannot be closed (and its
        # number reused by another socket) between reading it and shutting it down.
        with self._close_lock:
            conn = self._conn
            try:
                fd = conn.pgconn.socket if conn is not None and not conn.closed else -1
            except psycopg.Error:
                fd = -1
            if fd >= 0:
                shutdown_socket(fd)

    def _connection(self) -> psycopg.Connection[Any]:
        if not self._started:
            raise RuntimeError(f"{type(self).__name__}: call start() first")
        conn = self._conn
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        self._drop()
        timeouts = self.timeouts
        try:
            conn = psycopg.connect(
                self._dsn,
                autocommit=True,  # transactions are explicit: conn.transaction()
                application_name="reid-sinks",
                **timeouts.connect_kwargs(),
            )
        except psycopg.Error as err:  # a malformed DSN is a ProgrammingError
            # Debug only: the caller reports the StoreUnavailable (one line per attempt).
            log.debug("store: connect failed: %s", redact(str(err)))
            raise StoreUnavailable(redact(f"store: cannot connect to postgres: {err}")) from err
        self._conn = conn  # visible to the watchdog while the set-up below runs
        try:
            # Timestamps come back in UTC whatever the server's default zone; the server
            # bounds each statement and each idle transaction (a client that died in one).
            conn.execute(f"SET TIME ZONE 'UTC'; {timeouts.session_sql()}")  # type: ignore[arg-type]
            register_vector(conn)
        except BaseException:
            self._drop()
            raise
        log.info("store: connected backend_pid=%d", conn.info.backend_pid)
        return conn

    def _drop(self) -> None:
        with self._close_lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                try:
                    conn.close()
                except Exception:  # a dead connection may fail to close; it is gone anyway
                    log.debug("store: error closing a connection", exc_info=True)


def _why(err: BaseException, fired: list[float]) -> str:
    if fired:
        return f"no answer within {fired[0]:.1f}s (connection aborted): {err}"
    return str(err)


def floats(vector: Any) -> np.ndarray:
    """A pgvector value (or any sequence of numbers) as float32."""
    if isinstance(vector, Vector):
        return np.array(vector.to_numpy(), dtype=np.float32)
    return np.asarray(vector, dtype=np.float32)


def centroid_from_row(row: Sequence[Any]) -> DeerCentroid:
    """A row (deer_id, centroid_resnet, centroid_effnet, vectors) of ``deer_centroids``."""
    deer_id, resnet, effnet, sightings = row
    return DeerCentroid(int(deer_id), floats(resnet), floats(effnet), int(sightings))


def opt_bytes(value: Any) -> bytes | None:
    return None if value is None else bytes(value)


def describe_dsn(dsn: str) -> str:
    """``user@host:port/dbname`` of a DSN for messages: never its password."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        info = conninfo_to_dict(dsn)
    except psycopg.Error:
        return "(REID_DATABASE_URL does not parse as a PostgreSQL DSN)"
    host = str(info.get("host") or "localhost")
    user = f"{info['user']}@" if info.get("user") else ""
    return f"{user}{host}:{info.get('port') or 5432}/{info.get('dbname') or ''}"
