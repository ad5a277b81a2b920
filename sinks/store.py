"""PostgreSQL + pgvector: the truth about deer and detections.

One connection per store, owned by the consumer thread. Every batch is written in one
transaction that is idempotent on ``detection_id``: a redelivered detection inserts nothing,
counts no second sighting, and reads back the assignment as first stored.

Embedding versions (migration 0002, ``sinks.versions``): deer identities do not depend on a
version; vectors are stored per (detection, version) in ``detection_vectors`` and centroids
per (deer, version) in ``deer_centroids``. The live path (``write_batch``) reads and writes
one version, the one it is given. ``detections`` keeps the vectors its assignment was made
with (its ``embedding_version``) as the record of that decision. A replay adds another
version's vectors (``store_replayed``) and rebuilds that version's centroids from them as
exact re-normalised means; ``DeerCentroid.sightings`` is the number of vectors of that version
merged into the centroid (the running mean's count), which equals the deer's sightings once
every detection has a vector of the version.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import psycopg
from pgvector import Vector
from pgvector.psycopg import register_vector

from sinks.records import BatchWriteResult, DeerCentroid, DetectionRow, StoredAssignment
from sinks.versions import (
    STATES,
    VERSION_COLUMNS,
    VersionInfo,
    VersionSpec,
    create_index_statements,
    drop_index_statements,
    index_names,
)

log = logging.getLogger(__name__)

# Serialises the creation of new deer across workers (same key everywhere, distinct from the
# migration lock). New deer are rare, so the contention costs little.
NEW_DEER_LOCK_KEY = 0x4445_4552_0000_0002
# Serialises changes of the version registry (registration with its index DDL, activation,
# dropping), also across processes.
VERSIONS_LOCK_KEY = 0x4445_4552_0000_0003

Merge = Callable[[np.ndarray, int, np.ndarray], np.ndarray]
# Given the deer that other workers created since the caller's snapshot, the caller's plan
# made again: (new deer count, rows).
Replan = Callable[[list[DeerCentroid]], tuple[int, Sequence[DetectionRow]]]

_ASSIGNMENT_COLUMNS = (
    "detection_id, deer_id, is_new_deer, similarity, score_resnet, score_effnet, "
    "embedding_version, camera_id, captured_at, processed_at, content_sha256"
)

_INSERT_DETECTION = """
INSERT INTO detections (
    detection_id, camera_id, captured_at, deer_id, is_new_deer, similarity, score_resnet,
    score_effnet, embedding_version, embedding_resnet, embedding_effnet, bbox, confidence,
    species, source_topic, source_partition, source_offset, processed_at, content_sha256
) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (detection_id) DO NOTHING
RETURNING detection_id
"""

_INSERT_VECTORS = """
INSERT INTO detection_vectors (detection_id, embedding_version, embedding_resnet, embedding_effnet)
VALUES (%s, %s, %s, %s)
ON CONFLICT (embedding_version, detection_id) DO NOTHING
"""

_UPSERT_VECTORS = """
INSERT INTO detection_vectors (detection_id, embedding_version, embedding_resnet, embedding_effnet)
VALUES (%s, %s, %s, %s)
ON CONFLICT (embedding_version, detection_id) DO UPDATE SET
    embedding_resnet = EXCLUDED.embedding_resnet,
    embedding_effnet = EXCLUDED.embedding_effnet,
    created_at = now()
"""

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

# A known version keeps its row; details given now (weights, seed, size) replace older ones.
_REGISTER_VERSION = """
INSERT INTO embedding_versions AS v (version, weights_path, weights_sha256, seed, input_size)
VALUES (%s, %s, %s, %s, %s)
ON CONFLICT (version) DO UPDATE SET
    weights_path = coalesce(EXCLUDED.weights_path, v.weights_path),
    weights_sha256 = coalesce(EXCLUDED.weights_sha256, v.weights_sha256),
    seed = coalesce(EXCLUDED.seed, v.seed),
    input_size = coalesce(EXCLUDED.input_size, v.input_size),
    updated_at = now()
