"""Curation changes: merge two deer, split detections off into a new deer, move detections
to another deer, confirm a flagged detection (``reid-stream deer ...``, the review page).

Each change is one transaction under the new-deer lock (``sinks.pg.NEW_DEER_LOCK_KEY``), held
exclusively: batch and replay writes hold it shared, so no write interleaves with a change,
and a write that planned against a deer merged away meanwhile is pointed at the survivor
(``sinks.aliases.resolve_rows``). In that transaction:

- the detections are re-pointed, and every version's centroids of the deer involved are
  rebuilt from the stored vectors (the re-normalised mean, as a replay rebuilds them; a
  version with no vector left for a deer loses that deer's centroid);
- ``deer.sightings``, ``first_seen`` and ``last_seen`` are recomputed from the detections;
- a merged-away deer is deleted and its id kept in ``deer_aliases`` (chains flattened);
- the change is appended to ``deer_changes``, whose id is the curation generation that live
  consumers compare with (``streams.gallery``) and whose ``published_at`` is the outbox of
  the ``deer.changes`` topic (``streams.curation`` publishes, then marks).

A repeat of a change already made changes nothing and returns the earlier change
(``ChangeResult.changed`` False). What would break the herd's rules raises
:class:`CurationRefused` with a message that says why.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import psycopg

from sinks.aliases import aliases_of
from sinks.pg import NEW_DEER_LOCK_KEY, PgConnection, centroid_from_row
from sinks.records import Change, ChangeResult, DeerCentroid

log = logging.getLogger(__name__)

CHANGE_COLUMNS = (
    "id, kind, deer_id, other_id, source_ids, detections, reason, created_at, published_at"
)

# Every version's centroids of the given deer, from every stored vector of that version.
_REBUILD = """
INSERT INTO deer_centroids (
    deer_id, embedding_version, centroid_resnet, centroid_effnet, vectors, updated_at
)
SELECT d.deer_id, x.embedding_version, l2_normalize(avg(x.embedding_resnet)),
       l2_normalize(avg(x.embedding_effnet)), count(*), now()
FROM detection_vectors x JOIN detections d ON d.detection_id = x.detection_id
WHERE d.deer_id = ANY(%s)
GROUP BY d.deer_id, x.embedding_version
RETURNING embedding_version, deer_id, centroid_resnet, centroid_effnet, vectors
"""

_SIGHTINGS = """
UPDATE deer SET sightings = s.n, first_seen = s.first, last_seen = s.last, updated_at = now()
FROM (
    SELECT deer_id, count(*) AS n, min(captured_at) AS first, max(captured_at) AS last
    FROM detections WHERE deer_id = ANY(%s) GROUP BY deer_id
) s
WHERE deer.id = s.deer_id
"""


class CurationRefused(ValueError):
    """A change that would break the herd's rules (or names what does not exist)."""


def change_from_row(row: Sequence[Any]) -> Change:
    id_, kind, deer_id, other_id, sources, detections, reason, created, published = row
    return Change(
        int(id_), kind, int(deer_id), None if other_id is None else int(other_id),
        tuple(int(s) for s in sources or ()), tuple(detections or ()), reason, created, published,
    )  # fmt: skip


