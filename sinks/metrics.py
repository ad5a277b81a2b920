"""The Prometheus metrics of the stream, in a registry of their own.

Label values that are known in advance are created up front, so that dashboards and alerts
see a zero series from the first scrape instead of no series at all.
"""

from __future__ import annotations

import logging
import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
    start_http_server,
)

log = logging.getLogger(__name__)

STAGES = ("decode", "embed", "match", "persist", "publish", "commit")
OUTCOMES = ("existing", "new")
CACHE_RESULTS = ("hit", "miss")
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# From a fast in-memory stage (ms) to a CPU forward pass of a full batch (tens of seconds).
STAGE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


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
            "reid_model", "The embedding model: version, device, precision.", registry=r
        )
        for stage in STAGES:
            self.stage_seconds.labels(stage=stage)
        for outcome in OUTCOMES:
            self.assignments.labels(outcome=outcome)
        for result in CACHE_RESULTS:
            self.cache_requests.labels(result=result)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve /metrics in a daemon thread; ``port`` 0 picks a free port. Returns the port."""
        if self._server is not None:
            raise RuntimeError("StreamMetrics: already serving")
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        bound = int(self._server.server_address[1])
        log.info("metrics: serving host=%s port=%d", host, bound)
        return bound

    def shutdown(self) -> None:
        server, self._server = self._server, None
        thread, self._thread = self._thread, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)
        log.info("metrics: stopped")

    def render(self) -> bytes:
        """The exposition text, as a scrape would see it."""
        return generate_latest(self.registry)
