"""Wiring: build every long-lived component from the settings, start and stop them in order."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from confluent_kafka.admin import AdminClient

from reid.embedder import Embedder
from sinks.cache import CentroidCache
from sinks.metrics import StreamMetrics
from sinks.publisher import KafkaPublisher
from sinks.store import PgStore
from streams.consumer import StreamConsumer
from streams.gallery import GalleryLoader
from streams.health import HealthChecker
from streams.processor import BatchProcessor
from streams.settings import Settings
from streams.topics import ensure_topics

log = logging.getLogger(__name__)

# The two backbones of reid.backbones.Ensemble, for the model info metric.
BACKBONES = "multiscale-resnet50+efficientnet-b0"


def build_embedder(settings: Settings, weights_path: Path | None = None) -> Embedder:
    """The embedder the settings describe (not started); ``weights_path`` overrides theirs."""
    return Embedder(
        weights_path=weights_path if weights_path is not None else settings.weights_path,
        seed=settings.seed,
        input_size=settings.input_size,
        device=settings.device,
        precision=settings.precision,
    )


class StreamApp:
    """The consumer process: model, store, cache, publisher, metrics and the Kafka loop."""

    def __init__(self, settings: Settings, *, serve_metrics: bool = True) -> None:
        self.settings = settings
        self.serve_metrics = serve_metrics
        self.metrics = StreamMetrics()
        self.embedder = build_embedder(settings)
        self.store = PgStore(settings.database_url.get_secret_value())
        redis_url = settings.redis_url.get_secret_value() if settings.redis_url else None
        self.cache = (
            CentroidCache(redis_url, key_prefix=settings.cache_key_prefix) if redis_url else None
        )
        self.publisher = KafkaPublisher(settings.producer_config())
        self.processor = BatchProcessor(
            settings,
            self.embedder,
            self.store,
            GalleryLoader(self.store, self.cache, self.metrics),
            self.publisher,
            self.metrics,
        )
        self.consumer = StreamConsumer(settings, self.processor, self.metrics)
        self.health = self._health_checker()
        self.metrics.gpu_memory_from(_gpu_memory_reader(self.embedder.device))
        self.metrics_port: int | None = None
        self._consuming = False

    def _health_checker(self) -> HealthChecker:
        s = self.settings
        # Own connections: probes never touch the batch path's connection or producer.
        probe_store = PgStore(s.database_url.get_secret_value(), connect_timeout=3.0)
        admin = AdminClient({**s.kafka_common(), "logger": logging.getLogger("streams.health")})

        def postgres() -> None:
            probe_store.start()  # connects, or keeps the connection it has
            probe_store.ping()

        def kafka() -> None:
            admin.list_topics(s.topic_detections, timeout=3.0)

        checks: dict[str, Callable[[], None]] = {"kafka": kafka, "postgres": postgres}
        if self.cache is not None:
            checks["redis"] = self.cache.ping  # reported, not required: the cache is optional
        conditions = {
            "model": lambda: None if self.embedder.started else "model not loaded",
            "consumer": lambda: (
                "draining after a stop request" if self.consumer.stopping
                else None if self._consuming else "not consuming yet"
            ),
        }  # fmt: skip
        self._probe_store = probe_store
        return HealthChecker(
            self.metrics, checks, required={"kafka", "postgres"}, conditions=conditions,
            interval_s=s.health_interval_s,
        )  # fmt: skip

    def start(self) -> None:
        s = self.settings
        if self.serve_metrics:
            # First, so that /healthz answers (and /readyz says why not) while the model loads.
            self.metrics_port = self.metrics.serve(
                s.metrics_port, s.metrics_host, readiness=self.health.readiness
            )
            log.info("metrics: serving http://%s:%d/metrics", s.metrics_host, self.metrics_port)
        self.health.start()
        ensure_topics(
            s.kafka_common(),
            [s.topic_detections, s.topic_assignments, s.topic_dead_letters],
            s.topic_partitions,
        )
        self.embedder.start()
        self.metrics.embedding_info.info(
            {
                "backbones": BACKBONES,
                "embedding_version": self.embedder.embedding_version,
                "weights_source": self.embedder.source,
                "device": self.embedder.device,
                "precision": self.embedder.precision,
            }
        )
        self.store.start()
        # From the start, not only after the first batch: the dashboard shows it at once.
        self.metrics.known_deer.set(self.store.deer_count(self.embedder.embedding_version))
        if self.cache is not None:
            self.cache.start()
        self.publisher.start()
        self.processor.start()
        self.consumer.start()
        self._consuming = True
        log.info(
            "app: started embedding_version=%s device=%s",
            self.embedder.embedding_version,
            self.embedder.device,
        )

    def stop(self) -> None:
        """Stop in reverse order; every step runs even if an earlier one failed."""
        steps = [self.consumer.stop, self.health.stop, self.processor.stop, self.publisher.stop]
        if self.cache is not None:
            steps.append(self.cache.stop)
        steps += [self.store.stop, self._probe_store.stop, self.embedder.stop]
        if self.serve_metrics:
            steps.append(self.metrics.shutdown)
        for step in steps:
            try:
                step()
            except Exception:
                log.exception("app: error while stopping")
        log.info("app: stopped")


def _gpu_memory_reader(device: str) -> Callable[[], float]:
    """Bytes held by tensors on the model's GPU, read at scrape time (0 on the CPU)."""
    import torch

    dev = torch.device(device)
    if dev.type != "cuda":
        return lambda: 0.0
    return lambda: float(torch.cuda.memory_allocated(dev))
