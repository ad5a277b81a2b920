"""The known deer of each embedding version, held in memory as one matrix per backbone.

Why: matching is one matmul against every known deer. Reading every centroid from Redis for
each batch cost more than the matmul itself (about 18 ms per 10k deer plus decoding, so
seconds at 100k). So a worker reads a version once and then keeps it up to date:

- **load once**: the first ``load(version)`` reads every centroid, Redis first, Postgres for
  what Redis lacks (a cold version, a lost key), each miss counted in the cache metrics;
  a cold version read from Postgres is written back to Redis as a complete load.
- **its own batches**: ``put(version, centroids)`` after each commit writes the committed
  centroids into the matrices in place (new deer appended; capacity doubles, so appends are
  amortised O(1)) and into Redis for the other workers.
- **the other workers' batches**: at most every ``refresh_s`` seconds, ``load`` asks Postgres
  (the truth) for the centroids written since the previous read: ``deer_centroids.updated_at``
  newer than the server time of that read minus ``refresh_margin_s``. ``updated_at`` is the
  writing transaction's *start* time, so a row can commit after a read with a time before it;
  the margin (default 60 s, far longer than a batch transaction or its wait for the new-deer
  lock) catches those. ``deer_centroids (embedding_version, updated_at)`` is indexed, so a
  refresh reads only the changed rows (0.3 ms when nothing changed, at 100k deer). Rows seen
  twice are harmless: a centroid replaces the held one only if its count (sightings) is not
  lower, so a stale copy never undoes a newer one (counts only grow). All times are the
  database server's, so worker clocks do not matter.
- **what Redis may have missed**: a load served by a warm Redis is followed at once by a
  refresh that looks back ``redis_lookback_s`` (the cache's complete-flag lifetime, 600 s, see
  ``sinks.cache``): the version was last loaded into Redis in full within that time, so every
  write Redis may have lost since (a worker killed between its commit and its cache write, two
  workers' cache writes of one deer crossing) is re-read from Postgres.

- **curation changes** (merges, splits, moves: ``sinks.curation``): every ``load`` first asks
  Postgres for the changes after the curation generation its memory reflects (one index
  range read, empty in the common case) and re-reads the centroids of the deer they touched,
  replacing the held ones whatever their count (a split lowers it) and dropping the deer that
  no longer have one (merged away). So a worker sees a change before its next batch, and a
  merged deer never lives on in its memory. A load from Redis also drops every merged id
  (a worker's late cache write may have put one back there) and re-applies the changes made
  within ``redis_lookback_s``.

Correctness does not depend on the refresh: ``PgStore.write_batch`` re-checks, under the
new-deer advisory lock, every deer the caller did not know before creating one. The refresh
only keeps such re-plans rare and the scores current.

Redis stays a cache: a failed read falls back to Postgres; a failed write marks the version
stale and is counted (``reid_cache_errors_total``). While it is stale no further writes are
tried; each ``load`` instead tries to drop the version from Redis (at most one Redis timeout
per batch). Once that succeeds, Redis answers again: the version is reloaded from Postgres
and written back to Redis in full (in chunks, the complete flag last: one 400 MB transaction
would outlast the socket timeout). ``reid_cache_requests_total{result}`` counts centroids read
during (re)loads: ``hit`` from Redis, ``miss`` read from Postgres instead. Batches match against
memory and look nothing up.

A loader belongs to one consumer thread (like ``PgStore``'s connection). The ``Gallery`` that
``load`` returns is a view of the matrices, valid until the next ``put``/``load``/``absorb``
of that version: those update rows in place.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np

from reid.matching import Gallery
from sinks.cache import CacheUnavailable, CentroidCache
from sinks.curation_reads import changes_since, generation, merged_ids
from sinks.gallery_reads import changed_since, server_now
from sinks.metrics import StreamMetrics
from sinks.records import DeerCentroid
from sinks.store import PgStore, StoreUnavailable

log = logging.getLogger(__name__)

# Centroids per Redis write (about 4 KiB each): well within the cache's socket timeout.
CACHE_WRITE_CHUNK = 1000


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


class GalleryMatrix:
    """Growable matrices of one version's deer: rows ``[0, len)`` are live, in arrival order
    (a load arrives in id order), with an id -> row index."""

    def __init__(self, dim: int = 512, capacity: int = 1024) -> None:
        self.dim = dim
        capacity = max(1, capacity)
        self._ids = np.zeros(capacity, dtype=np.int64)
        self._resnet = np.zeros((capacity, dim), dtype=np.float32)
        self._effnet = np.zeros((capacity, dim), dtype=np.float32)
        self._sightings = np.zeros(capacity, dtype=np.int64)
        self._row: dict[int, int] = {}
        self._n = 0

    def __len__(self) -> int:
        return self._n

    @property
    def capacity(self) -> int:
        return len(self._ids)

    def view(self) -> Gallery:
        """The live rows, without copying (see the module docstring on how long it holds)."""
        n = self._n
        return Gallery(self._ids[:n], self._resnet[:n], self._effnet[:n], self._sightings[:n])

    def get(self, deer_id: int) -> DeerCentroid | None:
        row = self._row.get(int(deer_id))
        if row is None:
            return None
        return DeerCentroid(
            int(deer_id),
            self._resnet[row].copy(),
            self._effnet[row].copy(),
            int(self._sightings[row]),
        )

    def centroids(self) -> list[DeerCentroid]:
        """Every held centroid (copies), by id."""
        return [c for i in sorted(self._row) if (c := self.get(i)) is not None]

    def upsert(self, centroids: Sequence[DeerCentroid], *, force: bool = False) -> tuple[int, int]:
        """Write ``centroids`` in: unknown ids are appended (in id order), known ids are
        replaced in place unless the held count (sightings) is higher (``force``: whatever
        it is; a curation change may lower it). Returns (added, replaced)."""
        fresh: dict[int, DeerCentroid] = {}
        replaced = 0
        for c in centroids:
            deer_id = int(c.deer_id)
            row = self._row.get(deer_id)
            if row is None:
                held = fresh.get(deer_id)
                if held is None or c.sightings >= held.sightings:
                    fresh[deer_id] = c
                continue
            if c.sightings < self._sightings[row] and not force:
                continue  # an older copy (a late cache write, a stale read): keep the newer
            resnet, effnet = self._checked(c.resnet, deer_id), self._checked(c.effnet, deer_id)
            self._resnet[row], self._effnet[row] = resnet, effnet
            self._sightings[row] = c.sightings
            replaced += 1
        if fresh:
            self._append([fresh[i] for i in sorted(fresh)])
        return len(fresh), replaced

    def remove(self, deer_ids: Sequence[int]) -> int:
        """Drop deer (merged away): the last live row moves into each hole. Returns how
        many were held."""
        removed = 0
        for deer_id in deer_ids:
            row = self._row.pop(int(deer_id), None)
            if row is None:
                continue
            last = self._n - 1
            if row != last:
                for array in (self._ids, self._resnet, self._effnet, self._sightings):
                    array[row] = array[last]
                self._row[int(self._ids[row])] = row
            self._n = last
            removed += 1
        return removed

    def _append(self, ordered: list[DeerCentroid]) -> None:
        k, start = len(ordered), self._n
        self._reserve(start + k)
        stop = start + k
        for name, out in (("resnet", self._resnet), ("effnet", self._effnet)):
            vectors = [self._checked(getattr(c, name), c.deer_id) for c in ordered]
            np.stack(vectors, out=out[start:stop])
        self._ids[start:stop] = [int(c.deer_id) for c in ordered]
        self._sightings[start:stop] = [int(c.sightings) for c in ordered]
        self._row.update((int(c.deer_id), start + j) for j, c in enumerate(ordered))
        self._n = stop

    def _reserve(self, needed: int) -> None:
        capacity = self.capacity
        if needed <= capacity:
            return
        while capacity < needed:
            capacity *= 2
        n = self._n
        # New arrays rather than resizing in place: views handed out earlier stay valid.
        for name in ("_ids", "_resnet", "_effnet", "_sightings"):
            old = getattr(self, name)
            new = np.zeros((capacity, *old.shape[1:]), dtype=old.dtype)
            new[:n] = old[:n]
            setattr(self, name, new)

    def _checked(self, vector: np.ndarray, deer_id: int) -> np.ndarray:
        v = np.asarray(vector, dtype=np.float32).reshape(-1)
        if v.shape != (self.dim,):
            raise ValueError(f"deer {deer_id}: centroid has {v.shape} values, want {self.dim}")
        return v


@dataclass
class _Held:
    """One version in memory, and when it was last read from the shared stores."""

    matrix: GalleryMatrix
    watermark: datetime  # server time before the last read from Postgres or Redis
    next_refresh: float  # monotonic
    generation: int = 0  # the last curation change reflected in memory


class GalleryLoader:
    """The in-memory galleries of the versions a worker uses (see the module docstring).

    ``refresh_s``: at most this often a ``load`` reads what other workers changed (0: every
    ``load``); ``refresh_margin_s``: how far before the previous read it looks back;
    ``redis_lookback_s``: how far back the refresh after a load from Redis looks (the cache's
    ``complete_ttl_s``; None: such a load re-reads every centroid from Postgres).
    """

    def __init__(
        self,
        store: PgStore,
        cache: CentroidCache | None,
        metrics: StreamMetrics,
        *,
        refresh_s: float = 5.0,
        refresh_margin_s: float = 60.0,
        redis_lookback_s: float | None = 600.0,
        dim: int = 512,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.cache = cache
        self.metrics = metrics
        self.refresh_s = refresh_s
        self.refresh_margin = timedelta(seconds=refresh_margin_s)
        self.redis_lookback = (
            None if redis_lookback_s is None else timedelta(seconds=redis_lookback_s)
        )
        self.dim = dim
        self._clock = clock
        self._held: dict[str, _Held] = {}
        # Versions whose cache writes failed: Redis may hold stale centroids for them until
        # it answers again and they are dropped there and reloaded from Postgres.
        self._stale: set[str] = set()

    # -- the processor's calls ------------------------------------------------------------
    def load(self, version: str) -> Gallery:
        """The known deer of ``version``: read once, then refreshed (see the module)."""
        held = self._held.get(version)
        if version in self._stale and self._redis_back(version):
            held = self._full_load(version, held)
        elif held is None:
            held = self._full_load(version, None)
        elif self._clock() >= held.next_refresh:
            self.refresh(version)
        self._follow_curation(version, held)
        return held.matrix.view()

    def put(
        self, version: str, centroids: Sequence[DeerCentroid], *, complete: bool = False
    ) -> None:
        """Committed centroids: into memory (if the version is held) and Redis; a Redis
        failure only marks the version stale (see the module)."""
        held = self._held.get(version)
        if held is not None and centroids:
            held.matrix.upsert(centroids)
        self._cache_put(version, centroids, complete=complete)

    def absorb(self, version: str, centroids: Sequence[DeerCentroid]) -> Gallery:
        """Committed centroids read by the caller itself (e.g. the deer ``write_batch`` found
        under its lock): into memory only, returning the updated view. Deer new to memory come
        after the earlier rows, in id order, like ``Gallery.extended(to_gallery(...))``."""
        held = self._held.get(version)
        if held is None:
            held = self._full_load(version, None)
        held.matrix.upsert(centroids)
        return held.matrix.view()

    def forget(self, version: str) -> None:
        """Drop ``version`` from memory (a later ``load`` reads it again). Redis is left alone;
        a version still marked stale there is dropped from Redis before it is read again."""
        if self._held.pop(version, None) is not None:
            log.info("gallery: forgot version=%s", version)

    def versions(self) -> list[str]:
        """The versions held in memory."""
        return sorted(self._held)

    def refresh(self, version: str) -> tuple[int, int]:
        """Read what changed in Postgres since the last read of a held version; (added,
        replaced). A failed read keeps memory as it is and is tried again later."""
        held = self._held[version]
        held.next_refresh = self._clock() + self.refresh_s
        t0 = time.perf_counter()
        try:
            changed, watermark = changed_since(
                self.store, version, held.watermark - self.refresh_margin
            )
        except StoreUnavailable as err:
            log.warning("gallery: refresh of version=%s failed, keeping memory: %s", version, err)
            return 0, 0
        added, replaced = held.matrix.upsert(changed)
        held.watermark = watermark
        log.debug(
            "gallery: refreshed version=%s read=%d added=%d replaced=%d deer=%d ms=%.1f",
            version, len(changed), added, replaced, len(held.matrix),
            (time.perf_counter() - t0) * 1000,
        )  # fmt: skip
        return added, replaced

    # -- reads ----------------------------------------------------------------------------
    def _full_load(self, version: str, held: _Held | None) -> _Held:
        """Every centroid of ``version`` into memory (into ``held``'s matrix if given: Postgres
        is at least as new as anything held, and a lower count never replaces a higher)."""
        t0 = time.perf_counter()
        watermark = server_now(self.store)  # before reading: see changed_since
        reflected = generation(self.store)  # likewise: later changes are applied after
        centroids, from_redis = self._read_all(version)
        if held is not None:
            matrix = held.matrix
        else:  # room to grow before the first doubling (which copies every row once)
            matrix = GalleryMatrix(self.dim, len(centroids) + max(1024, len(centroids) // 4))
        matrix.upsert(centroids)
        held = _Held(matrix, watermark, self._clock() + self.refresh_s, reflected)
        self._held[version] = held
        log.info(
            "gallery: loaded version=%s read=%d from=%s deer=%d generation=%d ms=%.1f",
            version, len(centroids), "redis" if from_redis else "postgres", len(matrix),
            reflected, (time.perf_counter() - t0) * 1000,
        )  # fmt: skip
        if from_redis:
            # What Redis may have lost since its last full load: see the module docstring.
            if self.redis_lookback is None:
                held.watermark = datetime(1970, 1, 1, tzinfo=UTC)
            else:
                held.watermark = watermark - self.redis_lookback
            self.refresh(version)
            # Merged ids a late cache write put back, and the changes made while Redis may
            # have been written around them (see the module docstring).
            matrix.remove(sorted(merged_ids(self.store, [c.deer_id for c in centroids])))
            held.generation = generation(self.store, before=held.watermark)
        return held

    def _follow_curation(self, version: str, held: _Held) -> None:
        """Apply the curation changes made since ``held`` last reflected them (see the
        module docstring); a failed read raises StoreUnavailable, like the batch's write."""
        changes = changes_since(self.store, held.generation)
        if not changes:
            return
        affected = sorted({d for c in changes for d in c.affected})
        removed = replaced = 0
        if affected:
            current = self.store.load_centroids(version, affected)
            present = {c.deer_id for c in current}
            removed = held.matrix.remove([d for d in affected if d not in present])
            replaced = sum(held.matrix.upsert(current, force=True))
        held.generation = changes[-1].id
        log.info(
            "gallery: curation changes applied version=%s changes=%d generation=%d "
            "removed=%d replaced=%d deer=%d",
            version, len(changes), held.generation, removed, replaced, len(held.matrix),
        )  # fmt: skip

    def _read_all(self, version: str) -> tuple[list[DeerCentroid], bool]:
        """Redis first, Postgres for what it lacks (each miss counted); and whether Redis
        served the version (it was warm there)."""
        if self.cache is None:
            return self.store.load_centroids(version), False
        try:
            read = self.cache.get_all(version)
        except CacheUnavailable as err:
            self._cache_failed(version, "read", err)
            return self.store.load_centroids(version), False
        if read is None:
            centroids = self.store.load_centroids(version)
            self.metrics.cache_requests.labels(result="miss").inc(max(1, len(centroids)))
            self._cache_put(version, centroids, complete=True)
            return centroids, False
        centroids = list(read.centroids)
        self.metrics.cache_requests.labels(result="hit").inc(len(centroids))
        if read.missing_ids:
            self.metrics.cache_requests.labels(result="miss").inc(len(read.missing_ids))
            missing = self.store.load_centroids(version, read.missing_ids)
            centroids.extend(missing)
            self._cache_put(version, missing)
        return centroids, True

    # -- Redis ----------------------------------------------------------------------------
    def _cache_put(
        self, version: str, centroids: Sequence[DeerCentroid], *, complete: bool = False
    ) -> None:
        if self.cache is None or version in self._stale:
            return  # stale: the writes resume with the full reload once Redis answers
        try:
            # In chunks (a full load of 100k deer is 400 MB), the complete flag with the last.
            for start in range(0, max(1, len(centroids)), CACHE_WRITE_CHUNK):
                last = start + CACHE_WRITE_CHUNK >= len(centroids)
                chunk = centroids[start : start + CACHE_WRITE_CHUNK]
                self.cache.put(version, chunk, complete=complete and last)
        except CacheUnavailable as err:
            self._cache_failed(version, "write", err)

    def _redis_back(self, version: str) -> bool:
        """Drop a stale version from Redis; True once that worked (Redis answers again)."""
        assert self.cache is not None
        try:
            self.cache.invalidate(version)
        except CacheUnavailable as err:
            self.metrics.cache_errors.inc()
            log.debug("cache: still failing for version=%s: %s", version, err)
            return False
        self._stale.discard(version)
        log.info("cache: redis is back; reloading version=%s from postgres", version)
        return True

    def _cache_failed(self, version: str, what: str, err: Exception) -> None:
        self._stale.add(version)
        self.metrics.cache_errors.inc()
        log.warning("cache: %s failed, falling back to postgres: %s", what, err)
