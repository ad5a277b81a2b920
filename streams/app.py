"""Wiring: build every long-lived component from the settings, start and stop them in order."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from reid.embedder import Embedder
from sinks.cache import CentroidCache
from sinks.metrics import StreamMetrics
from sinks.pg import StoreUnavailable, describe_dsn, set_default_timeouts
from sinks.publisher import KafkaPublisher
from sinks.redaction import add_secrets
from sinks.store import PgStore
from streams.gallery import GalleryLoader
from streams.health import HealthChecker
from streams.logs import kafka_logs_held
from streams.processor import BatchProcessor
from streams.runners import Runner, build_runner
from streams.runners.retry import RETRY_BACKOFF_S
from streams.settings import Settings
from streams.topics import ensure_stream_topics
from streams.versions import (
    VersionSwitch,
    build_embedder,
    check_embedder,
    embedder_for,
    version_spec,
)

log = logging.getLogger(__name__)

# The two backbones of reid.backbones.Ensemble, for the model info metric.
BACKBONES = "multiscale-resnet50+efficientnet-b0"
# The version poll runs in the consumer's thread: a hung database may not hold it longer
# (the group is served meanwhile; the poll tries again later).
VERSION_POLL_CALL_S = 5.0
# At start-up, one broker metadata request may take this long before the attempt fails
# (creating topics would wait 10 s per attempt on a broker that is down).
STARTUP_PROBE_S = 3.0


class StreamApp:
    """The consumer process: model, store, cache, publisher, metrics and the Kafka loop."""

    def __init__(
        self,
        settings: Settings,
        *,
        serve_metrics: bool = True,
        runner: str = "confluent",
        embedder: Embedder | None = None,
    ) -> None:
        self.settings = settings
        self.serve_metrics = serve_metrics
        # Also when the settings were built in-process rather than by load_settings().
        add_secrets(*settings.secret_values())
        set_default_timeouts(settings.pg_timeouts())
        self.metrics = StreamMetrics()
        # A given embedder is shared (the benchmark runs several apps on one loaded model):
        # the app starts it if needed but leaves it running when it stops.
        self._owns_embedder = embedder is None
        self.embedder = embedder if embedder is not None else build_embedder(settings)
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
            GalleryLoader(
                self.store,
                self.cache,
                self.metrics,
                refresh_s=settings.gallery_refresh_s,
                refresh_margin_s=settings.gallery_refresh_margin_s,
            ),
            self.publisher,
            self.metrics,
        )
        self.consumer: Runner = build_runner(runner, settings, self.processor, self.metrics)
        self.health = self._health_checker()
        self.metrics.gpu_memory_from(_gpu_memory_reader(self.embedder.device))
        self.metrics_port: int | None = None
        self._consuming = False
        self.versions: VersionSwitch | None = None  # set by start()
        # Embedders swapped out, each with the pipeline's submitted count at the swap: it is
        # stopped once every batch submitted before then has left the pipeline.
        self._retired: list[tuple[Embedder, int]] = []

    def _health_checker(self) -> HealthChecker:
        s = self.settings
        # Own connections: probes never touch the batch path's connection or producer.
        # A probe call stuck on a hung server is aborted after the check's own timeout.
        probe_store = PgStore(
            s.database_url.get_secret_value(),
            connect_timeout=min(3.0, s.health_timeout_s),
            call_timeout_s=s.health_timeout_s,
        )
        admin = AdminClient(s.kafka_common())

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
            interval_s=s.health_interval_s, timeout_s=s.health_timeout_s,
        )  # fmt: skip

    def start(self) -> bool:
        """Start everything; waits for the broker and PostgreSQL while they are down (as
        long as it takes, with the outage backoff). False when a stop was requested
        (``consumer.request_stop()``, SIGTERM) before it could start: nothing to run."""
        s = self.settings
        if self.serve_metrics:
            # First, so that /healthz answers (and /readyz says why not) while the model loads.
            self.metrics_port = self.metrics.serve(
                s.metrics_port, s.metrics_host, readiness=self.health.readiness
            )
            log.info("metrics: serving http://%s:%d/metrics", s.metrics_host, self.metrics_port)
        self.health.start()
        with kafka_logs_held():  # one line per attempt, not librdkafka's connection errors
            broker = f"the Kafka broker at {s.kafka_bootstrap_servers}"
            if not self._until_up(broker, self._ensure_topics):
                return False
        database = f"PostgreSQL at {describe_dsn(s.database_url.get_secret_value())}"
        if not self._until_up(database, self._start_store):
            return False
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
        return True

    def _until_up(self, what: str, step: Callable[[], None]) -> bool:
        """Run ``step`` until it stops failing for want of a dependency (StoreUnavailable,
        a broker error), waiting 0.5, 1, 2, 5, then every 10 s between attempts and logging
        one line per failed attempt; False when a stop is requested meanwhile."""
        attempt = 0
        while not self.consumer.stopping:
            try:
                step()
            except (StoreUnavailable, KafkaException) as err:  # a dependency is down
                attempt += 1
                delay = RETRY_BACKOFF_S[min(attempt - 1, len(RETRY_BACKOFF_S) - 1)]
                reason = (str(err).strip() or type(err).__name__).splitlines()[0]
                log.warning("start-up: waiting for %s (attempt %d, next in %.1fs): %s",
                            what, attempt, delay, reason)  # fmt: skip
                deadline = time.monotonic() + delay
                while time.monotonic() < deadline and not self.consumer.stopping:
                    time.sleep(0.05)
                continue
            if attempt:
                log.info("start-up: %s reachable after %d failed attempt(s)", what, attempt)
            return True
        log.info("start-up: stop requested while waiting for %s", what)
        return False

    def _ensure_topics(self) -> None:
        s = self.settings
        # A short metadata request first: on a broker that is down it fails in seconds.
        AdminClient(s.kafka_common()).list_topics(timeout=STARTUP_PROBE_S)
        ensure_stream_topics(s, [s.topic_detections, s.topic_assignments, s.topic_dead_letters])
        # One partition: the order of the topic is the order of the changes (docs/curation.md).
        ensure_stream_topics(s, [s.topic_deer_changes], 1)

    def _start_store(self) -> None:
        """Connect, start the active version's embedder and read what the dashboard shows;
        run again from the top when the database went away in between."""
        self.store.start()
        if self.versions is None:
            self._start_active_version()  # starts the embedder
        self._model_info()
        # From the start, not only after the first batch: the dashboard shows it at once.
        self.metrics.known_deer.set(self.store.deer_count(self.embedder.embedding_version))

    def stop(self) -> None:
        """Stop in reverse order; every step runs even if an earlier one failed."""
        steps = [self.consumer.stop, self.health.stop, self.processor.stop, self.publisher.stop]
        if self.cache is not None:
            steps.append(self.cache.stop)
        steps += [self._stop_versions, self.store.stop, self._probe_store.stop]
        if self._owns_embedder:
            steps.append(self.embedder.stop)
        if self.serve_metrics:
            steps.append(self.metrics.shutdown)
        for step in steps:
            try:
                step()
            except Exception:
                log.exception("app: error while stopping")
        log.info("app: stopped")

    # -- embedding versions (streams.versions) ----------------------------------------------
    def _start_active_version(self) -> None:
        """Start the embedder of the registry's active version (built from its registered
        weights), or else the configured one, registering it as active."""
        s = self.settings
        active = self.store.registry.active()
        rebuilt = (
            active is not None
            and self.embedder.started
            and (self.embedder.embedding_version == active.version)
        )  # an earlier attempt built it
        if active is not None and self._owns_embedder and not rebuilt:
            if self.embedder.started:  # the configured one, started by an earlier attempt
                self.embedder.stop()
            if s.weights_path is not None and str(Path(s.weights_path).resolve()) != (
                active.weights_path or ""
            ):
                log.warning("app: REID_WEIGHTS_PATH is %s but the active embedding version is "
                            "%s (%s); running the active version (reid-stream activate "
                            "switches)", s.weights_path, active.version,
                            active.weights_path or "fallback weights")  # fmt: skip
            self.embedder = embedder_for(s, active)
            self.processor.embedder = self.embedder
        self.embedder.start()
        if active is not None and self._owns_embedder:
            check_embedder(self.embedder, active)
        else:
            info = self.store.registry.register(
                version_spec(s, self.embedder, s.weights_path), activate_if_none=True
            )
            if info.state != "active":
                log.warning("app: embedding version %s is not the active one; switching to "
                            "the active one at the first batch boundary", info.version)  # fmt: skip
        # Its own connection: the batch path's one may be inside a transaction in another
        # thread (the pipelined finish stage) when the runner polls.
        poll_store = PgStore(
            s.database_url.get_secret_value(),
            connect_timeout=min(3.0, s.pg_connect_timeout_s),
            call_timeout_s=VERSION_POLL_CALL_S,
        )
        poll_store.start()
        self.versions = VersionSwitch(
            s, poll_store, self.metrics, self.embedder.embedding_version,
            thresholds=self.processor.thresholds,
        )  # fmt: skip

    def _model_info(self) -> None:
        self.metrics.embedding_info.info(
            {
                "backbones": BACKBONES
                if self.embedder.members == ("msr50", "effb0")
                else "+".join(self.embedder.members),
                "embedding_version": self.embedder.embedding_version,
                "weights_source": self.embedder.source,
                "device": self.embedder.device,
                "precision": self.embedder.precision,
            }
        )

    def between_batches(self) -> str | None:
        """Switch to a newly activated embedding version; returns it when switched, else None.

        The runner calls this from its loop between batches (also when a window was empty),
        in the thread that hands batches to the processor. It is cheap: a clock check, and
        every REID_VERSION_POLL_S one read of the registry. When ``reid-stream activate``
        changed the version, the new embedder is built and the Redis cache warmed in a
        background thread; a later call swaps ``processor.embedder``, so the next batch
        embedded is embedded, matched and written under the new version. The swapped-out
        embedder is stopped once every batch prepared with it has been written (or at stop()).
        """
        if self.versions is None:
            return None
        self._stop_retired()
        new = self.versions.poll()
        if new is None:
            return None
        old = self.processor.embedder
        self.processor.embedder = new
        self.embedder = new
        self.processor.gallery.forget(old.embedding_version)
        if self._owns_embedder:
            self._retired.append((old, self.consumer.batches_submitted))
        self._owns_embedder = True
        self._model_info()
        self.metrics.known_deer.set(self.versions.store.deer_count(new.embedding_version))
        log.info("app: switched embedding version %s -> %s",
                 old.embedding_version, new.embedding_version)  # fmt: skip
        return new.embedding_version

    def _stop_retired(self) -> None:
        """Stop swapped-out embedders that no batch can still use: a batch keeps the embedder
        it was prepared with until it is written, and batches leave the pipeline in order."""
        done = self.consumer.batches_completed
        keep = []
        for embedder, submitted in self._retired:
            if submitted <= done:
                embedder.stop()
            else:
                keep.append((embedder, submitted))
        self._retired = keep

    def _stop_versions(self) -> None:
        versions, self.versions = self.versions, None
        if versions is not None:
            versions.stop()
            versions.store.stop()
        retired, self._retired = self._retired, []
        for embedder, _ in retired:
            embedder.stop()


def _gpu_memory_reader(device: str) -> Callable[[], float]:
    """Bytes held by tensors on the model's GPU, read at scrape time (0 on the CPU)."""
    import torch

    dev = torch.device(device)
    if dev.type != "cuda":
        return lambda: 0.0
    return lambda: float(torch.cuda.memory_allocated(dev))
