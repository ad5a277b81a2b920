"""The registry of embedding versions, and the per-version HNSW indexes.

A version names the model that made a set of vectors (``reid.weights``). Vectors live per
(detection, version) in ``detection_vectors`` and centroids per (deer, version) in
``deer_centroids``; ``embedding_versions`` lists the versions with what is needed to build
their embedder again and a state:

- ``registered``: known (a stream or replay wrote some vectors), possibly partial;
- ``replaying``: a replay is filling it;
- ``ready``: a replay reached the end of the topic (or it was active before);
- ``active``: the version the live consumers read and write; at most one (a unique index).

Each version may carry its own assignment threshold (``threshold``, migration 0005; NULL =
the global ``REID_THRESHOLD``), set with ``activate`` or ``set_threshold``.

Each version gets its own partial HNSW indexes (``WHERE embedding_version = '<V>'``), created
when it is registered and dropped with it; the DDL is composed with
``psycopg.sql.Identifier``/``Literal``, and the index names carry a digest of the version
(versions may be long or hold characters that identifiers cannot).

``VersionRegistry`` holds every statement on the registry. It runs on a store's connection
(``PgStore.registry``); the batch and replay writes call ``ensure_registered`` first, because
the vectors' foreign keys need the version's row.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from sinks.pg import NEW_DEER_LOCK_KEY, PgConnection

log = logging.getLogger(__name__)

STATES = ("registered", "replaying", "ready", "active")

# Serialises changes of the registry (registration with its index DDL, activation, dropping),
# also across processes; distinct from the migration and new-deer locks.
VERSIONS_LOCK_KEY = 0x4445_4552_0000_0003

# A known version keeps its row; details given in a later registration (weights, seed, size)
# replace older ones, and a registration without details changes nothing.
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

# (table, column, index name prefix) of every per-version HNSW index.
_INDEXED = (
    ("deer_centroids", "centroid_resnet", "deer_centroids_resnet_hnsw_"),
    ("deer_centroids", "centroid_effnet", "deer_centroids_effnet_hnsw_"),
    ("detection_vectors", "embedding_resnet", "detection_vectors_resnet_hnsw_"),
    ("detection_vectors", "embedding_effnet", "detection_vectors_effnet_hnsw_"),
)


@dataclass(frozen=True)
class VersionSpec:
    """How to build a version's embedder: a checkpoint, or the seeded/ImageNet fallback."""

    version: str
    weights_path: str | None = None
    weights_sha256: str | None = None
    seed: int | None = None
    input_size: int | None = None


@dataclass(frozen=True)
class VersionInfo:
    """A row of ``embedding_versions``."""

    version: str
    weights_path: str | None
    weights_sha256: str | None
    seed: int | None
    input_size: int | None
    state: str
    created_at: datetime
    activated_at: datetime | None
    replayed_at: datetime | None
    # Its own assignment threshold (migration 0005); None = REID_THRESHOLD.
    threshold: float | None = None

    @property
    def spec(self) -> VersionSpec:
        return VersionSpec(
            self.version, self.weights_path, self.weights_sha256, self.seed, self.input_size
        )


VERSION_COLUMNS = (
    "version, weights_path, weights_sha256, seed, input_size, state, created_at, activated_at, "
    "replayed_at, threshold"
)


def index_tag(version: str) -> str:
    """The digest that names a version's indexes (the same as in migration 0002: md5[:12])."""
    return hashlib.md5(version.encode("utf-8"), usedforsecurity=False).hexdigest()[:12]


def index_names(version: str) -> list[str]:
    tag = index_tag(version)
    return [prefix + tag for _, _, prefix in _INDEXED]


def create_index_statements(version: str) -> list[sql.Composed]:
    """``CREATE INDEX IF NOT EXISTS`` of the version's four partial HNSW indexes."""
    tag = index_tag(version)
    return [
        sql.SQL(
            "CREATE INDEX IF NOT EXISTS {name} ON {table} USING hnsw ({column} vector_cosine_ops)"
            " WITH (m = 16, ef_construction = 64) WHERE embedding_version = {version}"
        ).format(
            name=sql.Identifier(prefix + tag),
            table=sql.Identifier(table),
            column=sql.Identifier(column),
            version=sql.Literal(version),
        )
        for table, column, prefix in _INDEXED
    ]


def drop_index_statements(version: str) -> list[sql.Composed]:
    return [
        sql.SQL("DROP INDEX IF EXISTS {name}").format(name=sql.Identifier(name))
        for name in index_names(version)
    ]


