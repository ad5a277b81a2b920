"""Reads for the in-memory gallery (``streams.gallery``): the server clock, and the centroids
written since a given server time.

They run on a ``PgStore``'s connection (``PgStore.session``), so that reconnects and
``StoreUnavailable`` behave as for the batch path; they are apart from the store because only
the in-memory gallery reads by time.

``deer_centroids.updated_at`` is set to ``now()`` by every write of a centroid (creation,
batch update, replay rebuild): the *start* time of the writing transaction, not its commit
time. A row committed after a read can therefore carry a time earlier than that read; callers
look back a safety margin longer than any write transaction (see ``changed_since``).
An index on ``deer_centroids (embedding_version, updated_at)`` makes ``changed_since`` an
index range scan; without it the read scans every centroid of the version.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime

from sinks.pg import centroid_from_row
from sinks.records import DeerCentroid
from sinks.store import PgStore

log = logging.getLogger(__name__)

_CHANGED = (
    "SELECT deer_id, centroid_resnet, centroid_effnet, vectors FROM deer_centroids "
    "WHERE embedding_version = %s AND updated_at > %s ORDER BY deer_id"
)


def server_now(store: PgStore) -> datetime:
    """The database server's clock (``now()``), the only clock ``updated_at`` is compared to."""
    with store.session("server_now") as conn:
        row = conn.execute("SELECT now()").fetchone()
    assert row is not None
    return row[0]


def changed_since(
    store: PgStore, embedding_version: str, since: datetime
) -> tuple[list[DeerCentroid], datetime]:
    """Centroids of ``embedding_version`` written by transactions that started after
    ``since``, by id, and the server time taken just before the read.

    Every row committed before the returned time is in the result or older than ``since``; a
    row committed later may carry any time after its transaction's start, so the next call
    should pass the returned time minus a margin longer than the longest write transaction.
    """
    t0 = time.perf_counter()
    # One transaction: now() is its start, taken before the SELECT's snapshot (read committed
    # takes a snapshot per statement), so nothing committed before `now` is missed.
    with store.session("changed_since") as conn, conn.transaction():
        now_row = conn.execute("SELECT now()").fetchone()
        with conn.cursor(binary=True) as cur:
            rows = cur.execute(_CHANGED, (embedding_version, since)).fetchall()
    assert now_row is not None
    centroids = [centroid_from_row(r) for r in rows]
    log.debug(
        "gallery reads: changed version=%s since=%s rows=%d ms=%.1f",
        embedding_version, since.isoformat(), len(centroids), (time.perf_counter() - t0) * 1000,
    )  # fmt: skip
    return centroids, now_row[0]
