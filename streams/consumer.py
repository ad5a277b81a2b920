"""The confluent-kafka runner: window the input into batches, process, then commit."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from sinks.metrics import StreamMetrics
from sinks.publisher import PublishError
from sinks.store import StoreUnavailable
from streams.lag import LagSampler
from streams.processor import BatchOutcome, BatchProcessor, SourceMessage
from streams.settings import Settings

log = logging.getLogger(__name__)

RETRY_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)


class StreamConsumer:
    """Owns the Kafka consumer; offsets are committed only after a batch was fully handled."""

    def __init__(
        self,
        settings: Settings,
        processor: BatchProcessor,
        metrics: StreamMetrics,
        *,
        group_id: str | None = None,
    ) -> None:
        self.settings = settings
        self.processor = processor
        self.metrics = metrics
        self.group_id = group_id or settings.group_id
        self._consumer: Consumer | None = None
        self._stop = threading.Event()
        self._revoked: set[tuple[str, int]] = set()
        # Offsets of written batches whose commit failed while we kept the partition (e.g.
        # ILLEGAL_GENERATION during a cooperative rebalance): committed on the next pass.
        self._uncommitted: dict[tuple[str, int], int] = {}
        self.lag = LagSampler(metrics, settings.lag_interval_s)

    def start(self) -> None:
        self._consumer = Consumer(self.settings.consumer_config(self.group_id), logger=log)
        self._consumer.subscribe(
            [self.settings.topic_detections],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_revoke,
        )
        log.info(
            "consumer: subscribed topic=%s group=%s batch_max_size=%d batch_max_wait_ms=%d",
            self.settings.topic_detections, self.group_id, self.settings.batch_max_size,
            self.settings.batch_max_wait_ms,
        )  # fmt: skip

    def request_stop(self) -> None:
        """Finish the batch in hand, commit it, then leave the loop (safe from signal handlers)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def stop(self) -> None:
        if self._consumer is not None:
            self._consumer.close()  # leaves the group so partitions move at once
            self._consumer = None

    def run(self, on_batch: Callable[[BatchOutcome], None] | None = None) -> None:
        assert self._consumer is not None, "start() first"
        while not self._stop.is_set():
            self.lag.maybe_sample(self._consumer)
            messages = self._window()
            if not messages:
                if self._uncommitted:
                    self._commit(())
                continue
            outcome = self._process_with_retry(messages)
            if outcome is None:
                continue  # abandoned, uncommitted: redelivered to whoever owns the partitions
            self._commit(messages)
            if on_batch is not None:
                on_batch(outcome)

    def _window(self) -> list[SourceMessage]:
        """Up to batch_max_size messages, or fewer once batch_max_wait_ms has passed."""
        assert self._consumer is not None
        raw = self._consumer.consume(
            num_messages=self.settings.batch_max_size,
            timeout=self.settings.batch_max_wait_ms / 1000,
        )
        messages = []
        for msg in raw:
            if msg.error() is not None:
                self._on_error(msg)
                continue
            messages.append(_source(msg))
        return messages

    def _process_with_retry(self, messages: Sequence[SourceMessage]) -> BatchOutcome | None:
        """The batch's outcome, or None when it was abandoned (stop requested, or its
        partitions revoked while an outage kept it from being written)."""
        self._revoked.clear()
        attempt = 0
        while True:
            try:
                return self.processor.process(messages)
            except (StoreUnavailable, PublishError, KafkaException) as err:
                self.metrics.store_errors.inc()
                delay = RETRY_BACKOFF_S[min(attempt, len(RETRY_BACKOFF_S) - 1)]
                attempt += 1
                log.error("batch failed (attempt %d), retrying in %.1fs: %s", attempt, delay, err)
                self._wait_serving_group(delay)
                if self._stop.is_set():
                    log.warning("consumer: stopping with an unwritten batch; not committing it")
                    return None
                lost = {(m.topic, m.partition) for m in messages} & self._revoked
                if lost:
                    log.warning("consumer: partitions %s revoked during retries; abandoning "
                                "the batch uncommitted", sorted(lost))  # fmt: skip
                    return None

    def _wait_serving_group(self, seconds: float) -> None:
        """Sleep while still answering the group (heartbeats, rebalances), fetching nothing."""
        assert self._consumer is not None
        deadline = time.monotonic() + seconds
        self._consumer.pause(self._consumer.assignment())
        try:
            while not self._stop.is_set() and (left := deadline - time.monotonic()) > 0:
                self.lag.maybe_sample(self._consumer)  # an outage is when lag matters most
                msg = self._consumer.poll(min(0.2, left))
                if msg is not None and msg.error() is None:
                    # From a partition assigned during the wait: give it back for later.
                    here = TopicPartition(msg.topic(), msg.partition(), msg.offset())
                    self._consumer.seek(here)
                    self._consumer.pause([here])
        finally:
            self._consumer.resume(self._consumer.assignment())

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
        log.info("consumer: assigned %s", _names(partitions))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Callbacks run inside consume()/poll(): between batches, or while a batch waits out
        # an outage, in which case the retry loop sees the revocation and abandons it.
        self._revoked.update((p.topic, p.partition) for p in partitions)
        for p in partitions:
            self._uncommitted.pop((p.topic, p.partition), None)
        log.info("consumer: revoked %s", _names(partitions))


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
