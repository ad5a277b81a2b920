"""PostgreSQL + pgvector: the truth about deer and detections; the reads and the batch write
of the live stream.

One connection per store, owned by the consumer thread (``sinks.pg.PgConnection``: start,
stop, reconnect, ``session`` for one call); the version registry (``store.registry``,
``sinks.registry``), the replay and validate history (``store.history``, ``sinks.history``)
and the gallery reads (``sinks.gallery_reads``) run on it too. Every batch is written in one
transaction that is idempotent on ``detection_id``: a redelivered detection inserts nothing,
counts no second sighting, and reads back the assignment as first stored.

Deer identities do not depend on an embedding version; vectors are stored per (detection,
version) in ``detection_vectors`` and centroids per (deer, version) in ``deer_centroids``. The
batch path (``write_batch``) reads and writes one version, the one it is given, and
``DeerCentroid.sightings`` is the running mean's count of that version. ``detections`` keeps
the vectors its assignment was made with (its ``embedding_version``) as the record of that
decision.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import psycopg

from sinks.aliases import resolve_rows
from sinks.curation import Curation
from sinks.detections import fetch_assignments, insert_detections
from sinks.history import History
from sinks.pg import NEW_DEER_LOCK_KEY, PgConnection, StoreUnavailable, centroid_from_row, floats
from sinks.records import BatchWriteResult, DeerCentroid, DetectionRow, StoredAssignment
from sinks.registry import VersionRegistry

__all__ = ["NEW_DEER_LOCK_KEY", "Merge", "NewDeerDeferred", "PgStore", "Replan", "StoreUnavailable"]

log = logging.getLogger(__name__)


class NewDeerDeferred(RuntimeError):
    """A batch may not create deer yet; nothing was written. Either its version is not the
    active one (``active`` names the one that is: the batch is to be embedded again under it),
    or a deer created moments ago under another version has no centroid of the batch's
    version yet, so the batch cannot tell whether its animal is that deer (``active`` is
    None: wait for the replay that fills it in)."""

    def __init__(self, message: str, *, active: str | None = None) -> None:
        super().__init__(message)
        self.active = active


Merge = Callable[[np.ndarray, int, np.ndarray], np.ndarray]
# Given the deer that other workers created since the caller's snapshot, the caller's plan
# made again: (new deer count, rows).
Replan = Callable[[list[DeerCentroid]], tuple[int, Sequence[DetectionRow]]]

_INSERT_DEER = """
INSERT INTO deer (id, embedding_version, sightings, first_seen, last_seen)
VALUES (%s, %s, %s, %s, %s)
"""

_INSERT_CENTROID = """
INSERT INTO deer_centroids (deer_id, embedding_version, centroid_resnet, centroid_effnet, vectors)
VALUES (%s, %s, %s, %s, %s)
"""

_LOCK_CENTROIDS = """
SELECT deer_id, centroid_resnet, centroid_effnet, vectors
FROM deer_centroids WHERE embedding_version = %s AND deer_id = ANY(%s)
ORDER BY deer_id FOR UPDATE
"""

_UPDATE_CENTROID = """
UPDATE deer_centroids SET
    centroid_resnet = %s,
    centroid_effnet = %s,
    vectors = vectors + %s,
    updated_at = now()
WHERE embedding_version = %s AND deer_id = %s
"""

_UPDATE_DEER = """
UPDATE deer SET
    sightings = sightings + %s,
    first_seen = least(first_seen, %s),
    last_seen = greatest(last_seen, %s),
    updated_at = now()
