"""The known deer of an embedding version: Redis first, PostgreSQL on a miss."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from reid.matching import Gallery
from sinks.cache import CacheUnavailable, CentroidCache
from sinks.metrics import StreamMetrics
from sinks.records import DeerCentroid
from sinks.store import PgStore

log = logging.getLogger(__name__)


def to_gallery(centroids: Sequence[DeerCentroid], dim: int = 512) -> Gallery:
    if not centroids:
        return Gallery.empty(dim)
    ordered = sorted(centroids, key=lambda c: c.deer_id)
    return Gallery(
        deer_ids=np.array([c.deer_id for c in ordered], dtype=np.int64),
        resnet=np.stack([c.resnet for c in ordered]).astype(np.float32, copy=False),
        effnet=np.stack([c.effnet for c in ordered]).astype(np.float32, copy=False),
        sightings=np.array([c.sightings for c in ordered], dtype=np.int64),
    )


class GalleryLoader:
    """Reads centroids from the cache, fills gaps from the store, and writes the cache back.

    Redis is only a cache: when it is unreachable the loader reads Postgres and counts the
    fallback; it never fails a batch because of Redis.
    """

    def __init__(self, store: PgStore, cache: CentroidCache | None, metrics: StreamMetrics) -> None:
        self.store = store
        self.cache = cache
        self.metrics = metrics
        # Versions whose cache missed writes while Redis was failing: reloaded in full from
        # Postgres once Redis answers again.
        self._stale: set[str] = set()

    def load(self, version: str) -> Gallery:
        if self.cache is None:
            return to_gallery(self.store.load_centroids(version))
        try:
            if version in self._stale:
                self.cache.invalidate(version)
                self._stale.discard(version)
                log.info("cache: redis is back; reloading version=%s from postgres", version)
            read = self.cache.get_all(version)
        except CacheUnavailable as err:
            self._cache_failed(version, "read", err)
            return to_gallery(self.store.load_centroids(version))
        if read is None:
            centroids = self.store.load_centroids(version)
            self.metrics.cache_requests.labels(result="miss").inc(max(1, len(centroids)))
            self.put(version, centroids, complete=True)
            return to_gallery(centroids)
        centroids = list(read.centroids)
        self.metrics.cache_requests.labels(result="hit").inc(len(centroids))
        if read.missing_ids:
            self.metrics.cache_requests.labels(result="miss").inc(len(read.missing_ids))
            missing = self.store.load_centroids(version, read.missing_ids)
            centroids.extend(missing)
            self.put(version, missing)
        return to_gallery(centroids)

    def put(
        self, version: str, centroids: Sequence[DeerCentroid], *, complete: bool = False
    ) -> None:
        """Write centroids after the database commit; a failure only costs a later miss."""
        if self.cache is None:
            return
        try:
            self.cache.put(version, centroids, complete=complete)
        except CacheUnavailable as err:
            self._cache_failed(version, "write", err)

    def _cache_failed(self, version: str, what: str, err: Exception) -> None:
        self._stale.add(version)
        self.metrics.cache_errors.inc()
        log.warning("cache: %s failed, falling back to postgres: %s", what, err)