class Curation:
    """The changes, on a store's connection (``PgStore.curation``)."""

    def __init__(self, store: PgConnection) -> None:
        self._store = store

    # -- merge ------------------------------------------------------------------------------
    def merge(self, keep: int, other: int, reason: str | None = None) -> ChangeResult:
        """Merge deer ``other`` into ``keep``: its detections become ``keep``'s, its id an
        alias of ``keep``. Repeating it is a no-op; merging a deer into itself, into a deer
        that was merged away, or back into the deer it absorbed (a cycle) is refused."""
        keep, other = int(keep), int(other)
        if keep == other:
            raise CurationRefused(f"cannot merge deer {keep} into itself")
        with self._store.session("curation_merge") as conn, conn.transaction():
            _lock(conn)
            return _merge(conn, keep, other, reason)

    # -- split and move ---------------------------------------------------------------------
    def split(
        self, deer_id: int, detection_ids: Sequence[str], reason: str | None = None
    ) -> ChangeResult:
        """Make the listed detections of ``deer_id`` a new deer. Repeating it is a no-op;
        detections of another deer, unknown ones, or all of the deer's are refused."""
        deer_id = int(deer_id)
        wanted = _wanted(detection_ids)
        with self._store.session("curation_split") as conn, conn.transaction():
            _lock(conn)
            _require_not_alias(conn, deer_id, "split")
            _require_deer(conn, [deer_id])
            where = _where_are(conn, wanted)
            owners = set(where.values())
            if owners != {deer_id}:
                if len(owners) == 1:
                    earlier = _same_split(conn, deer_id, owners.pop(), wanted)
                    if earlier is not None:
                        return ChangeResult(earlier, False, {}, {})
                raise CurationRefused(_not_of(where, deer_id))
            total = _count(conn, deer_id)
            if total == len(wanted):
                raise CurationRefused(
                    f"refused: these are all {total} detections of deer {deer_id}; a split "
                    "must leave the deer at least one"
                )
            new_id = int(_one(conn, "SELECT nextval('deer_id_seq')"))
            conn.execute(
                "INSERT INTO deer (id, embedding_version, sightings, first_seen, last_seen) "
                "SELECT %s, coalesce((SELECT version FROM embedding_versions WHERE state = "
                "'active'), d.embedding_version), 0, d.first_seen, d.last_seen FROM deer d "
                "WHERE d.id = %s",
                (new_id, deer_id),
            )
            change = _insert_change(conn, "split", deer_id, new_id, (), wanted, reason)
            _repoint(conn, wanted, new_id, "new_deer")
            centroids, removed = _rebuild(conn, [deer_id, new_id])
        log.info("curation: split deer %d -> new deer %d detections=%d change=%d",
                 deer_id, new_id, len(wanted), change.id)  # fmt: skip
        return ChangeResult(change, True, centroids, removed)

    def move(
        self, detection_ids: Sequence[str], to_deer: int, reason: str | None = None
    ) -> ChangeResult:
        """Move the listed detections (all of one deer) to the existing deer ``to_deer``.
        Detections already there are a no-op; moving every detection of a deer is a merge of
        that deer into ``to_deer`` (its id stays an alias)."""
        to_deer = int(to_deer)
        wanted = _wanted(detection_ids)
        with self._store.session("curation_move") as conn, conn.transaction():
            _lock(conn)
            _require_not_alias(conn, to_deer, "move detections to")
            _require_deer(conn, [to_deer])
            where = _where_are(conn, wanted)
            moving = [d for d in wanted if where[d] != to_deer]
            if not moving:
                return ChangeResult(_last_change_of(conn, to_deer, wanted), False, {}, {})
            sources = sorted({where[d] for d in moving})
            if len(sources) > 1:
                raise CurationRefused(
                    f"refused: the detections belong to deer {', '.join(map(str, sources))}; "
                    "move the detections of one deer at a time"
                )
            source = sources[0]
            if _count(conn, source) == len(moving):  # nothing would be left of the source
                result = _merge(conn, to_deer, source, reason)
                _repoint(conn, moving, to_deer, "moved")
                return result
            change = _insert_change(conn, "move", to_deer, None, [source], moving, reason)
            _repoint(conn, moving, to_deer, "moved")
            centroids, removed = _rebuild(conn, [source, to_deer])
        log.info("curation: moved %d detection(s) from deer %d to %d change=%d",
                 len(moving), source, to_deer, change.id)  # fmt: skip
        return ChangeResult(change, True, centroids, removed)

    # -- confirm ----------------------------------------------------------------------------
    def confirm(
        self, detection_id: str, reason: str | None = None, *, outcome: str = "confirmed"
    ) -> ChangeResult:
        """Mark a detection reviewed where it is: its assignment confirmed, or (``outcome``
        ``new_deer``) confirmed as a deer of its own, which it already is."""
        if outcome not in ("confirmed", "new_deer"):
            raise ValueError(f"outcome must be confirmed or new_deer, not {outcome!r}")
        with self._store.session("curation_confirm") as conn, conn.transaction():
            _lock(conn)
            row = conn.execute(
                "SELECT deer_id, reviewed_at FROM detections WHERE detection_id = %s FOR UPDATE",
                (detection_id,),
            ).fetchone()
            if row is None:
                raise CurationRefused(f"no detection {detection_id!r}")
            deer_id, reviewed = int(row[0]), row[1]
            if reviewed is not None:
                return ChangeResult(_last_change_of(conn, deer_id, [detection_id]), False, {}, {})
            change = _insert_change(conn, "confirm", deer_id, None, (), [detection_id], reason)
            conn.execute(
                "UPDATE detections SET reviewed_at = now(), review_outcome = %s "
                "WHERE detection_id = %s",
                (outcome, detection_id),
            )
        log.info("curation: confirmed detection %s in deer %d change=%d",
                 detection_id, deer_id, change.id)  # fmt: skip
        return ChangeResult(change, True, {}, {})

    # -- the outbox of deer.changes ------------------------------------------------------------
    def unpublished(self) -> list[Change]:
        """Changes not yet acknowledged on the deer.changes topic, in order."""
        with self._store.session("curation_unpublished") as conn:
            rows = conn.execute(
                f"SELECT {CHANGE_COLUMNS} FROM deer_changes WHERE published_at IS NULL ORDER BY id"
            ).fetchall()
        return [change_from_row(r) for r in rows]

    def mark_published(self, change_ids: Sequence[int]) -> None:
        if not change_ids:
            return
        with self._store.session("curation_published") as conn:
            conn.execute(
                "UPDATE deer_changes SET published_at = now() WHERE id = ANY(%s) "
                "AND published_at IS NULL",
                ([int(i) for i in change_ids],),
            )


