"""Wiring: build every long-lived component from the settings, start and stop them in order."""

from __future__ import annotations

import logging

from reid.embedder import Embedder
from sinks.cache import CentroidCache
from sinks.metrics import StreamMetrics
from sinks.publisher import KafkaPublisher
from sinks.store import PgStore
from streams.consumer import StreamConsumer
from streams.gallery import GalleryLoader
from streams.processor import BatchProcessor
from streams.settings import Settings
from streams.topics import ensure_topics

log = logging.getLogger(__name__)


class StreamApp:
    """The consumer process: model, store, cache, publisher, metrics and the Kafka loop."""

    def __init__(self, settings: Settings, *, serve_metrics: bool = True) -> None:
        self.settings = settings
        self.serve_metrics = serve_metrics
        self.metrics = StreamMetrics()
        self.embedder = Embedder(
            weights_path=settings.weights_path,
            seed=settings.seed,
            input_size=settings.input_size,
            device=settings.device,
            precision=settings.precision,
        )
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
        self.metrics_port: int | None = None

    def start(self) -> None:
        s = self.settings
        ensure_topics(
            s.kafka_common(),
            [s.topic_detections, s.topic_assignments, s.topic_dead_letters],
            s.topic_partitions,
        )
        self.embedder.start()
        self.metrics.embedding_info.info(
            {
                "embedding_version": self.embedder.embedding_version,
                "weights_source": self.embedder.source,
                "device": self.embedder.device,
                "precision": self.embedder.precision,
            }
        )
        self.store.start()
        if self.cache is not None:
            self.cache.start()
        self.publisher.start()
        self.processor.start()
        if self.serve_metrics:
            self.metrics_port = self.metrics.serve(s.metrics_port, s.metrics_host)
            log.info("metrics: serving http://%s:%d/metrics", s.metrics_host, self.metrics_port)
        self.consumer.start()
        log.info(
            "app: started embedding_version=%s device=%s",
            self.embedder.embedding_version,
            self.embedder.device,
        )

    def stop(self) -> None:
        """Stop in reverse order; every step runs even if an earlier one failed."""
        steps = [self.consumer.stop, self.processor.stop, self.publisher.stop]
        if self.cache is not None:
            steps.append(self.cache.stop)
        steps += [self.store.stop, self.embedder.stop]
        if self.serve_metrics:
            steps.append(self.metrics.shutdown)
        for step in steps:
            try:
                step()
            except Exception:
                log.exception("app: error while stopping")
        log.info("app: stopped")