WHERE id = %s
"""


class PgStore(PgConnection):
    """Reads and writes deer centroids and detections; ``start()`` before use, ``stop()`` after.

    ``registry`` (the embedding versions), ``history`` (replay writes, validate reads) and
    ``curation`` (merge, split, move, confirm: ``sinks.curation``) share its connection.
    """

    def __init__(
        self,
        dsn: str,
        *,
        dim: int = 512,
        connect_timeout: float | None = None,
        call_timeout_s: float | None = None,
    ) -> None:
        # Timeouts left None: the process's (sinks.pg.set_default_timeouts, from settings).
        super().__init__(dsn, connect_timeout=connect_timeout, call_timeout_s=call_timeout_s)
        self.dim = dim
        self.registry = VersionRegistry(self)
        self.history = History(self, self.registry, dim=dim)
        self.curation = Curation(self)

    # -- reads ----------------------------------------------------------------------------
    def existing_assignments(self, detection_ids: Sequence[str]) -> dict[str, StoredAssignment]:
        """The stored assignments among ``detection_ids`` (absent ids are not in the result)."""
        if not detection_ids:
            return {}
        with self.session("existing_assignments") as conn:
            return fetch_assignments(conn, list(detection_ids))

    def load_centroids(
        self, embedding_version: str, deer_ids: Sequence[int] | None = None
    ) -> list[DeerCentroid]:
        """Centroids of ``deer_ids`` (None: every deer) under ``embedding_version``, by id."""
        query = (
            "SELECT deer_id, centroid_resnet, centroid_effnet, vectors FROM deer_centroids "
            "WHERE embedding_version = %s"
        )
        params: list[Any] = [embedding_version]
        if deer_ids is not None:
            if len(deer_ids) == 0:
                return []
            query += " AND deer_id = ANY(%s)"
            params.append([int(i) for i in deer_ids])
        t0 = time.perf_counter()
        with self.session("load_centroids") as conn, conn.cursor(binary=True) as cur:
            rows = cur.execute(query + " ORDER BY deer_id", params).fetchall()
        centroids = [centroid_from_row(row) for row in rows]
        log.debug(
            "store: centroids loaded version=%s requested=%s loaded=%d ms=%.1f",
            embedding_version, "all" if deer_ids is None else len(deer_ids), len(centroids),
            (time.perf_counter() - t0) * 1000,
        )  # fmt: skip
        return centroids

    def deer_count(self, embedding_version: str) -> int:
        with self.session("deer_count") as conn:
            row = conn.execute(
                "SELECT count(*) FROM deer_centroids WHERE embedding_version = %s",
                (embedding_version,),
            ).fetchone()
        return int(row[0]) if row else 0

    # -- the batch write ------------------------------------------------------------------
    def write_batch(
        self,
        embedding_version: str,
        new_deer_count: int,
        rows: Sequence[DetectionRow],
        merge: Merge,
        *,
        known_deer_ids: Sequence[int] | None = None,
        replan: Replan | None = None,
        version_gap_s: float = 0.0,
    ) -> BatchWriteResult:
        """Store a batch of assigned detections and update the deer, in one transaction.

        When the batch creates deer, creation is serialised across workers with an advisory
        lock; holding it, the deer of this version missing from ``known_deer_ids`` (created by
        others since the caller looked, or absent from its cache) are handed to ``replan``,
        whose plan is written instead, so one animal never becomes two deer.

        Deer are created only under the active version, and not while a deer created in
        the last ``version_gap_s`` seconds under another version lacks a centroid of this one:
        both raise NewDeerDeferred (a version switch must not make two deer of one animal).

        Rows whose ``detection_id`` is already stored are left as they are: they add no
        sighting and their result is the stored row. ``merge(centroid, count, vectors)`` is
        the running mean (the caller's, so that cache, matcher and store agree on it).
        Raises StoreUnavailable on connection loss (nothing committed), ValueError on rows
        that contradict themselves or name a deer that is not stored under this version.
        """
        self._validate(new_deer_count, rows)
        if not rows:
            return BatchWriteResult([], [], 0, [])
        self.registry.ensure_registered(embedding_version)
        t0 = time.perf_counter()
        with self.session("write_batch") as conn, conn.transaction():
            if new_deer_count > 0:
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (NEW_DEER_LOCK_KEY,))
                self._may_create_deer(conn, embedding_version, version_gap_s)
                if replan is not None and known_deer_ids is not None:
                    others = self._deer_unknown_to(conn, embedding_version, known_deer_ids)
                    if others:
                        new_deer_count, rows = replan(others)
                        self._validate(new_deer_count, rows)
                        log.info("store: re-planned against %d deer created elsewhere", len(others))
            else:  # shared: batches do not wait for each other, only for curation changes
                conn.execute("SELECT pg_advisory_xact_lock_shared(%s)", (NEW_DEER_LOCK_KEY,))
            # A deer merged away after the caller planned: its rows go to the survivor.
            rows = resolve_rows(conn, rows)
            new_ids = self._allocate_new_deer(conn, new_deer_count)
            inserted = insert_detections(conn, embedding_version, rows, new_ids)
            created, new_centroids = self._create_new_deer(
                conn, embedding_version, inserted, new_ids, merge
            )
            updated = self._update_known_deer(conn, embedding_version, inserted, merge)
            stored = fetch_assignments(conn, [r.detection_id for r in rows])
        missing = [r.detection_id for r in rows if r.detection_id not in stored]
        if missing:  # cannot happen while detections are never deleted; say so loudly if it does
            raise RuntimeError(f"store: rows missing after write: {missing[:5]}")
        centroids = sorted(new_centroids + updated, key=lambda c: c.deer_id)
        log.info(
            "store: batch written version=%s rows=%d inserted=%d already_stored=%d "
            "new_deer=%d updated_deer=%d ms=%.1f",
            embedding_version, len(rows), len(inserted), len(rows) - len(inserted),
            len(created), len(updated), (time.perf_counter() - t0) * 1000,
        )  # fmt: skip
        return BatchWriteResult(
            assignments=[stored[r.detection_id] for r in rows],
            centroids=centroids,
            inserted=len(inserted),
            new_deer_ids=created,
        )

    def _validate(self, new_deer_count: int, rows: Sequence[DetectionRow]) -> None:
        if new_deer_count < 0:
            raise ValueError(f"new_deer_count must be >= 0, got {new_deer_count}")
        for row in rows:
            if (row.deer_id is None) == (row.new_deer is None):
                raise ValueError(
                    f"detection {row.detection_id}: exactly one of deer_id and new_deer must be set"
                )
            if row.new_deer is not None and not 0 <= row.new_deer < new_deer_count:
                raise ValueError(
                    f"detection {row.detection_id}: new_deer={row.new_deer} outside "
                    f"0..{new_deer_count - 1}"
                )
            for name in ("embedding_resnet", "embedding_effnet"):
                vector = np.asarray(getattr(row, name))
                if vector.shape != (self.dim,) or not np.isfinite(vector).all():
                    raise ValueError(
                        f"detection {row.detection_id}: {name} must be {self.dim} finite "
                        f"floats, got shape {vector.shape}"
                    )

    @staticmethod
    def _may_create_deer(conn: psycopg.Connection[Any], version: str, gap_s: float) -> None:
        """Raise NewDeerDeferred unless a batch of ``version`` may create deer now (called
        holding the new-deer lock, which ``activate`` takes too)."""
        row = conn.execute(
            "SELECT version FROM embedding_versions WHERE state = 'active'"
        ).fetchone()
        if row is not None and row[0] != version:
            raise NewDeerDeferred(
                f"store: {version} is no longer the active embedding version ({row[0]} is); "
                "new deer wait for the switch", active=row[0],
            )  # fmt: skip
        if gap_s <= 0:
            return
        unseen = conn.execute(
            "SELECT count(*) FROM deer d WHERE d.created_at > now() - make_interval(secs => %s) "
            "AND NOT EXISTS (SELECT 1 FROM deer_centroids c "
            "WHERE c.deer_id = d.id AND c.embedding_version = %s)",
            (gap_s, version),
        ).fetchone()
        if unseen and unseen[0]:
            raise NewDeerDeferred(
                f"store: {unseen[0]} deer created in the last {gap_s:g}s under another version "
                f"have no {version} centroid yet; new deer wait for the replay to fill them in"
            )

    @staticmethod
    def _deer_unknown_to(
        conn: psycopg.Connection[Any], version: str, known: Sequence[int]
    ) -> list[DeerCentroid]:
        # An anti-join against the unnested ids (a hash join), not `<> ALL(array)`, which
        # compares every row with every known id.
        rows = conn.execute(
            "SELECT c.deer_id, c.centroid_resnet, c.centroid_effnet, c.vectors "
            "FROM deer_centroids c WHERE c.embedding_version = %s AND NOT EXISTS "
            "(SELECT 1 FROM unnest(%s::bigint[]) AS k(id) WHERE k.id = c.deer_id) "
            "ORDER BY c.deer_id",
            (version, [int(i) for i in known]),
        ).fetchall()
        return [centroid_from_row(row) for row in rows]

    @staticmethod
    def _allocate_new_deer(conn: psycopg.Connection[Any], count: int) -> list[int]:
        if count == 0:
            return []
        rows = conn.execute(
            "SELECT nextval('deer_id_seq') FROM generate_series(1, %s)", (count,)
        ).fetchall()
        return [int(r[0]) for r in rows]

    def _create_new_deer(
        self,
        conn: psycopg.Connection[Any],
        version: str,
        inserted: list[DetectionRow],
        new_ids: list[int],
        merge: Merge,
    ) -> tuple[list[int], list[DeerCentroid]]:
        groups: dict[int, list[DetectionRow]] = defaultdict(list)
        for row in inserted:
            if row.new_deer is not None:
                groups[row.new_deer].append(row)
        if not groups:
            return [], []
        zeros = np.zeros(self.dim, dtype=np.float32)
        centroids, params = [], []
        for index in sorted(groups):
            members = groups[index]
            deer_id = new_ids[index]
            resnet = self._merge(merge, zeros, 0, [r.embedding_resnet for r in members])
            effnet = self._merge(merge, zeros, 0, [r.embedding_effnet for r in members])
            captured = [r.captured_at for r in members]
            params.append((deer_id, version, len(members), min(captured), max(captured)))
            centroids.append(DeerCentroid(deer_id, resnet, effnet, len(members)))
        with conn.cursor() as cur:
            cur.executemany(_INSERT_DEER, params)
            cur.executemany(
                _INSERT_CENTROID,
                [(c.deer_id, version, c.resnet, c.effnet, c.sightings) for c in centroids],
            )
        return [c.deer_id for c in centroids], centroids

    def _update_known_deer(
        self,
        conn: psycopg.Connection[Any],
        version: str,
        inserted: list[DetectionRow],
        merge: Merge,
    ) -> list[DeerCentroid]:
        groups: dict[int, list[DetectionRow]] = defaultdict(list)
        for row in inserted:
            if row.deer_id is not None:
                groups[int(row.deer_id)].append(row)
        if not groups:
            return []
        # Locked in id order, so concurrent batches touching the same deer queue up instead
        # of deadlocking, and each merges into the centroid the other committed.
        with conn.cursor(binary=True) as cur:
            locked = cur.execute(_LOCK_CENTROIDS, (version, sorted(groups))).fetchall()
        current = {int(i): (r, e, int(n)) for i, r, e, n in locked}
        wrong = sorted(i for i in groups if i not in current)
        if wrong:
            raise ValueError(f"store: deer {wrong[:10]} are not stored under version {version}")
        centroids, params, deer_params = [], [], []
        for deer_id in sorted(groups):
            members = groups[deer_id]
            old_resnet, old_effnet, sightings = current[deer_id]
            resnet = self._merge(
                merge, floats(old_resnet), sightings, [r.embedding_resnet for r in members]
            )
            effnet = self._merge(
                merge, floats(old_effnet), sightings, [r.embedding_effnet for r in members]
            )
            captured = [r.captured_at for r in members]
            params.append((resnet, effnet, len(members), version, deer_id))
            deer_params.append((len(members), min(captured), max(captured), deer_id))
            centroids.append(DeerCentroid(deer_id, resnet, effnet, sightings + len(members)))
        with conn.cursor() as cur:
            cur.executemany(_UPDATE_CENTROID, params)
            cur.executemany(_UPDATE_DEER, deer_params)
        return centroids

    def _merge(
        self, merge: Merge, centroid: np.ndarray, count: int, vectors: list[np.ndarray]
    ) -> np.ndarray:
        stacked = np.stack([np.asarray(v, dtype=np.float32) for v in vectors])
        # float32 is what pgvector stores: the cache then holds exactly the committed values.
        out = np.asarray(merge(centroid, count, stacked), dtype=np.float32).reshape(-1)
        if out.shape != (self.dim,) or not np.isfinite(out).all():
            raise ValueError(f"merge returned shape {out.shape} or non-finite values")
        return out
