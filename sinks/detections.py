"""The detection row as stored: its insert, and the assignment read back from it.

Shared by the batch write (``sinks.store``) and the curation changes (``sinks.curation``),
which read assignments the same way. The candidates (the deer a detection was compared
with) are a JSON list in ``detections.candidates``, best first; the batch's new deer named
there by index get their ids with the write, like the row's own ``new_deer``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import psycopg
from psycopg.types.json import Jsonb

from sinks.pg import opt_bytes
from sinks.records import CandidateScore, DetectionRow, StoredAssignment

ASSIGNMENT_COLUMNS = (
    "detection_id, deer_id, is_new_deer, similarity, score_resnet, score_effnet, "
    "embedding_version, camera_id, captured_at, processed_at, content_sha256, needs_review, "
    "candidates"
)

INSERT_DETECTION = """
INSERT INTO detections (
    detection_id, camera_id, captured_at, deer_id, is_new_deer, similarity, score_resnet,
    score_effnet, embedding_version, embedding_resnet, embedding_effnet, bbox, confidence,
    species, source_topic, source_partition, source_offset, processed_at, content_sha256,
    needs_review, candidates, thumbnail
) VALUES (
    %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s
)
ON CONFLICT (detection_id) DO NOTHING
RETURNING detection_id
"""

INSERT_VECTORS = """
INSERT INTO detection_vectors (detection_id, embedding_version, embedding_resnet, embedding_effnet)
VALUES (%s, %s, %s, %s)
ON CONFLICT (embedding_version, detection_id) DO NOTHING
"""


def opt_float(value: float | None) -> float | None:
    # numpy scalars would otherwise reach the driver as types it may not adapt.
    return None if value is None else float(value)


def candidates_json(
    candidates: Sequence[CandidateScore], new_ids: Sequence[int]
) -> list[dict[str, Any]]:
    """The stored form of a row's candidates, new deer resolved to their ids."""
    out = []
    for c in candidates:
        deer_id = c.deer_id if c.deer_id is not None else new_ids[c.new_deer]  # type: ignore[index]
        out.append(
            {
                "deer_id": int(deer_id),
                "similarity": float(c.similarity),
                "score_resnet": float(c.score_resnet),
                "score_effnet": float(c.score_effnet),
            }
        )
    return out


def candidates_from_json(value: Any) -> tuple[CandidateScore, ...]:
    if not value:
        return ()
    return tuple(
        CandidateScore(int(c["deer_id"]), None, float(c["similarity"]),
                       float(c["score_resnet"]), float(c["score_effnet"]))
        for c in value
    )  # fmt: skip


def detection_params(row: DetectionRow, version: str, new_ids: Sequence[int]) -> tuple[Any, ...]:
    deer_id = row.deer_id if row.deer_id is not None else new_ids[row.new_deer]  # type: ignore[index]
    return (
        row.detection_id,
        row.camera_id,
        row.captured_at,
        int(deer_id),
        bool(row.is_new_deer),
        opt_float(row.similarity),
        opt_float(row.score_resnet),
        opt_float(row.score_effnet),
        version,
        np.asarray(row.embedding_resnet, dtype=np.float32),
        np.asarray(row.embedding_effnet, dtype=np.float32),
        None if row.bbox is None else [float(v) for v in row.bbox],
        opt_float(row.confidence),
        row.species,
        row.source_topic,
        int(row.source_partition),
        int(row.source_offset),
        row.processed_at,
        row.content_sha256,
        bool(row.needs_review),
        Jsonb(candidates_json(row.candidates, new_ids)),
        row.thumbnail,
    )


def insert_detections(
    conn: psycopg.Connection[Any],
    version: str,
    rows: Sequence[DetectionRow],
    new_ids: list[int],
) -> list[DetectionRow]:
    """Insert what is not stored yet; returns the inserted rows, in input order."""
    # A fixed order (by detection_id) keeps two workers inserting overlapping batches
    # during a rebalance from waiting on each other in a cycle.
    order = sorted(range(len(rows)), key=lambda i: rows[i].detection_id)
    params = [detection_params(rows[i], version, new_ids) for i in order]
    taken: list[int] = []
    with conn.cursor() as cur:
        cur.executemany(INSERT_DETECTION, params, returning=True)
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
            cur.executemany(INSERT_VECTORS, vectors)
    return [rows[i] for i in sorted(taken)]


def assignment_from_row(row: Sequence[Any]) -> StoredAssignment:
    """A row of ``SELECT ASSIGNMENT_COLUMNS FROM detections``."""
    return StoredAssignment(
        *row[:10],
        content_sha256=opt_bytes(row[10]),
        needs_review=bool(row[11]),
        candidates=candidates_from_json(row[12]),
    )


def fetch_assignments(
    conn: psycopg.Connection[Any], detection_ids: list[str]
) -> dict[str, StoredAssignment]:
    rows = conn.execute(
        f"SELECT {ASSIGNMENT_COLUMNS} FROM detections WHERE detection_id = ANY(%s)",
        (detection_ids,),
    ).fetchall()
    return {row[0]: assignment_from_row(row) for row in rows}
