"""The stored history under other embedding versions: the writes of a replay and the reads of
``validate``.

A replay re-embeds stored detections under a new version beside the old one
(``streams.replay``). Per batch it asks which detections are stored and already have a vector
of the version (``replay_lookup``), then stores the new vectors and rebuilds that version's
centroids of the deer they belong to, in one transaction (``store_replayed``). The rebuilt
centroids are exact re-normalised means of every vector of the version;
``DeerCentroid.sightings`` is then the number of vectors of the version merged into the
centroid, which equals the deer's sightings once every detection has a vector of the version.
``validate`` reads the detections that have vectors of two versions (``paired_vectors``).

Runs on a store's connection (``PgStore.history``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sinks.pg import NEW_DEER_LOCK_KEY, PgConnection, centroid_from_row, floats, opt_bytes
from sinks.records import DeerCentroid
from sinks.registry import VersionRegistry

_UPSERT_VECTORS = """
INSERT INTO detection_vectors (detection_id, embedding_version, embedding_resnet, embedding_effnet)
VALUES (%s, %s, %s, %s)
ON CONFLICT (embedding_version, detection_id) DO UPDATE SET
    embedding_resnet = EXCLUDED.embedding_resnet,
    embedding_effnet = EXCLUDED.embedding_effnet,
    created_at = now()
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


class History:
    """Replay writes and validate reads on ``store``'s connection (``PgStore.history``);
    ``registry`` registers the versions written, and vectors have ``dim`` floats."""

    def __init__(self, store: PgConnection, registry: VersionRegistry, *, dim: int) -> None:
        self._store = store
        self._registry = registry
        self._dim = dim

    def replay_lookup(
        self, embedding_version: str, detection_ids: Sequence[str]
    ) -> dict[str, tuple[int, bytes | None, bool]]:
        """For the stored detections among ``detection_ids``: (deer_id, content digest,
        whether a vector of ``embedding_version`` is stored already)."""
        if not detection_ids:
            return {}
        with self._store.session("replay_lookup") as conn:
            rows = conn.execute(
                "SELECT d.detection_id, d.deer_id, d.content_sha256, x.detection_id IS NOT NULL "
                "FROM detections d LEFT JOIN detection_vectors x ON x.detection_id = "
                "d.detection_id AND x.embedding_version = %s WHERE d.detection_id = ANY(%s)",
                (embedding_version, list(detection_ids)),
            ).fetchall()
        return {r[0]: (int(r[1]), opt_bytes(r[2]), bool(r[3])) for r in rows}

    def store_replayed(
        self,
        embedding_version: str,
        vectors: Sequence[tuple[str, np.ndarray, np.ndarray]],
    ) -> list[DeerCentroid]:
        """Store (detection_id, resnet, effnet) under ``embedding_version`` (an upsert on
        (detection, version): idempotent) and rebuild that version's centroids of every deer
        the detections belong to from all their vectors, in one transaction. Returns the
        rebuilt centroids (for the cache). Detections must be stored (their deer is kept)."""
        dim = self._dim
        for detection_id, resnet, effnet in vectors:
            for name, vector in (("resnet", resnet), ("effnet", effnet)):
                v = np.asarray(vector)
                if v.shape != (dim,) or not np.isfinite(v).all():
                    raise ValueError(f"detection {detection_id}: {name} must be {dim} "
                                     f"finite floats, got shape {v.shape}")  # fmt: skip
        if not vectors:
            return []
        self._registry.ensure_registered(embedding_version)
        ids = sorted({v[0] for v in vectors})
        with self._store.session("store_replayed") as conn, conn.transaction():
            # Shared with the batch writes, exclusive for curation changes (the new-deer lock,
            # sinks.store): a merge or split never rebuilds centroids beside this rebuild.
            conn.execute("SELECT pg_advisory_xact_lock_shared(%s)", (NEW_DEER_LOCK_KEY,))
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
        return sorted((centroid_from_row(r) for r in rows), key=lambda c: c.deer_id)

    def paired_vectors(self, old: str, new: str) -> dict[str, np.ndarray]:
        """The detections with vectors of both versions, by detection_id: ``detection_ids``,
        ``deer_ids``, and ``old_resnet``/``old_effnet``/``new_resnet``/``new_effnet``."""
        # Operator work over the whole history: as long as it takes, like an index build.
        session = self._store.session("paired_vectors", unbounded=True)
        with session as conn, conn.cursor(binary=True) as cur:
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
                return np.zeros((0, self._dim), np.float32)
            return np.stack([floats(r[i]) for r in rows])

        return {
            "detection_ids": np.array([r[0] for r in rows], dtype=object),
            "deer_ids": np.array([int(r[1]) for r in rows], dtype=np.int64),
            "old_resnet": stack(2), "old_effnet": stack(3),
            "new_resnet": stack(4), "new_effnet": stack(5),
        }  # fmt: skip
