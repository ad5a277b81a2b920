"""Curation as the commands and the review page run it: the change in Postgres
(``sinks.curation``), then Redis, then an event on the ``deer.changes`` topic.

Every change commits first (one transaction under the new-deer lock); the cache and the
topic follow, as for a batch. The changes table is the topic's outbox: a change whose event
was not acknowledged (the broker was down) stays unpublished and is sent, in order, before
the next change's event or by ``reid-stream deer publish``; each event carries its
``change_id``, so a consumer drops a repeat. The topic has one partition, so its order is the
order of the changes.

Live consumers need neither: they read the changes from Postgres before every batch
(``streams.gallery``). Redis is brought up to date here for the workers that load a version
later; a failed cache write is logged and left to those workers' checks.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from sinks import curation_reads
from sinks.cache import CacheUnavailable, CentroidCache
from sinks.publisher import KafkaPublisher, PublishError
from sinks.records import Change, ChangeResult
from sinks.store import PgStore
from streams.events import SCHEMA_VERSION, rfc3339
from streams.settings import Settings
from streams.topics import ensure_stream_topics

log = logging.getLogger(__name__)


def change_event(change: Change) -> bytes:
    """The ``deer.changes`` event of one change (docs/curation.md has the contract)."""
    doc = {
        "schema": SCHEMA_VERSION,
        "change_id": change.id,
        "kind": change.kind,
        "deer_id": str(change.deer_id),
        "other_deer_id": None if change.other_id is None else str(change.other_id),
        "from_deer_ids": [str(i) for i in change.source_ids],
        "detections": list(change.detections),
        "reason": change.reason,
        "created_at": rfc3339(change.created_at),
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def result_doc(result: ChangeResult) -> dict[str, Any]:
    """What the commands print and the page reports about a change."""
    change = result.change
    return {
        "changed": result.changed,
        "change": None if change is None else json.loads(change_event(change)),
    }


class Curator:
    """The curation calls with their side effects; ``start()`` before use, ``stop()`` after.
    Builds its own store, cache and publisher from the settings unless given them."""

    def __init__(
        self,
        settings: Settings,
        *,
        store: PgStore | None = None,
        cache: CentroidCache | None = None,
        publisher: KafkaPublisher | None = None,
    ) -> None:
        self.settings = settings
        self.store = store or PgStore(settings.database_url.get_secret_value())
        redis_url = settings.redis_url.get_secret_value() if settings.redis_url else None
        if cache is None and redis_url:
            cache = CentroidCache(redis_url, key_prefix=settings.cache_key_prefix)
        self.cache = cache
        self.publisher = publisher or KafkaPublisher(settings.producer_config())
        self._started = False

    def start(self) -> None:
        self.store.start()
        if self.cache is not None:
            self.cache.start()
        ensure_stream_topics(self.settings, [self.settings.topic_deer_changes], 1)
        self.publisher.start()
        self._started = True

    def stop(self) -> None:
        for step in (self.publisher.stop, *([self.cache.stop] if self.cache else []),
                     self.store.stop):  # fmt: skip
            try:
                step()
            except Exception:
                log.exception("curation: error while stopping")
        self._started = False

    # -- changes ------------------------------------------------------------------------------
    def merge(self, keep: int, other: int, reason: str | None = None) -> ChangeResult:
        return self._after(self.store.curation.merge(keep, other, reason))

    def split(
        self, deer_id: int, detection_ids: Sequence[str], reason: str | None = None
    ) -> ChangeResult:
        return self._after(self.store.curation.split(deer_id, detection_ids, reason))

    def move(
        self, detection_ids: Sequence[str], to_deer: int, reason: str | None = None
    ) -> ChangeResult:
        return self._after(self.store.curation.move(detection_ids, to_deer, reason))

    def confirm(self, detection_id: str, reason: str | None = None) -> ChangeResult:
        return self._after(self.store.curation.confirm(detection_id, reason))

    def new_deer(self, detection_id: str, reason: str | None = None) -> ChangeResult:
        """The review page's "make it a new deer": split the detection off its deer, or,
        when it is its deer's only detection (it already is a deer of its own), confirm it
        as such."""
        found = curation_reads.detection(self.store, detection_id)
        alone = found is None or len(curation_reads.detections_of(
            self.store, found["deer_id"], limit=2)) <= 1  # fmt: skip
        if alone:  # (an unknown detection is refused there, with the message)
            return self._after(
                self.store.curation.confirm(detection_id, reason, outcome="new_deer")
            )
        assert found is not None
        return self.split(found["deer_id"], [detection_id], reason)

    def publish_pending(self) -> int:
        """Send every change not yet acknowledged on the topic, in order; returns how many.
        Raises PublishError when the broker does not acknowledge them (they stay pending)."""
        pending = self.store.curation.unpublished()
        if not pending:
            return 0
        for change in pending:
            self.publisher.send(
                self.settings.topic_deer_changes, str(change.deer_id), change_event(change)
            )
        self.publisher.flush_confirmed(timeout=30.0)
        self.store.curation.mark_published([c.id for c in pending])
        log.info("curation: published %d change(s) up to change=%d", len(pending), pending[-1].id)
        return len(pending)

    def _after(self, result: ChangeResult) -> ChangeResult:
        if result.changed:
            self._update_cache(result)
        try:
            self.publish_pending()
        except PublishError as err:
            # Committed all the same: the outbox keeps it for the next change or `deer publish`.
            log.warning("curation: change committed but its deer.changes event is pending: %s",
                        err)  # fmt: skip
        return result

    def _update_cache(self, result: ChangeResult) -> None:
        if self.cache is None:
            return
        try:
            for version, ids in result.removed.items():
                self.cache.remove(version, ids)
            for version, centroids in result.centroids.items():
                self.cache.put(version, centroids)
        except CacheUnavailable as err:
            log.warning("curation: redis not updated (workers re-read Postgres): %s", err)
