"""One stream run for the benchmark: events fed to a live StreamApp, timed to the last commit."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import Producer

from sinks.metrics import STAGES
from streams.tools.produce import detection_event

log = logging.getLogger(__name__)


def bench_photos(count: int, individuals: int, images: Path | None = None) -> list[bytes]:
    """Detection crops: the given folder's photos (cycled), else synthetic 256 px crops."""
    if images is not None:
        from streams.tools.produce import photos_from

        return [data for _, data in photos_from(images, count)]
    from streams.tools.synthetic import synthetic_photos

    return [data for _, data in synthetic_photos(count, individuals=individuals)]


# What a camera's producer would set: idempotent, and a few ms of lingering to batch.
FEED_PRODUCER_OPTIONS = {"enable.idempotence": True, "linger.ms": 5}


class EventFeed:
    """Publishes detection events and remembers when each was produced (for latency)."""

    def __init__(self, producer_config: dict[str, Any], topic: str, cameras: int = 8) -> None:
        self.topic = topic
        self.cameras = cameras
        self.producer = Producer({**producer_config, **FEED_PRODUCER_OPTIONS})
        self.sent_ms: dict[str, float] = {}
        self._n = 0

    def send(self, photo: bytes) -> str:
        camera = f"cam-{self._n % self.cameras:02d}"
        event = detection_event(photo, camera, detection_id=f"bench-{uuid.uuid4().hex}")
        self._n += 1
        self.sent_ms[event["detection_id"]] = time.time() * 1000
        while True:
            try:
                self.producer.produce(self.topic, json.dumps(event).encode(), key=camera)
                break
            except BufferError:
                self.producer.poll(0.05)
        self.producer.poll(0)
        return event["detection_id"]

    def flush(self) -> None:
        if self.producer.flush(60):
            raise RuntimeError("bench: events not acknowledged by the broker")


# -- one stream run -----------------------------------------------------------------------
@dataclass
class StreamRun:
    events: int
    seconds: float
    batches: int
    assignments_ms: dict[str, float]  # detection_id -> when its assignment record was made
    # Mean ms per batch of the processor's stages over the measured events (reid_stage_*).
    stage_ms: dict[str, float] = field(default_factory=dict)

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else float("nan")


def run_stream(
    settings: Any,
    embedder: Any,
    photos: list[bytes],
    *,
    runner: str,
    rate: float | None = None,
    timeout_s: float = 900.0,
) -> StreamRun:
    """Start an app on ``settings`` (fresh topics and group), wait until it consumes, then
    feed ``photos`` (all at once, or at ``rate`` events/s) and time until all are committed."""
    from streams.app import StreamApp
    from streams.logs import progress_bar
    from streams.topics import ensure_stream_topics, read_topic

    topics = [settings.topic_detections, settings.topic_assignments, settings.topic_dead_letters]
    ensure_stream_topics(settings, topics)
    app = StreamApp(settings, serve_metrics=False, runner=runner, embedder=embedder)
    feed = EventFeed(settings.producer_config(), settings.topic_detections)
    done = threading.Event()
    seen = {"messages": 0, "batches": 0, "target": 1}
    timing: dict[str, float] = {}
    # The measured part only (a terminal only): events through the stream.
    bar = progress_bar(f"bench {runner}", total=len(photos), enabled=False)

    def on_batch(outcome: Any) -> None:
        seen["messages"] += outcome.messages
        seen["batches"] += 1
        bar.update(outcome.messages)
        if seen["messages"] >= seen["target"]:
            timing["end"] = time.perf_counter()
            done.set()

    app.start()
    thread = threading.Thread(target=app.consumer.run, args=(on_batch,), daemon=True)
    thread.start()
    try:
        # One event first: the group is joined, the gallery loaded, every stage warm.
        feed.send(photos[0])
        feed.flush()
        if not done.wait(timeout_s):
            raise TimeoutError(f"bench: {runner} consumed nothing in {timeout_s:.0f}s")
        done.clear()
        warm_up = set(feed.sent_ms)  # its latency is the group join: not the stream's
        stages_before = stage_totals(app.metrics.registry)
        seen.update(messages=0, batches=0, target=len(photos))
        bar = progress_bar(f"bench {runner}", total=len(photos))
        timing["start"] = time.perf_counter()
        for i, photo in enumerate(photos):
            if rate:
                _pace(timing["start"], i, rate)
            feed.send(photo)
        feed.flush()
        if not done.wait(timeout_s):
            raise TimeoutError(f"bench: {runner} did not finish {len(photos)} events in time")
        stage_ms = mean_stage_ms(stages_before, stage_totals(app.metrics.registry))
    finally:
        bar.close()
        app.consumer.request_stop()
        thread.join(60)
        app.stop()
    records = read_topic(
        settings.kafka_common(), settings.topic_assignments, expected=len(photos) + 1,
        timeout_s=60,
    )  # fmt: skip
    made = {}
    for record in records:
        _kind, ts = record.timestamp()
        made[json.loads(record.value())["detection_id"]] = float(ts)
    latency = {d: made[d] - feed.sent_ms[d] for d in made if d in feed.sent_ms and d not in warm_up}
    return StreamRun(
        len(photos), timing["end"] - timing["start"], seen["batches"], latency, stage_ms
    )


# The processor's stages a latency row breaks down: all but the commit, which comes after the
# assignment record that ends the measured latency.
BENCH_STAGES = tuple(stage for stage in STAGES if stage != "commit")


def stage_totals(registry: Any) -> dict[str, tuple[float, float]]:
    """(seconds, batches) so far of each stage's ``reid_stage_duration_seconds``."""
    totals = {}
    for stage in BENCH_STAGES:
        labels = {"stage": stage}
        seconds = registry.get_sample_value("reid_stage_duration_seconds_sum", labels) or 0.0
        count = registry.get_sample_value("reid_stage_duration_seconds_count", labels) or 0.0
        totals[stage] = (seconds, count)
    return totals


def mean_stage_ms(
    before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]
) -> dict[str, float]:
    """Mean ms per batch of each stage between two ``stage_totals``; stages that did not run
    in between are left out."""
    means = {}
    for stage, (seconds, count) in after.items():
        batches = count - before[stage][1]
        if batches > 0:
            means[stage] = round(1000 * (seconds - before[stage][0]) / batches, 1)
    return means


def _pace(start: float, index: int, rate: float) -> None:
    wait = start + index / rate - time.perf_counter()
    if wait > 0:
        time.sleep(wait)
