"""The Prometheus metrics of the stream, in a registry of their own.

Label values that are known in advance are created up front, so that dashboards and alerts
see a zero series from the first scrape instead of no series at all. Every label set is
bounded: stages, outcomes, dead-letter reasons and dependencies are fixed lists, and
partitions are bounded by the input topic's partition count.

Rates (events/s, the new-deer rate) are PromQL ``rate()`` of the counters, not metrics of
their own. Values that only the stream can read (GPU memory, which needs torch) are
injected as callables, since this package never imports torch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)

from sinks.http import OpsServer, Readiness

log = logging.getLogger(__name__)

STAGES = ("decode", "embed", "match", "persist", "publish", "commit")
OUTCOMES = ("existing", "new")
CACHE_RESULTS = ("hit", "miss")
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# From a fast in-memory stage (ms) to a CPU forward pass of a full batch (tens of seconds).
STAGE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
FILL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
# Ensemble scores around the default threshold (0.40) are where tuning decisions are made.
SIMILARITY_BUCKETS = (-0.2, 0.0, 0.1, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
DECISIONS = ("accepted", "rejected")


class StreamMetrics:
    """Every metric the stream exports; several instances do not clash (one registry each)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.events_consumed = Counter(
            "reid_events_consumed", "Detection events read from Kafka.", registry=r
        )
        self.batches = Counter("reid_batches", "Batches processed.", registry=r)
        self.batch_size = Histogram(
            "reid_batch_size", "Events per batch.", buckets=BATCH_SIZE_BUCKETS, registry=r
        )
        self.stage_seconds = Histogram(
            "reid_stage_duration_seconds",
            "Wall time of one batch stage.",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.end_to_end_seconds = Histogram(
            "reid_end_to_end_latency_seconds",
            "From the event's produce timestamp to its assignment being acknowledged.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.assignments = Counter(
            "reid_assignments", "Detections assigned, by outcome.", ["outcome"], registry=r
        )
        self.needs_review = Counter(
            "reid_needs_review",
            "Assignments flagged for review (a close decision: docs/curation.md), by outcome.",
            ["outcome"],
            registry=r,
        )
        self.dead_letters = Counter(
            "reid_dead_letters", "Events sent to the dead-letter topic.", ["reason"], registry=r
        )
        self.cache_requests = Counter(
            "reid_cache_requests", "Centroid look-ups in Redis, by result.", ["result"], registry=r
        )
        self.cache_errors = Counter(
            "reid_cache_errors", "Redis failures (fell back to Postgres).", registry=r
        )
        self.store_errors = Counter(
            "reid_store_errors", "Failed batch attempts (store or publish), retried.", registry=r
        )
        self.new_deer_rechecks = Counter(
            "reid_new_deer_rechecks",
            "Batches whose new deer were re-matched against deer created by other workers.",
            registry=r,
        )
        self.known_deer = Gauge(
            "reid_known_deer", "Deer known under the live embedding version.", registry=r
        )
        self.last_commit_timestamp = Gauge(
            "reid_last_commit_timestamp_seconds",
            "Unix time of the last input offset commit.",
            registry=r,
        )
        self.embedding_info = Info(
            "reid_model",
            "The embedding model: backbones, embedding version, weights source, device, precision.",
            registry=r,
        )
        self.batch_fill_ratio = Histogram(
            "reid_batch_fill_ratio",
            "Events per batch divided by the batch size limit (1 = full batches).",
            buckets=FILL_BUCKETS,
            registry=r,
        )
        self.match_similarity = Histogram(
            "reid_match_similarity",
            "Ensemble score of each detection: of the deer it joined (accepted), or of the best "
            "candidate it rejected before creating a new deer (rejected).",
            ["decision"],
            buckets=SIMILARITY_BUCKETS,
            registry=r,
        )
        self.consumer_lag = Gauge(
            "reid_consumer_lag_messages",
            "End offset minus committed offset of each partition this consumer owns.",
            ["topic", "partition"],
            registry=r,
        )
        self.assigned_partitions = Gauge(
            "reid_assigned_partitions", "Input partitions this consumer owns.", registry=r
        )
        self.last_commit_age = Gauge(
            "reid_last_commit_age_seconds",
            "Seconds since the last input offset commit (since the start before the first).",
            registry=r,
        )
        self.dependency_up = Gauge(
            "reid_dependency_up",
            "1 when the last health check reached the dependency, else 0.",
            ["dependency"],
            registry=r,
        )
        self.gpu_memory_bytes = Gauge(
            "reid_gpu_memory_allocated_bytes",
            "Device memory held by tensors of the model's GPU (0 on the CPU).",
            registry=r,
        )
        self.up_since = time.time()
        self._last_commit: float | None = None
        self.last_commit_age.set_function(
            lambda: time.time() - (self._last_commit or self.up_since)
        )
        for stage in STAGES:
            self.stage_seconds.labels(stage=stage)
        for outcome in OUTCOMES:
            self.assignments.labels(outcome=outcome)
            self.needs_review.labels(outcome=outcome)
        for result in CACHE_RESULTS:
            self.cache_requests.labels(result=result)
        for decision in DECISIONS:
            self.match_similarity.labels(decision=decision)
        self._server: OpsServer | None = None

    def committed(self) -> None:
        """Record an input offset commit (the timestamp and the age gauge)."""
        self._last_commit = time.time()
        self.last_commit_timestamp.set(self._last_commit)

    def gpu_memory_from(self, read: Callable[[], float]) -> None:
        """Read GPU memory at scrape time from ``read`` (supplied by the stream)."""
        self.gpu_memory_bytes.set_function(read)

    def serve(self, port: int, host: str = "127.0.0.1", readiness: Readiness | None = None) -> int:
        """Serve /metrics, /healthz and /readyz in a daemon thread; ``port`` 0 picks a free
        port. ``readiness`` answers /readyz (always ready without it). Returns the port."""
        if self._server is not None:
            raise RuntimeError("StreamMetrics: already serving")
        self._server = OpsServer(self.render, readiness, host=host, port=port)
        bound = self._server.start()
        log.info("metrics: serving host=%s port=%d", host, bound)
        return bound

    def shutdown(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.stop()
        log.info("metrics: stopped")

    def render(self) -> bytes:
        """The exposition text, as a scrape would see it."""
        return generate_latest(self.registry)


REPLAY_RESULTS = (
    "stored",  # re-embedded and stored under the replayed version
    "already_stored",  # had a vector of that version already (a second run, or the live one)
    "not_stored",  # in the topic but not in the database (dead-lettered, or not processed yet)
    "invalid",  # failed parsing (it was dead-lettered by the live consumer)
    "conflict",  # a detection_id stored from other content (a dead-lettered duplicate)
    "undecodable",  # its image could not be read or decoded now
)
REPLAY_STAGES = ("decode", "embed", "persist", "commit")


class ReplayMetrics(StreamMetrics):
    """The stream's metrics plus those of ``reid-stream replay`` (``reid_replay_*``)."""

    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self.replay_events = Counter(
            "reid_replay_events", "Detection events read by a replay, by result.", ["result"],
            registry=r,
        )  # fmt: skip
        self.replay_batches = Counter("reid_replay_batches", "Replay batches stored.", registry=r)
        self.replay_stage_seconds = Histogram(
            "reid_replay_stage_duration_seconds", "Wall time of one replay batch stage.",
            ["stage"], buckets=STAGE_BUCKETS, registry=r,
        )  # fmt: skip
        self.replay_remaining = Gauge(
            "reid_replay_remaining_events",
            "Events between the replay's position and its end (the live group's committed "
            "offsets, else the partition ends).",
            registry=r,
        )
        self.replay_rate = Gauge(
            "reid_replay_events_per_second", "Replay rate over the run so far.", registry=r
        )
        for result in REPLAY_RESULTS:
            self.replay_events.labels(result=result)
        for stage in REPLAY_STAGES:
            self.replay_stage_seconds.labels(stage=stage)
