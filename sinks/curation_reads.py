"""What curation reads: a deer as a person sees it (``deer show``), the changes that named it
(``deer history``), the review queue with its candidates' example detections, the stored
thumbnails, and the changes since a curation generation (for the live consumers' in-memory
gallery, ``streams.gallery``).

Functions on a store's connection (``PgStore.session``), like ``sinks.gallery_reads``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sinks.aliases import aliases_of
from sinks.curation import CHANGE_COLUMNS, change_from_row
from sinks.detections import candidates_from_json
from sinks.pg import PgConnection
from sinks.records import Change

_DETECTION_COLUMNS = (
    "detection_id, deer_id, camera_id, captured_at, processed_at, is_new_deer, similarity, "
    "needs_review, reviewed_at, review_outcome, thumbnail IS NOT NULL, candidates, "
    "embedding_version"
)


def _detection(row: Any) -> dict[str, Any]:
    (detection_id, deer_id, camera, captured, processed, is_new, similarity, flagged,
     reviewed, outcome, has_thumb, candidates, version) = row  # fmt: skip
    return {
        "detection_id": detection_id,
        "deer_id": int(deer_id),
        "camera_id": camera,
        "captured_at": captured,
        "processed_at": processed,
        "is_new_deer": bool(is_new),
        "similarity": None if similarity is None else float(similarity),
        "needs_review": bool(flagged),
        "reviewed_at": reviewed,
        "review_outcome": outcome,
        "has_thumbnail": bool(has_thumb),
        "candidates": candidates_from_json(candidates),
        "embedding_version": version,
    }


# -- the live consumers' gallery --------------------------------------------------------------
def changes_since(store: PgConnection, generation: int) -> list[Change]:
    """Changes after ``generation`` (a change id), in order: one index range read, empty in
    the common case, so the batch path can ask before every batch."""
    with store.session("changes_since") as conn:
        rows = conn.execute(
            f"SELECT {CHANGE_COLUMNS} FROM deer_changes WHERE id > %s ORDER BY id", (generation,)
        ).fetchall()
    return [change_from_row(r) for r in rows]


def generation(store: PgConnection, before: datetime | None = None) -> int:
    """The latest change id (0: none), or the latest made before ``before`` (server time)."""
    with store.session("curation_generation") as conn:
        if before is None:
            row = conn.execute("SELECT coalesce(max(id), 0) FROM deer_changes").fetchone()
        else:
            row = conn.execute(
                "SELECT coalesce(max(id), 0) FROM deer_changes WHERE created_at < %s", (before,)
            ).fetchone()
    assert row is not None
    return int(row[0])


def merged_ids(store: PgConnection, deer_ids: list[int]) -> dict[int, int]:
    """{merged id: survivor} for those of ``deer_ids`` merged away."""
    with store.session("merged_ids") as conn:
        return aliases_of(conn, deer_ids)


# -- a deer -------------------------------------------------------------------------------------
def resolve(store: PgConnection, deer_id: int) -> int | None:
    """The deer ``deer_id`` is now (itself, or the survivor it was merged into); None when
    there is no such deer."""
    with store.session("resolve_deer") as conn:
        survivor = aliases_of(conn, [deer_id]).get(int(deer_id), int(deer_id))
        row = conn.execute("SELECT 1 FROM deer WHERE id = %s", (survivor,)).fetchone()
    return survivor if row is not None else None


def show(store: PgConnection, deer_id: int, *, recent: int = 10) -> dict[str, Any] | None:
    """A deer as a person sees it; an alias is shown as its survivor (``merged_into``)."""
    survivor = resolve(store, deer_id)
    if survivor is None:
        return None
    with store.session("show_deer") as conn:
        deer = conn.execute(
            "SELECT id, sightings, first_seen, last_seen, embedding_version, created_at "
            "FROM deer WHERE id = %s",
            (survivor,),
        ).fetchone()
        assert deer is not None
        cameras = conn.execute(
            "SELECT camera_id, count(*), max(captured_at) FROM detections WHERE deer_id = %s "
            "GROUP BY camera_id ORDER BY count(*) DESC, camera_id",
            (survivor,),
        ).fetchall()
        versions = conn.execute(
            "SELECT embedding_version, vectors, updated_at FROM deer_centroids "
            "WHERE deer_id = %s ORDER BY embedding_version",
            (survivor,),
        ).fetchall()
        aliases = conn.execute(
            "SELECT alias_id FROM deer_aliases WHERE deer_id = %s ORDER BY alias_id", (survivor,)
        ).fetchall()
        latest = conn.execute(
            f"SELECT {_DETECTION_COLUMNS} FROM detections WHERE deer_id = %s "
            "ORDER BY captured_at DESC, detection_id LIMIT %s",
            (survivor, recent),
        ).fetchall()
    doc: dict[str, Any] = {
        "deer_id": int(deer[0]),
        "sightings": int(deer[1]),
        "first_seen": deer[2],
        "last_seen": deer[3],
        "created_under": deer[4],
        "created_at": deer[5],
        "cameras": [{"camera_id": c, "detections": int(n), "last_seen": t} for c, n, t in cameras],
        "versions": [
            {"embedding_version": v, "vectors": int(n), "updated_at": t} for v, n, t in versions
        ],
        "aliases": [int(a[0]) for a in aliases],
        "recent_detections": [_detection(r) for r in latest],
    }
    if survivor != int(deer_id):
        doc["requested"] = int(deer_id)
        doc["merged_into"] = survivor
    return doc


def detections_of(store: PgConnection, deer_id: int, *, limit: int = 200) -> list[dict[str, Any]]:
    """A deer's detections, newest first."""
    with store.session("deer_detections") as conn:
        rows = conn.execute(
            f"SELECT {_DETECTION_COLUMNS} FROM detections WHERE deer_id = %s "
            "ORDER BY captured_at DESC, detection_id LIMIT %s",
            (int(deer_id), limit),
        ).fetchall()
    return [_detection(r) for r in rows]


