"""Plain records exchanged between the stream layer and the sinks.

They carry numpy arrays and datetimes only, so the stream layer builds them without knowing
SQL, Redis or Kafka, and the sinks read them without knowing the models.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import numpy as np


@dataclass
class DeerCentroid:
    """One deer's running-mean embedding per backbone (float32 [dim] each) and its sightings."""

    deer_id: int
    resnet: np.ndarray
    effnet: np.ndarray
    sightings: int


@dataclass(frozen=True)
class CandidateScore:
    """A deer a detection was compared with, and the scores: a stored deer (``deer_id``) or,
    in a batch being written, one of its new deer (``new_deer``, an index like
    ``DetectionRow.new_deer``). Read back from the database, ``deer_id`` is always set."""

    deer_id: int | None
    new_deer: int | None
    similarity: float
    score_resnet: float
    score_effnet: float


@dataclass
class DetectionRow:
    """One detection to store, with its assignment.

    Exactly one of ``deer_id`` (an existing deer) and ``new_deer`` (an index 0..k-1 into the
    batch's new deer, which get their ids inside the write transaction) is set.
    """

    detection_id: str
    camera_id: str
    captured_at: datetime
    deer_id: int | None
    new_deer: int | None
    is_new_deer: bool
    similarity: float | None
    score_resnet: float | None
    score_effnet: float | None
    embedding_resnet: np.ndarray
    embedding_effnet: np.ndarray
    bbox: list[float] | None
    confidence: float | None
    species: str | None
    source_topic: str
    source_partition: int
    source_offset: int
    processed_at: datetime
    # SHA-256 of the raw event: a later event under the same detection_id with another
    # digest is a conflict, not a redelivery.
    content_sha256: bytes | None = None
    # The decision was close (reid.matching.review_flag); the deer it was compared with.
    needs_review: bool = False
    candidates: tuple[CandidateScore, ...] = ()
    thumbnail: bytes | None = None  # JPEG of the crop, or None


@dataclass(frozen=True)
class StoredAssignment:
    """An assignment as stored, read back from the database.

    Built only from the stored row, so that a redelivered detection republishes exactly what
    the first delivery published (floats come back as the ``real`` that was stored). After a
    curation change moved the detection (a merge, split or move), ``deer_id`` is the deer it
    belongs to now; the scores and candidates stay those of the match-time decision.
    """

    detection_id: str
    deer_id: int
    is_new_deer: bool
    similarity: float | None
    score_resnet: float | None
    score_effnet: float | None
    embedding_version: str
    camera_id: str
    captured_at: datetime
    processed_at: datetime
    content_sha256: bytes | None = None
    needs_review: bool = False
    candidates: tuple[CandidateScore, ...] = ()


@dataclass
class BatchWriteResult:
    """What one ``PgStore.write_batch`` transaction did.

    ``assignments``: one per input row, in input order (for a detection stored earlier, the row
    as first stored). ``centroids``: the committed centroids of every deer the batch changed,
    for the cache. ``inserted``: rows actually inserted. ``new_deer_ids``: the deer created,
    in the order of their batch index (a new deer whose rows all existed already is not made).
    """

    assignments: list[StoredAssignment]
    centroids: list[DeerCentroid]
    inserted: int
    new_deer_ids: list[int]


@dataclass(frozen=True)
class Change:
    """One curation change (a row of ``deer_changes``; ``sinks.curation``).

    ``deer_id``: the survivor of a merge, the deer split, the target of a move, the deer a
    confirmed detection stays with. ``other_id``: the deer merged away, or the new deer of a
    split. ``source_ids``: where moved detections came from. ``id`` orders the changes and is
    the curation generation that live consumers compare with.
    """

    id: int
    kind: str
    deer_id: int
    other_id: int | None
    source_ids: tuple[int, ...]
    detections: tuple[str, ...]
    reason: str | None
    created_at: datetime
    published_at: datetime | None = None

    @property
    def affected(self) -> tuple[int, ...]:
        """The deer whose detections (so centroids and sightings) the change altered."""
        if self.kind == "confirm":
            return ()
        ids = [self.deer_id, *self.source_ids]
        if self.other_id is not None:
            ids.append(self.other_id)
        return tuple(sorted(set(ids)))

    @property
    def removed(self) -> tuple[int, ...]:
        """The deer that no longer exist after the change (the merged-away one)."""
        return (self.other_id,) if self.kind == "merge" and self.other_id is not None else ()


@dataclass
class ChangeResult:
    """What a curation call did: the change (for a repeat, the earlier change it matched, or
    None if nothing ever had to change), whether this call changed anything, and the
    rebuilt centroids per version with the deer whose centroid of a version is gone (for the
    cache)."""

    change: Change | None
    changed: bool
    centroids: dict[str, list[DeerCentroid]]
    removed: dict[str, list[int]]