# -- statements shared by the changes ----------------------------------------------------------
def _merge(
    conn: psycopg.Connection[Any], keep: int, other: int, reason: str | None
) -> ChangeResult:
    """The merge, in the caller's transaction, under the lock."""
    aliases = _alias_rows(conn, [keep, other])
    if keep in aliases:
        survivor, change_id = aliases[keep]
        if survivor == other:
            raise CurationRefused(
                f"refused: deer {keep} was merged into deer {other} (change {change_id}); "
                f"merging {other} into {keep} would make a cycle"
            )
        raise CurationRefused(
            f"refused: deer {keep} was merged away into deer {survivor} (change {change_id}); "
            f"merge into deer {survivor} instead"
        )
    if other in aliases:
        survivor, change_id = aliases[other]
        if survivor == keep:  # done before: a repeat
            return ChangeResult(_change(conn, change_id), False, {}, {})
        raise CurationRefused(
            f"refused: deer {other} was already merged into deer {survivor} (change {change_id})"
        )
    _require_deer(conn, [keep, other])
    moved = _detections_of(conn, other)
    change = _insert_change(conn, "merge", keep, other, (), moved, reason)
    conn.execute("UPDATE detections SET deer_id = %s WHERE deer_id = %s", (keep, other))
    # Flatten: whatever was an alias of `other` is now one of `keep`.
    conn.execute("UPDATE deer_aliases SET deer_id = %s WHERE deer_id = %s", (keep, other))
    conn.execute(
        "INSERT INTO deer_aliases (alias_id, deer_id, change_id) VALUES (%s, %s, %s)",
        (other, keep, change.id),
    )
    centroids, removed = _rebuild(conn, [keep, other])
    conn.execute("DELETE FROM deer WHERE id = %s", (other,))
    log.info("curation: merged deer %d into %d detections=%d change=%d",
             other, keep, len(moved), change.id)  # fmt: skip
    return ChangeResult(change, True, centroids, removed)


def _lock(conn: psycopg.Connection[Any]) -> None:
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (NEW_DEER_LOCK_KEY,))


def _one(conn: psycopg.Connection[Any], query: str, params: Sequence[Any] = ()) -> Any:
    row = conn.execute(query, params).fetchone()  # type: ignore[arg-type]
    assert row is not None
    return row[0]


def _wanted(detection_ids: Sequence[str]) -> list[str]:
    wanted = sorted({str(d) for d in detection_ids})
    if not wanted:
        raise CurationRefused("no detections given")
    return wanted


def _alias_rows(conn: psycopg.Connection[Any], ids: Sequence[int]) -> dict[int, tuple[int, int]]:
    rows = conn.execute(
        "SELECT alias_id, deer_id, change_id FROM deer_aliases WHERE alias_id = ANY(%s)",
        ([int(i) for i in ids],),
    ).fetchall()
    return {int(a): (int(d), int(c)) for a, d, c in rows}


def _require_not_alias(conn: psycopg.Connection[Any], deer_id: int, what: str) -> None:
    survivor = aliases_of(conn, [deer_id]).get(deer_id)
    if survivor is not None:
        raise CurationRefused(
            f"refused: deer {deer_id} was merged into deer {survivor}; {what} deer "
            f"{survivor} instead"
        )


def _require_deer(conn: psycopg.Connection[Any], ids: Sequence[int]) -> None:
    found = {
        int(r[0])
        for r in conn.execute("SELECT id FROM deer WHERE id = ANY(%s)", (list(ids),)).fetchall()
    }
    missing = [i for i in ids if i not in found]
    if missing:
        raise CurationRefused(f"no deer {', '.join(map(str, missing))}")


def _where_are(conn: psycopg.Connection[Any], detection_ids: list[str]) -> dict[str, int]:
    rows = conn.execute(
        "SELECT detection_id, deer_id FROM detections WHERE detection_id = ANY(%s)",
        (detection_ids,),
    ).fetchall()
    where = {r[0]: int(r[1]) for r in rows}
    missing = [d for d in detection_ids if d not in where]
    if missing:
        raise CurationRefused(f"no detection(s) {', '.join(missing[:10])}")
    return where