def history(store: PgConnection, deer_id: int) -> list[Change]:
    """Every change that named ``deer_id`` (as survivor, merged, split, new, target or
    source), in order."""
    with store.session("deer_history") as conn:
        rows = conn.execute(
            f"SELECT {CHANGE_COLUMNS} FROM deer_changes WHERE deer_id = %s OR other_id = %s "
            "OR %s = ANY(source_ids) ORDER BY id",
            (int(deer_id), int(deer_id), int(deer_id)),
        ).fetchall()
    return [change_from_row(r) for r in rows]


# -- the review queue ---------------------------------------------------------------------------
def review_queue(store: PgConnection, *, limit: int = 20) -> tuple[int, list[dict[str, Any]]]:
    """(how many wait, the oldest ``limit``): flagged detections nobody reviewed yet, with
    their candidates' ids resolved through merges."""
    with store.session("review_queue") as conn:
        total = conn.execute(
            "SELECT count(*) FROM detections WHERE needs_review AND reviewed_at IS NULL"
        ).fetchone()
        rows = conn.execute(
            f"SELECT {_DETECTION_COLUMNS} FROM detections WHERE needs_review AND reviewed_at "
            "IS NULL ORDER BY processed_at, detection_id LIMIT %s",
            (limit,),
        ).fetchall()
        items = [_detection(r) for r in rows]
        named = {c.deer_id for item in items for c in item["candidates"] if c.deer_id is not None}
        aliases = aliases_of(conn, named)  # type: ignore[arg-type]
    for item in items:
        item["candidates"] = [
            {"deer_id": aliases.get(c.deer_id, c.deer_id), "scored_deer_id": c.deer_id,
             "similarity": c.similarity, "score_resnet": c.score_resnet,
             "score_effnet": c.score_effnet}
            for c in item["candidates"]
        ]  # fmt: skip
    assert total is not None
    return int(total[0]), items


def examples(
    store: PgConnection, deer_id: int, *, w_resnet: float, w_effnet: float
) -> dict[str, str | None]:
    """Two detections of a deer that have thumbnails: the most recent, and the most typical
    (closest to the deer's centroid under the active version, by the ensemble score)."""
    with store.session("deer_examples") as conn:
        recent = conn.execute(
            "SELECT detection_id FROM detections WHERE deer_id = %s AND thumbnail IS NOT NULL "
            "ORDER BY captured_at DESC, detection_id LIMIT 1",
            (int(deer_id),),
        ).fetchone()
        typical = conn.execute(
            "SELECT d.detection_id FROM detections d "
            "JOIN embedding_versions v ON v.state = 'active' "
            "JOIN detection_vectors x ON x.detection_id = d.detection_id "
            "AND x.embedding_version = v.version "
            "JOIN deer_centroids c ON c.deer_id = d.deer_id AND c.embedding_version = v.version "
            "WHERE d.deer_id = %s AND d.thumbnail IS NOT NULL "
            "ORDER BY %s * (x.embedding_resnet <=> c.centroid_resnet) "
            "+ %s * (x.embedding_effnet <=> c.centroid_effnet), d.detection_id LIMIT 1",
            (int(deer_id), float(w_resnet), float(w_effnet)),
        ).fetchone()
    return {
        "recent": None if recent is None else recent[0],
        "typical": None if typical is None else typical[0],
    }


def thumbnail(store: PgConnection, detection_id: str) -> bytes | None:
    with store.session("thumbnail") as conn:
        row = conn.execute(
            "SELECT thumbnail FROM detections WHERE detection_id = %s", (detection_id,)
        ).fetchone()
    return None if row is None or row[0] is None else bytes(row[0])


def detection(store: PgConnection, detection_id: str) -> dict[str, Any] | None:
    with store.session("detection") as conn:
        row = conn.execute(
            f"SELECT {_DETECTION_COLUMNS} FROM detections WHERE detection_id = %s",
            (detection_id,),
        ).fetchone()
    return None if row is None else _detection(row)