"""

# The centroids of the given deer rebuilt from every vector of the version: the re-normalised
# mean (pgvector's avg accumulates in double precision).
_REBUILD_CENTROIDS = """
INSERT INTO deer_centroids AS c (
    deer_id, embedding_version, centroid_resnet, centroid_effnet, vectors, updated_at
)
SELECT d.deer_id, %(version)s, l2_normalize(avg(x.embedding_resnet)),
       l2_normalize(avg(x.embedding_effnet)), count(*), now()
FROM detection_vectors x JOIN detections d ON d.detection_id = x.detection_id
WHERE x.embedding_version = %(version)s AND d.deer_id = ANY(%(deer)s)
GROUP BY d.deer_id
ON CONFLICT (embedding_version, deer_id) DO UPDATE SET
    centroid_resnet = EXCLUDED.centroid_resnet,
    centroid_effnet = EXCLUDED.centroid_effnet,
    vectors = EXCLUDED.vectors,
    updated_at = now()
RETURNING c.deer_id, c.centroid_resnet, c.centroid_effnet, c.vectors
"""


class StoreUnavailable(RuntimeError):
    """The database could not be reached or the connection was lost; back off and retry.

    Nothing of the failed call was committed. The next call reconnects.
    """


def _floats(vector: Any) -> np.ndarray:
    if isinstance(vector, Vector):
        return np.array(vector.to_numpy(), dtype=np.float32)
    return np.asarray(vector, dtype=np.float32)


def _opt_float(value: float | None) -> float | None:
    # numpy scalars would otherwise reach the driver as types it may not adapt.
    return None if value is None else float(value)


class PgStore:
    """Reads and writes deer centroids and detections; ``start()`` before use, ``stop()`` after."""

    def __init__(self, dsn: str, *, dim: int = 512, connect_timeout: float = 5.0) -> None:
        self._dsn = dsn
        self.dim = dim
        self._connect_timeout = connect_timeout
        self._conn: psycopg.Connection[Any] | None = None
        self._started = False
        self._registered: set[str] = set()  # versions known to be in the registry

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Open the connection; raises StoreUnavailable when the database cannot be reached."""
        self._started = True
        self._connection()

    def stop(self) -> None:
        self._started = False
        self._drop()

    def ping(self) -> None:
        with self._session("ping") as conn:
            conn.execute("SELECT 1")

    # -- reads ----------------------------------------------------------------------------
    def existing_assignments(self, detection_ids: Sequence[str]) -> dict[str, StoredAssignment]:
        """The stored assignments among ``detection_ids`` (absent ids are not in the result)."""
        if not detection_ids:
            return {}
        with self._session("existing_assignments") as conn:
            return self._fetch_assignments(conn, list(detection_ids))

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
        with self._session("load_centroids") as conn, conn.cursor(binary=True) as cur:
            rows = cur.execute(query + " ORDER BY deer_id", params).fetchall()
        centroids = [_centroid(row) for row in rows]
        log.debug(
            "store: centroids loaded version=%s requested=%s loaded=%d ms=%.1f",
            embedding_version, "all" if deer_ids is None else len(deer_ids), len(centroids),
            (time.perf_counter() - t0) * 1000,
        )  # fmt: skip
        return centroids

    def deer_count(self, embedding_version: str) -> int:
        with self._session("deer_count") as conn:
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
    ) -> BatchWriteResult:
        """Store a batch of assigned detections and update the deer, in one transaction.

        When the batch creates deer, creation is serialised across workers with an advisory
        lock; holding it, the deer of this version missing from ``known_deer_ids`` (created by
        others since the caller looked, or absent from its cache) are handed to ``replan``,
        whose plan is written instead, so one animal never becomes two deer.

        Rows whose ``detection_id`` is already stored are left as they are: they add no
        sighting and their result is the stored row. ``merge(centroid, count, vectors)`` is
        the running mean (the caller's, so that cache, matcher and store agree on it).
        Raises StoreUnavailable on connection loss (nothing committed), ValueError on rows
        that contradict themselves or name a deer that is not stored under this version.
        """
        self._validate(new_deer_count, rows)
        if not rows:
            return BatchWriteResult([], [], 0, [])
        if embedding_version not in self._registered:
            self.register_version(VersionSpec(embedding_version))
        t0 = time.perf_counter()
        with self._session("write_batch") as conn, conn.transaction():
            if new_deer_count > 0:
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (NEW_DEER_LOCK_KEY,))
                if replan is not None and known_deer_ids is not None:
                    others = self._deer_unknown_to(conn, embedding_version, known_deer_ids)
                    if others:
                        new_deer_count, rows = replan(others)
                        self._validate(new_deer_count, rows)
                        log.info("store: re-planned against %d deer created elsewhere", len(others))
            new_ids = self._allocate_new_deer(conn, new_deer_count)
            inserted = self._insert_detections(conn, embedding_version, rows, new_ids)
            created, new_centroids = self._create_new_deer(
                conn, embedding_version, inserted, new_ids, merge
            )
            updated = self._update_known_deer(conn, embedding_version, inserted, merge)
            stored = self._fetch_assignments(conn, [r.detection_id for r in rows])
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
        return [_centroid(row) for row in rows]

    @staticmethod
    def _allocate_new_deer(conn: psycopg.Connection[Any], count: int) -> list[int]:
        if count == 0:
            return []
        rows = conn.execute(
            "SELECT nextval('deer_id_seq') FROM generate_series(1, %s)", (count,)
        ).fetchall()
        return [int(r[0]) for r in rows]

    def _insert_detections(
        self,
        conn: psycopg.Connection[Any],
        version: str,
        rows: Sequence[DetectionRow],
        new_ids: list[int],
    ) -> list[DetectionRow]:
        """Insert what is not stored yet; returns the inserted rows, in input order."""
        # A fixed order (by detection_id) keeps two workers inserting overlapping batches
        # during a rebalance from waiting on each other in a cycle.
        order = sorted(range(len(rows)), key=lambda i: rows[i].detection_id)
        params = [self._detection_params(rows[i], version, new_ids) for i in order]
        taken: list[int] = []
        with conn.cursor() as cur:
            cur.executemany(_INSERT_DETECTION, params, returning=True)
            # One result per parameter set, in order; empty where the row already existed
            # (including a repeat of a detection_id earlier in the same batch).
            for i in order:
                if cur.fetchone() is not None:
                    taken.append(i)
                cur.nextset()
            # The same vectors under the version, where every version's vectors are read.
            kept = set(taken)
            vectors = [
                (rows[i].detection_id, version, params[k][9], params[k][10])
                for k, i in enumerate(order)
                if i in kept
            ]
            if vectors:
                cur.executemany(_INSERT_VECTORS, vectors)
        return [rows[i] for i in sorted(taken)]

    def _detection_params(
        self, row: DetectionRow, version: str, new_ids: list[int]
    ) -> tuple[Any, ...]:
        deer_id = row.deer_id if row.deer_id is not None else new_ids[row.new_deer]  # type: ignore[index]
        return (
            row.detection_id,
            row.camera_id,
            row.captured_at,
            int(deer_id),
            bool(row.is_new_deer),
            _opt_float(row.similarity),
            _opt_float(row.score_resnet),
            _opt_float(row.score_effnet),
            version,
            np.asarray(row.embedding_resnet, dtype=np.float32),
            np.asarray(row.embedding_effnet, dtype=np.float32),
            None if row.bbox is None else [float(v) for v in row.bbox],
            _opt_float(row.confidence),
            row.species,
            row.source_topic,
            int(row.source_partition),
            int(row.source_offset),
            row.processed_at,
            row.content_sha256,
        )

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
                merge, _floats(old_resnet), sightings, [r.embedding_resnet for r in members]
            )
            effnet = self._merge(
                merge, _floats(old_effnet), sightings, [r.embedding_effnet for r in members]
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

    @staticmethod
    def _fetch_assignments(
        conn: psycopg.Connection[Any], detection_ids: list[str]
    ) -> dict[str, StoredAssignment]:
        rows = conn.execute(
            f"SELECT {_ASSIGNMENT_COLUMNS} FROM detections WHERE detection_id = ANY(%s)",
            (detection_ids,),
        ).fetchall()
        return {
            row[0]: StoredAssignment(*row[:-1], content_sha256=_opt_bytes(row[-1])) for row in rows
        }

    # -- embedding versions (sinks.versions) ----------------------------------------------
    def register_version(self, spec: VersionSpec, *, activate_if_none: bool = False) -> VersionInfo:
        """Add ``spec.version`` to the registry (a known version keeps its row; details given
        now replace older ones) and create its HNSW indexes; with ``activate_if_none`` it
        becomes the active version when there is none. Returns the stored row."""
        with self._session("register_version") as conn:
            known = self._version(conn, spec.version)
        details = (spec.weights_path, spec.weights_sha256, spec.seed, spec.input_size)
        if known is not None and not activate_if_none and all(d is None for d in details):
            # The write path's check: one indexed read, no locks, no DDL.
            self._registered.add(spec.version)
            return known
        with self._session("register_version") as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (VERSIONS_LOCK_KEY,))
            conn.execute(
                _REGISTER_VERSION,
                (spec.version, spec.weights_path, spec.weights_sha256, spec.seed, spec.input_size),
            )
            if activate_if_none:
                conn.execute(
                    "UPDATE embedding_versions SET state = 'active', activated_at = now(), "
                    "updated_at = now() WHERE version = %s AND NOT EXISTS "
                    "(SELECT 1 FROM embedding_versions WHERE state = 'active')",
                    (spec.version,),
                )
            info = self._version(conn, spec.version)
        self.ensure_indexes(spec.version)
        self._registered.add(spec.version)
        assert info is not None
        return info

    def ensure_indexes(self, version: str) -> None:
        """Create the version's partial HNSW indexes that are missing.

        Each index is built in a transaction of its own, holding no other lock: a build
        waits for the writers of its table and never holds one table while waiting for
        another (which deadlocked against concurrent batch writes). A session advisory lock
        keeps two processes from building the same index at once.
        """
        with self._session("ensure_indexes") as conn:
            present = {
                r[0]
                for r in conn.execute(
                    "SELECT relname FROM pg_class WHERE relkind = 'i' AND relname = ANY(%s)",
                    (index_names(version),),
                ).fetchall()
            }
            if present == set(index_names(version)):
                return
            conn.execute("SELECT pg_advisory_lock(%s)", (VERSIONS_LOCK_KEY,))
            try:
                for statement in create_index_statements(version):
                    conn.execute(statement)
            finally:
                conn.execute("SELECT pg_advisory_unlock(%s)", (VERSIONS_LOCK_KEY,))
        log.info("store: hnsw indexes ready version=%s", version)

    def versions(self) -> list[VersionInfo]:
        with self._session("versions") as conn:
            rows = conn.execute(
                f"SELECT {VERSION_COLUMNS} FROM embedding_versions ORDER BY created_at, version"
            ).fetchall()
        return [VersionInfo(*row) for row in rows]

    def version(self, version: str) -> VersionInfo | None:
        with self._session("version") as conn:
            return self._version(conn, version)

    def active_version(self) -> VersionInfo | None:
        """The active version, or None; one indexed read (polled between batches)."""
        with self._session("active_version") as conn:
            row = conn.execute(
                f"SELECT {VERSION_COLUMNS} FROM embedding_versions WHERE state = 'active'"
            ).fetchone()
        return None if row is None else VersionInfo(*row)

    def set_version_state(self, version: str, state: str) -> None:
        """Mark a version ``registered``, ``replaying`` or ``ready`` (not ``active``: that is
        :meth:`activate_version`); the active version keeps its state."""
        if state not in STATES or state == "active":
            raise ValueError(f"state must be one of registered, replaying, ready; got {state!r}")
        with self._session("set_version_state") as conn:
            conn.execute(
                "UPDATE embedding_versions SET state = %s, updated_at = now(), "
                "replayed_at = CASE WHEN %s = 'ready' THEN now() ELSE replayed_at END "
                "WHERE version = %s AND state <> 'active'",
                (state, state, version),
            )

    def activate_version(self, version: str) -> VersionInfo:
        """Make ``version`` the active one (the previous active one becomes ``ready``)."""
        with self._session("activate_version") as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (VERSIONS_LOCK_KEY,))
            if self._version(conn, version) is None:
                raise ValueError(f"embedding version {version!r} is not registered")
            conn.execute(
                "UPDATE embedding_versions SET state = 'ready', updated_at = now() "
                "WHERE state = 'active' AND version <> %s",
                (version,),
            )
            conn.execute(
                "UPDATE embedding_versions SET state = 'active', activated_at = now(), "
                "updated_at = now() WHERE version = %s AND state <> 'active'",
                (version,),
            )
            info = self._version(conn, version)
        self.ensure_indexes(version)
        assert info is not None
        log.info("store: embedding version activated version=%s", version)
        return info

    def drop_version(self, version: str) -> dict[str, int]:
        """Delete a version's vectors, centroids, indexes and registry row; the active
        version is refused. Detections assigned under it keep their row, without vectors."""
        with self._session("drop_version") as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (VERSIONS_LOCK_KEY,))
            info = self._version(conn, version)
            if info is None:
                raise ValueError(f"embedding version {version!r} is not registered")
            if info.state == "active":
                raise ValueError(
                    f"embedding version {version!r} is active; activate another one first"
                )
            vectors = conn.execute(
                "DELETE FROM detection_vectors WHERE embedding_version = %s", (version,)
            ).rowcount
            centroids = conn.execute(
                "DELETE FROM deer_centroids WHERE embedding_version = %s", (version,)
            ).rowcount
            cleared = conn.execute(
                "UPDATE detections SET embedding_resnet = NULL, embedding_effnet = NULL "
                "WHERE embedding_version = %s AND embedding_resnet IS NOT NULL",
                (version,),
            ).rowcount
            conn.execute("DELETE FROM embedding_versions WHERE version = %s", (version,))
        with self._session("drop_version") as conn:
            # Each in a transaction of its own, after the rows are gone (see ensure_indexes).
            conn.execute("SELECT pg_advisory_lock(%s)", (VERSIONS_LOCK_KEY,))
            try:
                for statement in drop_index_statements(version):
                    conn.execute(statement)
            finally:
                conn.execute("SELECT pg_advisory_unlock(%s)", (VERSIONS_LOCK_KEY,))
        self._registered.discard(version)
        log.info("store: embedding version dropped version=%s vectors=%d centroids=%d",
                 version, vectors, centroids)  # fmt: skip
        return {"vectors": vectors, "centroids": centroids, "detections_cleared": cleared}

    def version_coverage(self, version: str) -> dict[str, int]:
        """Detections stored, how many have a vector of ``version``, and its deer centroids."""
        with self._session("version_coverage") as conn:
            row = conn.execute(
                "SELECT (SELECT count(*) FROM detections), "
                "(SELECT count(*) FROM detection_vectors WHERE embedding_version = %s), "
                "(SELECT count(*) FROM deer), "
                "(SELECT count(*) FROM deer_centroids WHERE embedding_version = %s)",
                (version, version),
            ).fetchone()
        assert row is not None
        detections, vectors, deer, centroids = (int(v) for v in row)
        return {"detections": detections, "vectors": vectors, "deer": deer,
                "centroids": centroids}  # fmt: skip

    @staticmethod
    def _version(conn: psycopg.Connection[Any], version: str) -> VersionInfo | None:
        row = conn.execute(
            f"SELECT {VERSION_COLUMNS} FROM embedding_versions WHERE version = %s", (version,)
        ).fetchone()
        return None if row is None else VersionInfo(*row)

    # -- replay ---------------------------------------------------------------------------
    def replay_lookup(
        self, embedding_version: str, detection_ids: Sequence[str]
    ) -> dict[str, tuple[int, bytes | None, bool]]:
        """For the stored detections among ``detection_ids``: (deer_id, content digest,
        whether a vector of ``embedding_version`` is stored already)."""
        if not detection_ids:
            return {}
        with self._session("replay_lookup") as conn:
            rows = conn.execute(
                "SELECT d.detection_id, d.deer_id, d.content_sha256, x.detection_id IS NOT NULL "
                "FROM detections d LEFT JOIN detection_vectors x ON x.detection_id = "
                "d.detection_id AND x.embedding_version = %s WHERE d.detection_id = ANY(%s)",
                (embedding_version, list(detection_ids)),
            ).fetchall()
        return {r[0]: (int(r[1]), _opt_bytes(r[2]), bool(r[3])) for r in rows}

    def store_replayed(
        self,
        embedding_version: str,
        vectors: Sequence[tuple[str, np.ndarray, np.ndarray]],
    ) -> list[DeerCentroid]:
        """Store (detection_id, resnet, effnet) under ``embedding_version`` (an upsert on
        (detection, version): idempotent) and rebuild that version's centroids of every deer
        the detections belong to from all their vectors, in one transaction. Returns the
        rebuilt centroids (for the cache). Detections must be stored (their deer is kept)."""
        for detection_id, resnet, effnet in vectors:
            for name, vector in (("resnet", resnet), ("effnet", effnet)):
                v = np.asarray(vector)
                if v.shape != (self.dim,) or not np.isfinite(v).all():
                    raise ValueError(f"detection {detection_id}: {name} must be {self.dim} "
                                     f"finite floats, got shape {v.shape}")  # fmt: skip
        if not vectors:
            return []
        if embedding_version not in self._registered:
            self.register_version(VersionSpec(embedding_version))
        ids = sorted({v[0] for v in vectors})
        with self._session("store_replayed") as conn, conn.transaction():
            params = [
                (detection_id, embedding_version, np.asarray(r, np.float32),
                 np.asarray(e, np.float32))
                for detection_id, r, e in sorted(vectors, key=lambda v: v[0])
            ]  # fmt: skip
            with conn.cursor() as cur:
                cur.executemany(_UPSERT_VECTORS, params)
            deer = [
                int(r[0])
                for r in conn.execute(
                    "SELECT DISTINCT deer_id FROM detections WHERE detection_id = ANY(%s) "
                    "ORDER BY deer_id",
                    (ids,),
                ).fetchall()
            ]
            # Lock the existing centroids first (in id order, like write_batch), so that the
            # rebuild below reads, in a snapshot taken after the lock, every vector a live
            # writer committed; a live writer waiting on the lock merges into the rebuilt one.
            conn.execute(
                "SELECT deer_id FROM deer_centroids WHERE embedding_version = %s AND "
                "deer_id = ANY(%s) ORDER BY deer_id FOR UPDATE",
                (embedding_version, deer),
            )
            with conn.cursor(binary=True) as cur:
                rows = cur.execute(
                    _REBUILD_CENTROIDS, {"version": embedding_version, "deer": deer}
                ).fetchall()
        return sorted((_centroid(r) for r in rows), key=lambda c: c.deer_id)

    def paired_vectors(self, old: str, new: str) -> dict[str, np.ndarray]:
        """The detections with vectors of both versions, by detection_id: ``detection_ids``,
        ``deer_ids``, and ``old_resnet``/``old_effnet``/``new_resnet``/``new_effnet``."""
        with self._session("paired_vectors") as conn, conn.cursor(binary=True) as cur:
            rows = cur.execute(
                "SELECT d.detection_id, d.deer_id, a.embedding_resnet, a.embedding_effnet, "
                "b.embedding_resnet, b.embedding_effnet FROM detections d "
                "JOIN detection_vectors a ON a.detection_id = d.detection_id "
                "AND a.embedding_version = %s "
                "JOIN detection_vectors b ON b.detection_id = d.detection_id "
                "AND b.embedding_version = %s ORDER BY d.detection_id",
                (old, new),
            ).fetchall()

        def stack(i: int) -> np.ndarray:
            if not rows:
                return np.zeros((0, self.dim), np.float32)
            return np.stack([_floats(r[i]) for r in rows])

        return {
            "detection_ids": np.array([r[0] for r in rows], dtype=object),
            "deer_ids": np.array([int(r[1]) for r in rows], dtype=np.int64),
            "old_resnet": stack(2), "old_effnet": stack(3),
            "new_resnet": stack(4), "new_effnet": stack(5),
        }  # fmt: skip

    # -- the connection -------------------------------------------------------------------
    def _connection(self) -> psycopg.Connection[Any]:
        if not self._started:
            raise RuntimeError("PgStore: call start() first")
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

    @contextmanager
    def _session(self, what: str) -> Iterator[psycopg.Connection[Any]]:
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


def _centroid(row: Sequence[Any]) -> DeerCentroid:
    deer_id, resnet, effnet, sightings = row
    return DeerCentroid(int(deer_id), _floats(resnet), _floats(effnet), int(sightings))


def _opt_bytes(value: Any) -> bytes | None:
    return None if value is None else bytes(value)
