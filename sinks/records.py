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


@dataclass(frozen=True)
class StoredAssignment:
    """An assignment as stored, read back from the database.

    Built only from the stored row, so that a redelivered detection republishes exactly what
    the first delivery published (floats come back as the ``real`` that was stored).
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
