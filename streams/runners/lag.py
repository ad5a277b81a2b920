"""Consumer lag per partition: the partition's end offset minus the group's committed offset.

Sampled from the consumer's own thread every ``interval_s``. While the consumer fetches, the
end offsets are the ones librdkafka keeps from its fetch responses (``cached``: no broker
round trip; asking the embedded broker for four partitions stalled the loop about 1.5 s every
sample, the whole p99 of the latency benchmark). While the partitions are paused (an outage,
when lag matters most) nothing is fetched, so the broker is asked. Only partitions this member
owns are exported, so summing over the group's members counts each partition once.

On the embedded tansu broker the high watermark is wrong (the start of the last record batch
+ 1), so these values are wrong there; on Apache Kafka they are exact.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from confluent_kafka import Consumer, KafkaException, TopicPartition

from sinks.metrics import StreamMetrics

log = logging.getLogger(__name__)


class LagSampler:
    def __init__(self, metrics: StreamMetrics, interval_s: float = 5.0) -> None:
        self.metrics = metrics
        self.interval_s = interval_s
        self._committed: dict[tuple[str, int], int] = {}
        self._exported: set[tuple[str, int]] = set()
        self._next = 0.0

    def committed(self, offsets: Iterable[TopicPartition]) -> None:
        """Offsets this member just committed (saves asking the broker for them)."""
        for tp in offsets:
            self._committed[(tp.topic, tp.partition)] = tp.offset

    def maybe_sample(self, consumer: Consumer, *, fetching: bool = False) -> None:
        """Sample when the interval is over; ``fetching``: the consumer is fetching every
        partition it owns, so the end offsets cached from its fetches are current."""
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self.interval_s
        try:
            self._sample(consumer, cached=fetching)
        except KafkaException as err:  # a broker hiccup costs one sample, not the batch
            log.debug("lag: sample failed: %s", err)

    def _sample(self, consumer: Consumer, *, cached: bool) -> None:
        owned = {(tp.topic, tp.partition) for tp in consumer.assignment()}
        self.metrics.assigned_partitions.set(len(owned))
        for key in self._exported - owned:  # moved to another member: its series, not ours
            self.metrics.consumer_lag.remove(key[0], str(key[1]))
            self._committed.pop(key, None)
        self._exported &= owned
        unknown = [TopicPartition(t, p) for t, p in sorted(owned - self._committed.keys())]
        if unknown:
            # Committed by an earlier owner of the partition (or never: a negative offset).
            for tp in consumer.committed(unknown, timeout=2.0):
                if tp.error is None:
                    self._committed[(tp.topic, tp.partition)] = tp.offset
        for key in sorted(owned):
            low, high = consumer.get_watermark_offsets(
                TopicPartition(*key), timeout=2.0, cached=cached
            )
            if high < 0:  # nothing fetched from it yet: no cached end offset
                continue
            committed = self._committed.get(key, -1)
            start = committed if committed >= 0 else low  # auto.offset.reset=earliest
            self.metrics.consumer_lag.labels(topic=key[0], partition=str(key[1])).set(
                max(0, high - start)
            )
            self._exported.add(key)
