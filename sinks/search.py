"""Gallery searches over stored detections: the most similar detections of one version.

Candidates come from pgvector's HNSW index on the version's ResNet vectors (the partial index
``WHERE embedding_version = '<V>'`` of ``sinks.registry``); they are then re-ranked with both
backbones by the stream's ensemble score, ``w_resnet·cos(r) + w_effnet·cos(e)``. The index is
approximate (recall@5 about 0.9 at ``ef_search=100`` on 100k clustered vectors, see
docs/BENCHMARKS.md), and asking for ``candidates`` well above ``k`` makes the re-ranking see the
neighbours the ResNet index alone ranks a little lower.

The version goes into the SQL as a literal (``psycopg.sql.Literal``), not a parameter: the
planner can use a partial index only when it sees the value, and a cached generic plan would
not. The query vector is a parameter.

``similar_to_stored`` is the search by example of ``reid-stream similar``: the query is a stored
detection's own vectors, on a store's connection.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import psycopg
from pgvector.psycopg import register_vector
from psycopg import sql

from sinks.store import PgStore

_CANDIDATES = """
WITH c AS (
    SELECT detection_id, embedding_resnet, embedding_effnet
    FROM detection_vectors
    WHERE embedding_version = {version}
    ORDER BY embedding_resnet <=> %(query)s
    LIMIT %(limit)s
)
SELECT c.detection_id, d.deer_id, d.camera_id, d.captured_at, c.embedding_resnet,
       c.embedding_effnet
FROM c JOIN detections d ON d.detection_id = c.detection_id
"""


@dataclass(frozen=True)
class SimilarDetection:
    detection_id: str
    deer_id: int
    camera_id: str
    captured_at: datetime
    score: float  # the ensemble score against the query
    score_resnet: float
    score_effnet: float


def similar_detections(
    conn: psycopg.Connection[Any],
    version: str,
    resnet: np.ndarray,
    effnet: np.ndarray,
    *,
    k: int = 5,
    candidates: int | None = None,
    ef_search: int = 100,
    w_resnet: float = 0.6,
    w_effnet: float = 0.4,
    exclude: str | None = None,
) -> list[SimilarDetection]:
    """The ``k`` stored detections of ``version`` most similar to the query vectors (L2-
    normalised 512-d each), best first; ``exclude`` leaves one detection_id out (the query's
    own)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    limit = max(candidates or 4 * k, k) + (1 if exclude is not None else 0)
    register_vector(conn)
    query = sql.SQL(_CANDIDATES).format(version=sql.Literal(version))
    with conn.transaction():
        # Each candidate list the index scan keeps: higher is slower and finds more.
        conn.execute(sql.SQL("SET LOCAL hnsw.ef_search = {}").format(sql.Literal(int(ef_search))))
        rows = conn.execute(
            query, {"query": np.asarray(resnet, np.float32), "limit": limit}
        ).fetchall()
    found = []
    r = np.asarray(resnet, np.float32)
    e = np.asarray(effnet, np.float32)
    for detection_id, deer_id, camera_id, captured_at, vr, ve in rows:
        if detection_id == exclude:
            continue
        sr = float(np.dot(r, np.asarray(vr.to_numpy(), np.float32)))
        se = float(np.dot(e, np.asarray(ve.to_numpy(), np.float32)))
        score = w_resnet * sr + w_effnet * se
        found.append(
            SimilarDetection(detection_id, int(deer_id), camera_id, captured_at, score, sr, se)
        )
    found.sort(key=lambda s: (-s.score, s.detection_id))
    return found[:k]


def stored_vectors(
    conn: psycopg.Connection[Any], version: str, detection_id: str
) -> tuple[np.ndarray, np.ndarray] | None:
    """The (resnet, effnet) vectors of one stored detection under ``version``, or None."""
    register_vector(conn)
    row = conn.execute(
        "SELECT embedding_resnet, embedding_effnet FROM detection_vectors "
        "WHERE embedding_version = %s AND detection_id = %s",
        (version, detection_id),
    ).fetchone()
    if row is None:
        return None
    return np.asarray(row[0].to_numpy(), np.float32), np.asarray(row[1].to_numpy(), np.float32)


def similar_to_stored(
    store: PgStore,
    version: str,
    detection_id: str,
    *,
    k: int = 5,
    ef_search: int = 100,
    w_resnet: float = 0.6,
    w_effnet: float = 0.4,
) -> list[SimilarDetection]:
    """The ``k`` stored detections of ``version`` most similar to the stored detection
    ``detection_id`` (itself left out), best first. Raises LookupError when that detection
    has no vector of ``version``."""
    with store.session("similar") as conn:
        query = stored_vectors(conn, version, detection_id)
        if query is None:
            raise LookupError(f"detection {detection_id!r} has no vector of {version!r}")
        return similar_detections(
            conn, version, *query, k=k, ef_search=ef_search, exclude=detection_id,
            w_resnet=w_resnet, w_effnet=w_effnet,
        )  # fmt: skip
