"""The batch processor: raw messages in, rows written and events published out.

It knows nothing of the Kafka client that feeds it: a runner hands it a list of
:class:`~streams.batch.SourceMessage` and runs the three stages (``prepare``, ``embed``,
``finish``; ``process`` runs them in a row), and commits the offsets only after ``finish``
returned, that is after the rows are in Postgres and the assignment events acknowledged.
An event that is bad input becomes a dead letter; failures of the database or the broker
raise from ``finish``, so the runner retries that stage without committing.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime

from confluent_kafka import KafkaException

from reid.embedder import Embedder, Embeddings
from reid.matching import Gallery, assign_batch, merge_centroid
from sinks.metrics import StreamMetrics
from sinks.publisher import KafkaPublisher, MessageRejected, PublishError
from sinks.records import DeerCentroid, DetectionRow, StoredAssignment
from sinks.store import NewDeerDeferred, PgStore, StoreUnavailable
from streams import poison
from streams.batch import BatchOutcome, PendingEvent, PreparedBatch, SourceMessage
from streams.dead_letters import DeadLetterSender
from streams.decoding import BatchDecoder
from streams.events import (
    InvalidEvent,
    assignment_event,
)
from streams.gallery import GalleryLoader
from streams.images import ImageSourceUnavailable
from streams.rows import count_flags, detection_rows
from streams.settings import Settings

log = logging.getLogger(__name__)

# What retries a batch (the runners' policy, streams.runners.retry): the database, the broker,
# or a version switch under way. Anything else one event causes is dead-lettered.
DEPENDENCY_FAILURES: tuple[type[Exception], ...] = (
    StoreUnavailable, NewDeerDeferred, PublishError, KafkaException, BufferError,
    ImageSourceUnavailable,
)  # fmt: skip


class BatchProcessor:
    """Parse, decode, embed, match, persist, publish.

    Three stages, each callable from its own thread so that a runner can overlap them
    (``streams.runners.pipeline``): ``prepare`` (parse, decode and crop in a thread pool), ``embed``
    (one forward pass per backbone) and ``finish`` (match, one database transaction, publish;
    the only stage that touches the store, and the one a runner retries after an outage).
    ``process`` runs the three in a row.
    """

    def __init__(
        self,
        settings: Settings,
        embedder: Embedder,
        store: PgStore,
        gallery: GalleryLoader,
        publisher: KafkaPublisher,
        metrics: StreamMetrics,
    ) -> None:
        self.settings = settings
        # Read once per batch by `embed`: swapping it switches the version at a batch boundary.
        self.embedder = embedder
        self.store = store
        self.gallery = gallery
        self.publisher = publisher
        self.metrics = metrics
        self.decoder = BatchDecoder(settings, metrics)
        self.dead_letters = DeadLetterSender(publisher, settings)
        self._batches = itertools.count(1)
        # Per embedding version, its own threshold from the registry (kept current by
        # streams.versions.VersionSwitch); a version without one uses REID_THRESHOLD.
        self.thresholds: dict[str, float] = {}

    def start(self) -> None:
        self.decoder.start()

    def stop(self) -> None:
        self.decoder.stop()

    # -- the batch ------------------------------------------------------------------------
    def process(self, messages: Sequence[SourceMessage]) -> BatchOutcome:
        """All three stages in the calling thread."""
        return self.finish(self.embed(self.prepare(messages)))

    def prepare(self, messages: Sequence[SourceMessage]) -> PreparedBatch:
        """Parse every message and decode the images of the valid ones (no store access)."""
        batch = PreparedBatch(next(self._batches), messages, [], [], [], {})
        # Pinned here: the batch is decoded for this model's input and embedded by it.
        batch.embedder = self.embedder
        if messages:
            self.decoder.fill(batch)
        return batch

    def embed(self, batch: PreparedBatch) -> PreparedBatch:
        """Embed the decoded images with the embedder the batch was prepared for."""
        assert batch.embedder is not None, "prepare() first"
        if batch.pixels is not None:
            with self._stage("embed"):
                batch.vectors = batch.embedder.embed(batch.pixels)
            batch.pixels = None  # not needed any more; free them early
        return batch

    def finish(self, batch: PreparedBatch) -> BatchOutcome:
        """Match, write and publish an embedded batch.

        Raises one of DEPENDENCY_FAILURES when the database or the broker fails; nothing of
        the failed part is committed and calling it again with the same batch is safe.
        Whatever else an event makes fail is that event's problem: the batch is bisected
        (``streams.poison``), the event dead-lettered as ``unprocessable``, the rest written.
        A batch that may not create deer because the version switched is embedded again
        under the new version, once the runner has switched the processor to it.
        """
        if batch.unavailable is not None:  # an image read failed for a passing reason
            self._embed_again(batch)
            if batch.unavailable is not None:
                raise batch.unavailable
        while True:
            try:
                self._settle(batch, poison.pending(batch, poison.units_of(batch)))
                break
            except NewDeerDeferred as err:
                if err.active is None or err.active != self.embedder.embedding_version:
                    raise  # not switched yet (or waiting for a replay): retried by the runner
                self._embed_again(batch)
        outcome = batch.partial or BatchOutcome(batch.batch_id, messages=len(batch.messages))
        self._count(outcome)
        self._log(batch, outcome)
        return outcome

    def _settle(self, batch: PreparedBatch, units: list[poison.Unit]) -> None:
        """Finish ``units`` of the batch together; bisect them when that fails."""
        if not units:
            return
        try:
            part = self._finish_part(poison.part_of(batch, units))
        except DEPENDENCY_FAILURES:
            raise
        except Exception as err:
            self._bisect(batch, units, err)
        else:
            poison.settle(batch, units, part)

    def _bisect(self, batch: PreparedBatch, units: list[poison.Unit], err: Exception) -> None:
        if len(units) > 1:
            log.warning("batch %d: %d events failed together (%s: %s); bisecting",
                        batch.batch_id, len(units), type(err).__name__, err)  # fmt: skip
            half = len(units) // 2
            self._settle(batch, units[:half])
            self._settle(batch, units[half:])
            return
        try:  # a second chance: only an event that keeps failing is dead-lettered
            part = self._finish_part(poison.part_of(batch, units))
        except DEPENDENCY_FAILURES:
            raise
        except Exception as again:
            first = units[0][0]
            log.error("batch %d: event %s[%d]@%d is unprocessable: %s: %s",
                      batch.batch_id, first.topic, first.partition, first.offset,
                      type(again).__name__, again, exc_info=again)  # fmt: skip
            part = self._finish_part(poison.dead_part(batch, units[0], again))
        poison.settle(batch, units, part)

    def _embed_again(self, batch: PreparedBatch) -> None:
        """Prepare and embed the batch's messages again under the processor's embedder."""
        old = batch.embedder.embedding_version if batch.embedder is not None else "?"
        log.info("batch %d: preparing and embedding again under %s (was %s)",
                 batch.batch_id, self.embedder.embedding_version, old)  # fmt: skip
        fresh = self.embed(self.prepare(batch.messages))
        for name in ("invalid", "firsts", "repeats", "undecodable", "embedder", "vectors",
                     "unavailable"):  # fmt: skip
            setattr(batch, name, getattr(fresh, name))

    def _finish_part(self, batch: PreparedBatch) -> BatchOutcome:
        """Match, write and publish (part of) a batch, in one transaction and one flush."""
        outcome = BatchOutcome(batch_id=batch.batch_id, messages=len(batch.messages))
        for message, err in batch.invalid:
            self._dead_letter(message, err, outcome)
        firsts = batch.firsts
        stored = self.store.existing_assignments([p.event.detection_id for p in firsts])
        firsts = self._drop_conflicts(firsts, stored, outcome)
        rejected: dict[str, InvalidEvent] = {}
        fresh: list[PendingEvent] = []
        for item in firsts:
            detection_id = item.event.detection_id
            if detection_id in stored:
                outcome.redelivered += 1
            elif detection_id in batch.undecodable:
                rejected[detection_id] = batch.undecodable[detection_id]
                self._dead_letter(item.message, rejected[detection_id], outcome)
            else:
                fresh.append(item)
        if fresh:
            assert batch.embedder is not None and batch.vectors is not None, "embed() first"
            stored.update(self._match_persist(batch, fresh, outcome))
        kept = {id(p) for p in firsts}
        for item in batch.firsts:
            if id(item) not in kept:  # dropped as a conflict: its repeats are conflicts too
                rejected.setdefault(item.event.detection_id, _stored_elsewhere(item))
        published = [p for p in firsts if p.event.detection_id not in rejected]
        published += self._settle_repeats(batch.firsts, batch.repeats, rejected, outcome)

        self._publish(published, stored, outcome)
        return outcome

    def _log(self, batch: PreparedBatch, outcome: BatchOutcome) -> None:
        offsets = _offset_ranges(batch.messages)
        log.info(
            "batch %d: messages=%d existing=%d new_deer=%d redelivered=%d dead_lettered=%d "
            "offsets=%s",
            outcome.batch_id, outcome.messages, outcome.assigned_existing, outcome.new_deer,
            outcome.redelivered, outcome.dead_lettered, offsets,
            extra={
                "batch_id": outcome.batch_id, "messages": outcome.messages,
                "assigned_existing": outcome.assigned_existing, "new_deer": outcome.new_deer,
                "redelivered": outcome.redelivered, "dead_lettered": outcome.dead_lettered,
                "dead_letter_reasons": outcome.dead_letter_reasons, "offsets": offsets,
            },
        )  # fmt: skip

    def _drop_conflicts(
        self, items: list[PendingEvent], stored: dict[str, StoredAssignment], outcome: BatchOutcome
    ) -> list[PendingEvent]:
        """A stored detection_id arriving with other content is a conflict, not a redelivery."""
        kept = []
        for item in items:
            saved = stored.get(item.event.detection_id)
            if saved is None or saved.content_sha256 in (None, item.digest):
                kept.append(item)
                continue
            self._dead_letter(item.message, _stored_elsewhere(item), outcome)
        return kept

    def _settle_repeats(
        self,
        firsts: list[PendingEvent],
        repeats: list[PendingEvent],
        rejected: dict[str, InvalidEvent],
        outcome: BatchOutcome,
    ) -> list[PendingEvent]:
        """A repeat of a detection_id in one batch shares the fate of its first occurrence
        when the bytes are the same; different content under one id is a conflict."""
        first_by_id = {p.event.detection_id: p for p in firsts}
        same: list[PendingEvent] = []
        for item in repeats:
            first = first_by_id[item.event.detection_id]
            if item.message.value != first.message.value:
                conflict = InvalidEvent(
                    "duplicate_conflict",
                    f"detection_id {item.event.detection_id!r} seen with different content "
                    f"at offset {first.message.offset}",
                )
                self._dead_letter(item.message, conflict, outcome)
            elif item.event.detection_id in rejected:
                self._dead_letter(item.message, rejected[item.event.detection_id], outcome)
            else:
                same.append(item)
        return same

    def _match_persist(
        self, batch: PreparedBatch, items: list[PendingEvent], outcome: BatchOutcome
    ) -> dict[str, StoredAssignment]:
        assert batch.embedder is not None and batch.vectors is not None
        version = batch.embedder.embedding_version
        picked = [p.row for p in items]
        vectors = Embeddings(batch.vectors.resnet[picked], batch.vectors.effnet[picked])
        processed_at = datetime.now(UTC)

        def plan_against(known: Gallery) -> tuple[int, list[DetectionRow]]:
            plan = assign_batch(
                vectors.resnet, vectors.effnet, known,
                threshold=self.thresholds.get(version, self.settings.threshold),
                review_band=self.settings.review_band,
                review_margin=self.settings.review_margin,
                w_resnet=self.settings.weight_resnet, w_effnet=self.settings.weight_effnet,
            )  # fmt: skip
            return len(plan.new_deer), detection_rows(items, plan, vectors, processed_at)

        with self._stage("match"):
            known = self.gallery.load(version)
            new_deer, rows = plan_against(known)

        known_count = [len(known)]

        def replan(others: list[DeerCentroid]) -> tuple[int, list[DetectionRow]]:
            # Deer created by another worker since `known` was read: match against them too
            # (and keep them in memory, so later batches need not re-plan for them again).
            self.metrics.new_deer_rechecks.inc()
            extended = self.gallery.absorb(version, others)
            known_count[0] = len(extended)
            return plan_against(extended)

        with self._stage("persist"):
            result = self.store.write_batch(
                version, new_deer, rows, merge_centroid,
                known_deer_ids=known.deer_ids.tolist(), replan=replan,
                version_gap_s=self.settings.version_gap_s,
            )  # fmt: skip
        self.gallery.put(version, result.centroids)
        self.metrics.known_deer.set(known_count[0] + len(result.new_deer_ids))
        for saved in result.assignments:
            if saved.processed_at != processed_at:
                continue  # stored meanwhile by another worker: counted there
            if saved.is_new_deer:
                outcome.new_deer += 1
            else:
                outcome.assigned_existing += 1
            count_flags(self.metrics, saved)
            if saved.similarity is not None:  # None: a new deer with no candidate at all
                decision = "rejected" if saved.is_new_deer else "accepted"
                self.metrics.match_similarity.labels(decision=decision).observe(saved.similarity)
        return {a.detection_id: a for a in result.assignments}

    def _publish(
        self, items: list[PendingEvent], stored: dict[str, StoredAssignment], outcome: BatchOutcome
    ) -> None:
        with self._stage("publish"):
            failed_at = datetime.now(UTC)
            self.dead_letters.send(outcome.dead_letters, failed_at)
            for item in items:
                saved = stored.get(item.event.detection_id)
                if saved is not None:
                    self.publisher.send(
                        self.settings.topic_assignments, str(saved.deer_id), assignment_event(saved)
                    )
            try:
                self.publisher.flush_confirmed(timeout=30.0)
            except MessageRejected as err:  # a dead letter too large for the broker's topic
                if not self.dead_letters.resend_minimal(err, outcome.dead_letters, failed_at):
                    raise
                self.publisher.flush_confirmed(timeout=30.0)
        now_ms = time.time() * 1000
        for item in items:
            if item.event.detection_id in stored and item.message.timestamp_ms:
                self.metrics.end_to_end_seconds.observe(
                    max(0.0, (now_ms - item.message.timestamp_ms) / 1000)
                )

    def _dead_letter(
        self, message: SourceMessage, err: InvalidEvent, outcome: BatchOutcome
    ) -> None:
        """Record a dead letter; it is sent with the batch's other output, after the commit
        of its rows, so a batch retried after an outage does not send it twice."""
        log.warning(
            "dead letter: reason=%s topic=%s partition=%d offset=%d detail=%s",
            err.reason, message.topic, message.partition, message.offset, err.detail,
            extra={"reason": err.reason, "topic": message.topic,
                   "partition": message.partition, "offset": message.offset},
        )  # fmt: skip
        outcome.dead_letters.append((message, err))

    def _count(self, outcome: BatchOutcome) -> None:
        """Metrics of a batch that went through (a retried attempt counts nothing)."""
        m = self.metrics
        m.events_consumed.inc(outcome.messages)
        m.batch_size.observe(outcome.messages)
        m.batch_fill_ratio.observe(outcome.messages / self.settings.batch_max_size)
        m.batches.inc()
        m.assignments.labels(outcome="existing").inc(outcome.assigned_existing)
        m.assignments.labels(outcome="new").inc(outcome.new_deer)
        for reason, count in outcome.dead_letter_reasons.items():
            m.dead_letters.labels(reason=reason).inc(count)

    def _stage(self, name: str) -> _StageTimer:
        return _StageTimer(self.metrics, name)


class _StageTimer:
    def __init__(self, metrics: StreamMetrics, stage: str) -> None:
        self.histogram = metrics.stage_seconds.labels(stage=stage)

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.histogram.observe(time.perf_counter() - self.t0)


def _stored_elsewhere(item: PendingEvent) -> InvalidEvent:
    return InvalidEvent(
        "duplicate_conflict",
        f"detection_id {item.event.detection_id!r} was stored earlier from other content",
    )


def _offset_ranges(messages: Sequence[SourceMessage]) -> str:
    spans: dict[tuple[str, int], list[int]] = {}
    for m in messages:
        span = spans.setdefault((m.topic, m.partition), [m.offset, m.offset])
        span[0], span[1] = min(span[0], m.offset), max(span[1], m.offset)
    return ",".join(f"{t}[{p}]:{lo}-{hi}" for (t, p), (lo, hi) in sorted(spans.items()))
