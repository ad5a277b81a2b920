"""The rows a batch writes: one ``DetectionRow`` per fresh detection, from the matching plan,
with its review flag, the deer it was compared with (candidates) and its crop's thumbnail.

Kept beside the processor (``streams.processor``), which calls ``detection_rows`` each time it
plans a batch (again after a re-plan under the new-deer lock) and ``count_flags`` once the
batch's rows are committed.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from reid.embedder import Embeddings
from reid.matching import BatchAssignment, Candidate
from sinks.metrics import StreamMetrics
from sinks.records import CandidateScore, DetectionRow, StoredAssignment
from streams.batch import PendingEvent


def candidate_scores(candidates: Sequence[Candidate]) -> tuple[CandidateScore, ...]:
    return tuple(
        CandidateScore(c.deer_id, c.new_deer, c.similarity, c.score_resnet, c.score_effnet)
        for c in candidates
    )


def detection_rows(
    items: list[PendingEvent], plan: BatchAssignment, vectors: Embeddings, processed_at: datetime
) -> list[DetectionRow]:
    rows = []
    for i, (item, match) in enumerate(zip(items, plan.matches, strict=True)):
        event, message = item.event, item.message
        rows.append(
            DetectionRow(
                detection_id=event.detection_id,
                camera_id=event.camera_id,
                captured_at=event.captured_at,
                deer_id=match.deer_id,
                new_deer=match.new_deer if match.deer_id is None else None,
                is_new_deer=match.is_new_deer,
                similarity=match.similarity,
                score_resnet=match.score_resnet,
                score_effnet=match.score_effnet,
                embedding_resnet=vectors.resnet[i],
                embedding_effnet=vectors.effnet[i],
                bbox=list(event.bbox) if event.bbox else None,
                confidence=event.confidence,
                species=event.species,
                source_topic=message.topic,
                source_partition=message.partition,
                source_offset=message.offset,
                processed_at=processed_at,
                content_sha256=item.digest,
                needs_review=match.needs_review,
                candidates=candidate_scores(match.candidates),
                thumbnail=item.thumbnail,
            )
        )
    return rows


def count_flags(metrics: StreamMetrics, saved: StoredAssignment) -> None:
    """``reid_needs_review_total{outcome}`` for a row this batch inserted."""
    if saved.needs_review:
        outcome = "new" if saved.is_new_deer else "existing"
        metrics.needs_review.labels(outcome=outcome).inc()
