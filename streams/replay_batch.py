"""One batch of a replay: re-embed the events the database holds under the replay's version.

Per batch, in one transaction (``History.store_replayed``): the vectors are upserted per
(detection, version) and the version's centroids of the deer they belong to are rebuilt from
all of that deer's vectors. Events are parsed, read, decoded and cropped exactly as the live
stream does (``parse_detection``, ``crop_pixels``), so a replayed vector is the vector the
live consumer would have stored under the same weights.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from reid.embedder import Embedder
from sinks.cache import CacheUnavailable, CentroidCache
from sinks.metrics import ReplayMetrics
from sinks.store import PgStore
from streams.events import DetectionEvent, InvalidEvent, parse_detection
from streams.images import ImageRoots, crop_pixels
from streams.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class ReplayStats:
    version: str
    group: str
    events: int = 0
    batches: int = 0
    results: dict[str, int] = field(default_factory=dict)
    deer_rebuilt: int = 0
    elapsed_s: float = 0.0
    reached_end: bool = False
    positions: dict[int, int] = field(default_factory=dict)

    def count(self, result: str, n: int = 1) -> None:
        self.results[result] = self.results.get(result, 0) + n

    @property
    def events_per_s(self) -> float:
        return self.events / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        out["positions"] = {str(p): o for p, o in sorted(self.positions.items())}
        out["events_per_s"] = round(self.events_per_s, 2)
        out["stored_per_s"] = round(
            self.results.get("stored", 0) / self.elapsed_s if self.elapsed_s > 0 else 0.0, 2
        )
        out["elapsed_s"] = round(self.elapsed_s, 2)
        return out


class ReplayBatch:
    """Re-embeds one batch of messages; built once per replay run and called per batch."""

    def __init__(
        self,
        settings: Settings,
        embedder: Embedder,
        store: PgStore,
        cache: CentroidCache | None,
        metrics: ReplayMetrics,
        pool: ThreadPoolExecutor,
        version: str,
    ) -> None:
        self.settings = settings
        self.embedder = embedder
        self.store = store
        self.cache = cache
        self.metrics = metrics
        self.pool = pool
        self.version = version
        self.roots = ImageRoots.from_settings(settings)

    def __call__(self, batch: Sequence[Any], stats: ReplayStats) -> None:
        """Re-embed and store what ``batch`` holds; ``stats`` counts every event's result."""
        m = self.metrics
        parsed: dict[str, tuple[DetectionEvent, bytes]] = {}
        for msg in batch:
            try:
                event = parse_detection(msg.value(), max_bytes=self.settings.max_message_bytes)
            except InvalidEvent:
                stats.count("invalid")
                m.replay_events.labels(result="invalid").inc()
                continue
            if event.detection_id in parsed:
                stats.count("already_stored")  # a repeat within the batch
                m.replay_events.labels(result="already_stored").inc()
                continue
            parsed[event.detection_id] = (event, hashlib.sha256(msg.value() or b"").digest())
        stored = self.store.history.replay_lookup(self.version, list(parsed))
        todo: list[DetectionEvent] = []
        for detection_id, (event, digest) in parsed.items():
            found = stored.get(detection_id)
            result = (
                "not_stored" if found is None
                else "conflict" if found[1] is not None and found[1] != digest
                else "already_stored" if found[2]
                else None
            )  # fmt: skip
            if result is None:
                todo.append(event)
            else:
                stats.count(result)
                m.replay_events.labels(result=result).inc()
        if not todo:
            return
        t0 = time.perf_counter()
        futures = [
            self.pool.submit(
                crop_pixels,
                event,
                self.roots,
                self.embedder.preprocess,
                max_pixels=self.settings.max_image_pixels,
            )
            for event in todo
        ]
        ready: list[tuple[str, torch.Tensor]] = []
        for event, future in zip(todo, futures, strict=True):
            try:
                ready.append((event.detection_id, future.result()))
            except InvalidEvent as err:
                log.warning("replay: %s: %s", event.detection_id, err)
                stats.count("undecodable")
                m.replay_events.labels(result="undecodable").inc()
        m.replay_stage_seconds.labels(stage="decode").observe(time.perf_counter() - t0)
        if not ready:
            return
        t0 = time.perf_counter()
        vectors = self.embedder.embed(torch.stack([pixels for _, pixels in ready]))
        m.replay_stage_seconds.labels(stage="embed").observe(time.perf_counter() - t0)
        t0 = time.perf_counter()
        rows = [
            (detection_id, vectors.resnet[i], vectors.effnet[i])
            for i, (detection_id, _) in enumerate(ready)
        ]
        centroids = self.store.history.store_replayed(self.version, rows)
        m.replay_stage_seconds.labels(stage="persist").observe(time.perf_counter() - t0)
        stats.count("stored", len(rows))
        stats.deer_rebuilt += len(centroids)
        m.replay_events.labels(result="stored").inc(len(rows))
        m.replay_batches.inc()
        if self.cache is not None:
            # A warm cache of this version stays right; a cold one is loaded in full later.
            try:
                self.cache.put(self.version, centroids)
            except CacheUnavailable as err:
                log.warning("replay: cache write failed (%s); invalidating %s", err, self.version)
                try:
                    self.cache.invalidate(self.version)
                except CacheUnavailable:
                    log.warning("replay: the cache of %s may be stale", self.version)
