"""The broker's share of a lone event's latency: produce to consume, with no model behind it.

The latency rows of the bench run from an event's produce timestamp to its assignment record;
this section measures the first hop alone, for each consumer fetch wait in
``plan.transit_waits_ms`` (``REID_KAFKA_FETCH_WAIT_MS``). On Apache Kafka a fetch held at the
broker is answered as soon as an event arrives, so the rows should not differ; on a broker
that answers only when the wait expires (the embedded one), the first row shows the cost.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import numpy as np
from confluent_kafka import Consumer, Producer

from streams.tools.bench.report import BenchPlan, BenchReport
from streams.tools.bench.stream import FEED_PRODUCER_OPTIONS


def transit_section(report: BenchReport, plan: BenchPlan, settings_for: Any) -> None:
    """One row per fetch wait: p50 / p90 / max ms from produce to consume at 3 events/s."""
    for wait_ms in plan.transit_waits_ms:
        settings = settings_for(kafka_fetch_wait_ms=wait_ms)
        values = np.array(transit_ms(settings, plan.transit_events, rate=3.0))
        report.add("transit", {
            "fetch_wait_ms": wait_ms, "events": len(values), "rate_events_per_s": 3.0,
            "p50_ms": round(float(np.percentile(values, 50)), 1),
            "p90_ms": round(float(np.percentile(values, 90)), 1),
            "max_ms": round(float(values.max()), 1),
        })  # fmt: skip


def transit_ms(settings: Any, events: int, *, rate: float, timeout_s: float = 60.0) -> list[float]:
    """Produce ``events`` small events at ``rate`` (the bench feed's producer settings) to a
    fresh topic and return each one's ms from its produce call to its consume by a consumer
    with the settings' consumer configuration."""
    from streams.topics import ensure_stream_topics

    topic = f"{settings.topic_detections}-transit-{uuid.uuid4().hex[:6]}"
    ensure_stream_topics(settings, [topic])
    consumer = Consumer(settings.consumer_config(f"{settings.group_id}-transit"))
    producer = Producer({**settings.producer_config(), **FEED_PRODUCER_OPTIONS})
    received: list[float] = []
    try:
        consumer.subscribe([topic])
        _produce(producer, topic, 0)  # joins the group before anything is timed
        if not _consume(consumer, 1, time.monotonic() + timeout_s):
            raise TimeoutError(f"bench transit: nothing consumed from {topic}")
        reader = threading.Thread(
            target=lambda: received.extend(
                _consume(consumer, events, time.monotonic() + timeout_s)
            ),
            daemon=True,
        )
        reader.start()
        start = time.perf_counter()
        for i in range(events):
            pause = start + i / rate - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            _produce(producer, topic, i)
        producer.flush(timeout_s)
        reader.join(timeout_s)
    finally:
        consumer.close()
    if len(received) < events:
        raise TimeoutError(f"bench transit: {len(received)} of {events} events consumed")
    return received


def _produce(producer: Producer, topic: str, i: int) -> None:
    producer.produce(topic, repr(time.time() * 1000).encode(), key=f"cam-{i % 8:02d}")
    producer.poll(0)


def _consume(consumer: Consumer, count: int, deadline: float) -> list[float]:
    """Each message's ms since the produce time it carries, until ``count`` arrived. One
    message per call: asking for more makes librdkafka hold the first until the rest came
    or the call's timeout passed, which would be measured as transit."""
    out: list[float] = []
    while len(out) < count and time.monotonic() < deadline:
        for msg in consumer.consume(num_messages=1, timeout=0.2):
            if msg.error() is None:
                out.append(time.time() * 1000 - float(msg.value()))
    return out
