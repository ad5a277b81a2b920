"""Merged deer ids and the deer they now are (``deer_aliases``, written by ``sinks.curation``).

A merge keeps the merged-away id as an alias of the survivor, so that anything holding the
old id (a downstream system, a worker's plan made before the merge committed) resolves it
with one look-up: chains are flattened when a survivor is merged in turn.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import psycopg

from sinks.records import CandidateScore, DetectionRow

log = logging.getLogger(__name__)


def aliases_of(conn: psycopg.Connection[Any], deer_ids: Iterable[int]) -> dict[int, int]:
    """{merged id: the deer it is now} for those of ``deer_ids`` that were merged away."""
    ids = sorted({int(i) for i in deer_ids})
    if not ids:
        return {}
    rows = conn.execute(
        "SELECT alias_id, deer_id FROM deer_aliases WHERE alias_id = ANY(%s)", (ids,)
    ).fetchall()
    return {int(a): int(d) for a, d in rows}


def resolve_rows(conn: psycopg.Connection[Any], rows: Sequence[DetectionRow]) -> list[DetectionRow]:
    """Rows planned against deer that were merged away since: pointed at the survivors.

    Called by the batch write under the new-deer lock (which every curation change holds
    exclusively), so no merge can commit between this look-up and the write.
    """
    named = {r.deer_id for r in rows if r.deer_id is not None}
    named |= {c.deer_id for r in rows for c in r.candidates if c.deer_id is not None}
    aliases = aliases_of(conn, named)  # type: ignore[arg-type]
    if not aliases:
        return list(rows)
    out = []
    moved = 0
    for row in rows:
        deer_id = row.deer_id
        if deer_id is not None and deer_id in aliases:
            deer_id = aliases[deer_id]
            moved += 1
        out.append(
            dataclasses.replace(
                row, deer_id=deer_id, candidates=resolve_candidates(row.candidates, aliases)
            )
        )
    if moved:
        log.info("store: %d row(s) planned against merged deer go to the survivors", moved)
    return out


def resolve_candidates(
    candidates: Sequence[CandidateScore], aliases: dict[int, int]
) -> tuple[CandidateScore, ...]:
    """Candidates with merged ids replaced by their survivors; a survivor named twice keeps
    its first (best) score."""
    out: list[CandidateScore] = []
    seen: set[int] = set()
    for c in candidates:
        if c.deer_id is None:
            out.append(c)
            continue
        deer_id = aliases.get(c.deer_id, c.deer_id)
        if deer_id in seen:
            continue
        seen.add(deer_id)
        out.append(dataclasses.replace(c, deer_id=deer_id))
    return tuple(out)