def _not_of(where: dict[str, int], deer_id: int) -> str:
    others: dict[int, list[str]] = defaultdict(list)
    for detection_id, owner in where.items():
        if owner != deer_id:
            others[owner].append(detection_id)
    parts = [f"{', '.join(ds[:5])} belong to deer {o}" for o, ds in sorted(others.items())]
    return f"refused: not detections of deer {deer_id}: {'; '.join(parts)}"


def _count(conn: psycopg.Connection[Any], deer_id: int) -> int:
    return int(_one(conn, "SELECT count(*) FROM detections WHERE deer_id = %s", (deer_id,)))


def _detections_of(conn: psycopg.Connection[Any], deer_id: int) -> list[str]:
    rows = conn.execute(
        "SELECT detection_id FROM detections WHERE deer_id = %s ORDER BY detection_id",
        (deer_id,),
    ).fetchall()
    return [r[0] for r in rows]


def _insert_change(
    conn: psycopg.Connection[Any],
    kind: str,
    deer_id: int,
    other_id: int | None,
    source_ids: Sequence[int],
    detections: Sequence[str],
    reason: str | None,
) -> Change:
    row = conn.execute(
        "INSERT INTO deer_changes (kind, deer_id, other_id, source_ids, detections, reason) "
        f"VALUES (%s, %s, %s, %s, %s, %s) RETURNING {CHANGE_COLUMNS}",
        (kind, deer_id, other_id, list(source_ids), list(detections), reason),
    ).fetchone()
    assert row is not None
    return change_from_row(row)


def _change(conn: psycopg.Connection[Any], change_id: int) -> Change:
    row = conn.execute(
        f"SELECT {CHANGE_COLUMNS} FROM deer_changes WHERE id = %s", (change_id,)
    ).fetchone()
    assert row is not None
    return change_from_row(row)


def _same_split(
    conn: psycopg.Connection[Any], deer_id: int, new_id: int, wanted: list[str]
) -> Change | None:
    row = conn.execute(
        f"SELECT {CHANGE_COLUMNS} FROM deer_changes WHERE kind = 'split' AND deer_id = %s "
        "AND other_id = %s AND detections = %s ORDER BY id DESC LIMIT 1",
        (deer_id, new_id, wanted),
    ).fetchone()
    return None if row is None else change_from_row(row)


def _last_change_of(
    conn: psycopg.Connection[Any], deer_id: int, detections: Sequence[str]
) -> Change | None:
    """The latest change that put (or confirmed) these detections in ``deer_id``, if any."""
    row = conn.execute(
        f"SELECT {CHANGE_COLUMNS} FROM deer_changes WHERE deer_id = %s AND detections @> %s "
        "ORDER BY id DESC LIMIT 1",
        (deer_id, list(detections)),
    ).fetchone()
    return None if row is None else change_from_row(row)


def _repoint(
    conn: psycopg.Connection[Any], detections: list[str], deer_id: int, outcome: str
) -> None:
    # A person placed them: off the review queue, with what they decided.
    conn.execute(
        "UPDATE detections SET deer_id = %s, reviewed_at = now(), review_outcome = %s "
        "WHERE detection_id = ANY(%s)",
        (deer_id, outcome, detections),
    )


def _rebuild(
    conn: psycopg.Connection[Any], deer: Sequence[int]
) -> tuple[dict[str, list[DeerCentroid]], dict[str, list[int]]]:
    """Every version's centroids of ``deer`` rebuilt from the stored vectors, and their
    sightings recomputed; returns (rebuilt centroids, deer whose centroid is gone) per
    version."""
    ids = sorted({int(i) for i in deer})
    before = conn.execute(
        "DELETE FROM deer_centroids WHERE deer_id = ANY(%s) RETURNING embedding_version, deer_id",
        (ids,),
    ).fetchall()
    centroids: dict[str, list[DeerCentroid]] = defaultdict(list)
    with conn.cursor(binary=True) as cur:
        for version, *rest in cur.execute(_REBUILD, (ids,)).fetchall():
            centroids[version].append(centroid_from_row(rest))
    removed: dict[str, list[int]] = defaultdict(list)
    for version, deer_id in before:
        if all(c.deer_id != deer_id for c in centroids.get(version, [])):
            removed[version].append(int(deer_id))
    conn.execute(_SIGHTINGS, (ids,))
    return (
        {v: sorted(cs, key=lambda c: c.deer_id) for v, cs in centroids.items()},
        {v: sorted(ids_) for v, ids_ in removed.items()},
    )
