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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import psycopg
from pgvector import Vector
from pgvector.psycopg import register_vector

from sinks.records import DeerCentroid

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


class PgConnection:
    """One connection, opened by ``start()``, reopened by the first call after it was lost,
    closed by ``stop()``; owned by one thread at a time."""

    def __init__(self, dsn: str, *, connect_timeout: float = 5.0) -> None:
        self._dsn = dsn
        self._connect_timeout = connect_timeout
        self._conn: psycopg.Connection[Any] | None = None
        self._started = False

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
    def session(self, what: str) -> Iterator[psycopg.Connection[Any]]:
        """The connection for one call (``what`` names the call in errors and logs),
        connecting first when there is none. It is in autocommit mode: group statements with
        ``conn.transaction()``. A lost connection raises StoreUnavailable, and the next call
        reconnects."""
        try:
            conn = self._connection()
        except psycopg.OperationalError as err:  # e.g. register_vector on a dying server
            self._drop()
            raise StoreUnavailable(f"store: {what}: {err}") from err
        try:
            yield conn
        except psycopg.OperationalError as err:
            # Deadlocks and serialisation failures leave the connection usable (the
            # transaction was rolled back); a lost server does not.
            lost = conn.closed or conn.broken
            if lost:
                self._drop()
            log.warning("store: %s failed connection_lost=%s: %s", what, lost, err)
            raise StoreUnavailable(f"store: {what} failed: {err}") from err

    def _connection(self) -> psycopg.Connection[Any]:
        if not self._started:
            raise RuntimeError(f"{type(self).__name__}: call start() first")
        conn = self._conn
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        self._drop()
        try:
            conn = psycopg.connect(
                self._dsn,
                autocommit=True,  # transactions are explicit: conn.transaction()
                connect_timeout=max(1, math.ceil(self._connect_timeout)),
                application_name="reid-sinks",
            )
        except psycopg.OperationalError as err:
            log.warning("store: connect failed: %s", err)
            raise StoreUnavailable(f"store: cannot connect to postgres: {err}") from err
        try:
            # Timestamps come back in UTC whatever the server's default zone.
            conn.execute("SET TIME ZONE 'UTC'")
            register_vector(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        log.info("store: connected backend_pid=%d", conn.info.backend_pid)
        return conn

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # a dead connection may fail to close; it is gone either way
                log.debug("store: error closing a connection", exc_info=True)


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
