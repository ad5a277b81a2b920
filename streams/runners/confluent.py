"""The confluent-kafka runner: window the input into batches, process, then commit."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from sinks.metrics import StreamMetrics
from streams.batch import BatchOutcome, PreparedBatch, SourceMessage
from streams.processor import BatchProcessor
from streams.runners.lag import LagSampler
from streams.runners.pipeline import Completed, Pipeline, rewind_offsets
from streams.runners.retry import RETRYABLE, retry_delay
from streams.runners.window import WindowPolicy
from streams.settings import Settings

log = logging.getLogger(__name__)

# A revocation waits this long at most for the batches in flight before giving them up.
REVOKE_DRAIN_S = 30.0
# An empty window returns to the loop's housekeeping (commits, lag, version switch) after
# this long, or this long while batches are in flight (so each is committed as it completes).
_IDLE_POLL_S = 0.2
_SETTLE_POLL_S = 0.02
# How long the loop serves the group while the pipeline is full before its housekeeping.
_ROOM_WAIT_S = 2.0


class StreamConsumer:
    """Owns the Kafka consumer and feeds the batch pipeline; offsets are committed, in order,
    only after a batch was fully handled.

    One thread (the caller of ``run``) does everything with the Kafka client: windowing,
    commits, rebalance callbacks, pause/resume. The stages of the batches in flight run in the
    pipeline's threads (``streams.runners.pipeline``).
    """

    def __init__(
        self,
        settings: Settings,
        processor: BatchProcessor,
        metrics: StreamMetrics,
        *,
        group_id: str | None = None,
        pipeline_depth: int | None = None,
    ) -> None:
        self.settings = settings
        self.processor = processor
        self.metrics = metrics
        self.group_id = group_id or settings.group_id
        self._consumer: Consumer | None = None
        self._stop = threading.Event()
        # Partitions revoked since they were last assigned: a batch of theirs stuck on an
        # outage is abandoned (their new owner redoes it).
        self._revoked: set[tuple[str, int]] = set()
        # Offsets of written batches whose commit failed while we kept the partition (e.g.
        # ILLEGAL_GENERATION during a cooperative rebalance): committed on the next pass.
        self._uncommitted: dict[tuple[str, int], int] = {}
        self._abandoned: list[Completed] = []
        self._assigned = False  # partitions were assigned since the loop last resumed them
        self._on_batch: Callable[[BatchOutcome], None] | None = None
        self._between_batches: Callable[[], None] | None = None
        self.lag = LagSampler(metrics, settings.lag_interval_s)
        self.window = WindowPolicy.from_settings(settings)
        depth = pipeline_depth if pipeline_depth is not None else settings.pipeline_depth
        self.pipeline = Pipeline(processor, self._finish_with_retry, depth=depth)

    def start(self) -> None:
        self._consumer = Consumer(self.settings.consumer_config(self.group_id))
        self._consumer.subscribe(
            [self.settings.topic_detections],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        self.pipeline.start()
        log.info(
            "consumer: subscribed topic=%s group=%s batch_max_size=%d batch_max_wait_ms=%d "
            "batch_min_wait_ms=%d pipeline_depth=%d",
            self.settings.topic_detections, self.group_id, self.settings.batch_max_size,
            self.settings.batch_max_wait_ms, self.settings.batch_min_wait_ms, self.pipeline.depth,
        )  # fmt: skip

    def request_stop(self) -> None:
        """Finish the batches in flight, commit them, then leave the loop (safe from signal
        handlers and other threads)."""
        self._stop.set()

    @property
    def batches_submitted(self) -> int:
        return self.pipeline.submitted

    @property
    def batches_completed(self) -> int:
        return self.pipeline.completed

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def stop(self) -> None:
        self.pipeline.stop()
        if self._consumer is not None:
            self._consumer.close()  # leaves the group so partitions move at once
            self._consumer = None

    def run(
        self,
        on_batch: Callable[[BatchOutcome], None] | None = None,
        *,
        between_batches: Callable[[], None] | None = None,
    ) -> None:
        """Consume until ``request_stop()``. ``on_batch`` gets each committed batch's outcome;
        ``between_batches`` is called in this thread between windows (e.g. to switch the
        embedding version: the next batch to be embedded uses the processor's embedder)."""
        assert self._consumer is not None, "start() first"
        self._on_batch = on_batch
        self._between_batches = between_batches
        while not self._stop.is_set():
            if self._assigned:
                # librdkafka keeps a partition's pause across a rebalance: one paused while
                # we served the group and lost, then assigned again, would never be fetched.
                self._assigned = False
                self._consumer.resume(self._consumer.assignment())
            self.lag.maybe_sample(self._consumer, fetching=True)
            self._settle()
            if self._between_batches is not None:
                self._between_batches()
            if self.pipeline.halted:
                self._recover()
                continue
            if not self.pipeline.has_room():
                self._wait_for_room()
                continue
            messages = self._window()
            if messages:
                self.pipeline.submit(messages)
            elif self._uncommitted:
                self._commit(())
        self._drain()

    def _window(self) -> list[SourceMessage]:
        """The next batch, closed by the adaptive window (``streams.runners.window``): up to
        batch_max_size messages; fewer as soon as the model is idle and nothing more is
        buffered; none when nothing came for a short while (the loop then does its
        housekeeping). Batches that complete meanwhile are committed at once."""
        assert self._consumer is not None
        policy = self.window
        messages: list[SourceMessage] = []
        opened = time.monotonic()
        first: float | None = None
        more = False
        while True:
            self._settle()
            since = first if first is not None else opened
            wait = policy.next_wait(
                count=len(messages), waited_s=time.monotonic() - since, more_buffered=more,
                model_idle=self.pipeline.model_idle,
            )  # fmt: skip
            if wait is None:
                return messages
            if not messages:
                # Ask for one, so the call returns as soon as the first event arrives; look up
                # often enough to commit the batches in flight when they complete.
                wait = min(wait, _SETTLE_POLL_S if self.pipeline.in_flight else _IDLE_POLL_S)
            want = policy.max_size - len(messages) if messages else 1
            raw = self._consumer.consume(num_messages=want, timeout=wait)
            if not messages and not raw:
                return messages
            more = len(raw) >= want  # it filled what we asked: the buffer may hold more
            for msg in raw:
                if msg.error() is not None:
                    self._on_error(msg)
                    continue
                messages.append(_source(msg))
            if messages and first is None:
                first = time.monotonic()

    # -- completed batches ----------------------------------------------------------------
    def _settle(self) -> None:
        """Commit the batches that were written, in order; remember the abandoned ones;
        re-raise a stage's unexpected failure (after committing what came before it)."""
        done = self.pipeline.take_completed()
        if not done:
            return
        written = [d for d in done if d.outcome is not None]
        if written:
            self._commit([m for d in written for m in d.messages])
        self._abandoned += [d for d in done if d.outcome is None and d.error is None]
        for d in written:
            if self._on_batch is not None:
                self._on_batch(d.outcome)  # type: ignore[arg-type]
        for d in done:
            if d.error is not None:
                raise d.error

    def _recover(self) -> None:
        """After an abandoned batch: wait until the pipeline is empty, then rewind the
        partitions still owned to their first unwritten offset, and carry on."""
        assert self._consumer is not None
        self._serve_group_until(lambda: self.pipeline.in_flight == 0 or self._stop.is_set())
        if self._stop.is_set():
            return  # the loop ends; nothing abandoned is committed
        self._settle()
        owned = {(tp.topic, tp.partition) for tp in self._consumer.assignment()}
        for (topic, partition), offset in sorted(rewind_offsets(self._abandoned).items()):
            if (topic, partition) not in owned:
                continue  # its new owner starts from the committed offset
            log.warning("consumer: rewinding %s[%d] to offset %d after an abandoned batch",
                        topic, partition, offset)  # fmt: skip
            self._consumer.seek(TopicPartition(topic, partition, offset))
        self._abandoned.clear()
        self.pipeline.resume()

    def _drain(self) -> None:
        """On stop: finish every batch in flight (at most the pipeline depth), commit them."""
        while self.pipeline.in_flight:
            self.pipeline.wait(0.2)
            self._settle()
        self._settle()

    # -- waiting while serving the group --------------------------------------------------
    def _wait_for_room(self) -> None:
        self.pipeline.wait(0.5)
        if not self.pipeline.has_room() and not self.pipeline.halted:
            # Long: an outage keeps the finish stage retrying. Keep answering the group, and
            # come back to the loop now and then: a batch waiting for a version switch is
            # released by the switch, which the loop makes (between_batches).
            until = time.monotonic() + _ROOM_WAIT_S
            self._serve_group_until(
                lambda: self.pipeline.has_room() or self.pipeline.halted or self._stop.is_set()
                or time.monotonic() > until
            )  # fmt: skip

    def _serve_group_until(self, done: Callable[[], bool]) -> None:
        """Poll with every partition paused (heartbeats, rebalances, lag) until ``done()``,
        committing batches as they complete."""
        assert self._consumer is not None
        self._consumer.pause(self._consumer.assignment())
        try:
            while not done():
                self.lag.maybe_sample(self._consumer)  # an outage is when lag matters most
                msg = self._consumer.poll(0.2)
                if msg is not None and msg.error() is None:
                    # From a partition assigned meanwhile: give it back for later.
                    here = TopicPartition(msg.topic(), msg.partition(), msg.offset())
                    self._consumer.seek(here)
                    self._consumer.pause([here])
                self._settle()
        finally:
            self._consumer.resume(self._consumer.assignment())

    # -- the finish stage (pipeline thread) -----------------------------------------------
    def _finish_with_retry(self, batch: PreparedBatch) -> BatchOutcome | None:
        """The batch's outcome, or None when it was abandoned (stop requested, or its
        partitions revoked while an outage kept it from being written)."""
        attempt = 0
        while True:
            try:
                return self.processor.finish(batch)
            except RETRYABLE as err:
                attempt += 1
                delay = retry_delay(self.metrics, attempt, err)
                deadline = time.monotonic() + delay
                while time.monotonic() < deadline and not self._gives_up(batch):
                    time.sleep(0.05)
                if self._stop.is_set():
                    log.warning("consumer: stopping with an unwritten batch; not committing it")
                    return None
                lost = batch.partitions & self._revoked
                if lost:
                    log.warning("consumer: partitions %s revoked during retries; abandoning "
                                "the batch uncommitted", sorted(lost))  # fmt: skip
                    return None

    def _gives_up(self, batch: PreparedBatch) -> bool:
        return self._stop.is_set() or bool(batch.partitions & self._revoked)

    def _commit(self, messages: Sequence[SourceMessage]) -> None:
        """Commit the ends of ``messages`` plus any earlier ends whose commit failed."""
        assert self._consumer is not None
        t0 = time.perf_counter()
        ends = self._uncommitted
        for m in messages:
            key = (m.topic, m.partition)
            ends[key] = max(ends.get(key, -1), m.offset + 1)
        # Partitions that moved to another member are left to it: it redoes their events
        # idempotently, and committing here could move its offsets backwards.
        owned = {(tp.topic, tp.partition) for tp in self._consumer.assignment()}
        for key in [k for k in ends if k not in owned]:
            del ends[key]
        offsets = [TopicPartition(t, p, o) for (t, p), o in sorted(ends.items())]
        if not offsets:
            return
        try:
            self._consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as err:
            # Kept for the next pass: a partition still ours gets its offsets committed then;
            # one that moved is dropped above, and its new owner redoes the events idempotently.
            log.warning("consumer: commit failed, retrying on the next pass: %s", err)
            return
        ends.clear()
        self.metrics.stage_seconds.labels(stage="commit").observe(time.perf_counter() - t0)
        self.metrics.committed()
        self.lag.committed(offsets)

    def _on_error(self, msg: Message) -> None:
        err = msg.error()
        if err.fatal():
            raise KafkaException(err)
        if err.code() != KafkaError._PARTITION_EOF:
            log.warning("consumer: %s", err)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._revoked.difference_update((p.topic, p.partition) for p in partitions)
        self._assigned = True  # resumed by the loop: they are not assigned until we return
        log.info("consumer: assigned %s", _names(partitions))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Runs inside consume()/poll(), in this thread. The partitions are still ours: let
        # the batches in flight finish (one stuck on an outage is abandoned by the finish
        # stage) and commit them, so the new owner starts where we stopped.
        self._forget(partitions)
        deadline = time.monotonic() + REVOKE_DRAIN_S
        while self.pipeline.in_flight and time.monotonic() < deadline:
            self.pipeline.wait(0.1)
            self._settle()
        self._settle()
        log.info("consumer: revoked %s", _names(partitions))

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Already someone else's: nothing to commit, and no reason to wait.
        self._forget(partitions)
        log.warning("consumer: lost %s", _names(partitions))

    def _forget(self, partitions: list[TopicPartition]) -> None:
        self._revoked.update((p.topic, p.partition) for p in partitions)
        for p in partitions:
            self._uncommitted.pop((p.topic, p.partition), None)


def _source(msg: Message) -> SourceMessage:
    kind, ts = msg.timestamp()
    return SourceMessage(
        topic=msg.topic(),
        partition=msg.partition(),
        offset=msg.offset(),
        key=msg.key(),
        value=msg.value(),
        timestamp_ms=ts if kind != 0 and ts > 0 else None,
    )


def _names(partitions: list[TopicPartition]) -> str:
    return ",".join(f"{p.topic}[{p.partition}]" for p in partitions) or "-"
