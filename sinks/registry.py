"""The registry of embedding versions, and the per-version HNSW indexes.

A version names the model that made a set of vectors (``reid.weights``). Vectors live per
(detection, version) in ``detection_vectors`` and centroids per (deer, version) in
``deer_centroids``; ``embedding_versions`` lists the versions with what is needed to build
their embedder again and a state:

- ``registered``: known (a stream or replay wrote some vectors), possibly partial;
- ``replaying``: a replay is filling it;
- ``ready``: a replay reached the end of the topic (or it was active before);
- ``active``: the version the live consumers read and write; at most one (a unique index).

Each version gets its own partial HNSW indexes (``WHERE embedding_version = '<V>'``), created
when it is registered and dropped with it; the DDL is composed with
``psycopg.sql.Identifier``/``Literal``, and the index names carry a digest of the version
(versions may be long or hold characters that identifiers cannot).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

from psycopg import sql

STATES = ("registered", "replaying", "ready", "active")

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

    @property
    def spec(self) -> VersionSpec:
        return VersionSpec(
            self.version, self.weights_path, self.weights_sha256, self.seed, self.input_size
        )


VERSION_COLUMNS = (
    "version, weights_path, weights_sha256, seed, input_size, state, created_at, activated_at, "
    "replayed_at"
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