class VersionRegistry:
    """The rows of ``embedding_versions`` and the versions' indexes, on ``store``'s connection.

    Remembers the versions it has seen registered, so that the write paths' check
    (``ensure_registered``) costs one indexed read per version and store, not one per batch.
    """

    def __init__(self, store: PgConnection) -> None:
        self._store = store
        self._registered: set[str] = set()

    def register(self, spec: VersionSpec, *, activate_if_none: bool = False) -> VersionInfo:
        """Add ``spec.version`` to the registry (a known version keeps its row; details given
        now replace older ones) and create its HNSW indexes; with ``activate_if_none`` it
        becomes the active version when there is none. Returns the stored row."""
        with self._store.session("register_version") as conn:
            known = _version(conn, spec.version)
        details = (spec.weights_path, spec.weights_sha256, spec.seed, spec.input_size)
        if known is not None and not activate_if_none and all(d is None for d in details):
            # The write paths' check: one indexed read, no locks, no DDL.
            self._registered.add(spec.version)
            return known
        with self._store.session("register_version") as conn, conn.transaction():
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
            info = _version(conn, spec.version)
        self.ensure_indexes(spec.version)
        self._registered.add(spec.version)
        assert info is not None
        return info

    def ensure_registered(self, version: str) -> None:
        """Register ``version`` (with no details) unless it is known to be registered: the
        vectors and centroids written under it reference its row."""
        if version not in self._registered:
            self.register(VersionSpec(version))

    def ensure_indexes(self, version: str) -> None:
        """Create the version's partial HNSW indexes that are missing.

        Each index is built in a transaction of its own, holding no other lock: a build
        waits for the writers of its table, and one that held a table while waiting for
        another would deadlock against concurrent batch writes. A session advisory lock
        keeps two processes from building the same index at once.
        """
        # Unbounded: a build over a large history takes minutes, or waits for another's.
        with self._store.session("ensure_indexes", unbounded=True) as conn:
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
        """Every registered version, oldest first."""
        with self._store.session("versions") as conn:
            rows = conn.execute(
                f"SELECT {VERSION_COLUMNS} FROM embedding_versions ORDER BY created_at, version"
            ).fetchall()
        return [VersionInfo(*row) for row in rows]

    def get(self, version: str) -> VersionInfo | None:
        with self._store.session("version") as conn:
            return _version(conn, version)

    def active(self) -> VersionInfo | None:
        """The active version, or None; one indexed read (polled between batches)."""
        with self._store.session("active_version") as conn:
            row = conn.execute(
                f"SELECT {VERSION_COLUMNS} FROM embedding_versions WHERE state = 'active'"
            ).fetchone()
        return None if row is None else VersionInfo(*row)

    def set_state(self, version: str, state: str) -> None:
        """Mark a version ``registered``, ``replaying`` or ``ready`` (not ``active``: that is
        :meth:`activate`); the active version keeps its state."""
        if state not in STATES or state == "active":
            raise ValueError(f"state must be one of registered, replaying, ready; got {state!r}")
        with self._store.session("set_version_state") as conn:
            conn.execute(
                "UPDATE embedding_versions SET state = %s, updated_at = now(), "
                "replayed_at = CASE WHEN %s = 'ready' THEN now() ELSE replayed_at END "
                "WHERE version = %s AND state <> 'active'",
                (state, state, version),
            )

    def activate(self, version: str, *, threshold: float | None = None) -> VersionInfo:
        """Make ``version`` the active one (the previous active one becomes ``ready``); with
        ``threshold``, set the version's own threshold in the same transaction."""
        with self._store.session("activate_version") as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (VERSIONS_LOCK_KEY,))
            # Ordered with every deer creation (sinks.store checks the active version under
            # this lock): a deer is made either before the switch or under the new version.
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (NEW_DEER_LOCK_KEY,))
            if _version(conn, version) is None:
                raise ValueError(f"embedding version {version!r} is not registered")
            if threshold is not None:
                _set_threshold(conn, version, threshold)
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
            info = _version(conn, version)
        self.ensure_indexes(version)
        assert info is not None
        log.info("store: embedding version activated version=%s", version)
        return info

    def set_threshold(self, version: str, threshold: float | None) -> VersionInfo:
        """Set (None: clear) ``version``'s own threshold; live consumers of the active
        version pick it up at their next registry poll."""
        with self._store.session("set_version_threshold") as conn, conn.transaction():
            if _version(conn, version) is None:
                raise ValueError(f"embedding version {version!r} is not registered")
            _set_threshold(conn, version, threshold)
            info = _version(conn, version)
        assert info is not None
        log.info("store: embedding version threshold version=%s threshold=%s", version, threshold)
        return info

    def drop(self, version: str) -> dict[str, int]:
        """Delete a version's vectors, centroids, indexes and registry row; the active
        version is refused. Detections assigned under it keep their row, without vectors."""
        with self._store.session("drop_version", unbounded=True) as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (VERSIONS_LOCK_KEY,))
            info = _version(conn, version)
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
        with self._store.session("drop_version", unbounded=True) as conn:
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

    def coverage(self, version: str) -> dict[str, int]:
        """Detections stored, how many have a vector of ``version``, and its deer centroids."""
        with self._store.session("version_coverage") as conn:
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


def _version(conn: psycopg.Connection[Any], version: str) -> VersionInfo | None:
    row = conn.execute(
        f"SELECT {VERSION_COLUMNS} FROM embedding_versions WHERE version = %s", (version,)
    ).fetchone()
    return None if row is None else VersionInfo(*row)


def _set_threshold(conn: psycopg.Connection[Any], version: str, threshold: float | None) -> None:
    if threshold is not None and not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be within [-1, 1], got {threshold}")
    conn.execute(
        "UPDATE embedding_versions SET threshold = %s, updated_at = now() WHERE version = %s",
        (threshold, version),
    )
