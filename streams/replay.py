"""`reid-stream replay`: re-embed the detections topic under another embedding version.

The replay reads the detections topic with a consumer group of its own
(``<REID_GROUP_ID>-replay-<version>``), partitions assigned explicitly (one process; the
group only holds its committed offsets), and re-embeds every event that the database holds,
through the same functions as the live stream (``parse_detection``, ``image_bytes``,
``decode_image``/``crop``, ``Embedder.preprocess.to_uint8`` in a decode thread pool, one
``Embedder.embed`` forward per batch of ``REID_BATCH_MAX_SIZE``). Per batch, in one
transaction (``History.store_replayed``): the vectors are upserted per (detection, version)
and the version's centroids of the deer they belong to are rebuilt from all of that deer's
vectors as the re-normalised mean. Deer identities do not change: the assignments stay, only
their vectors do. Offsets are committed after the transaction, so an interrupted replay
continues from its committed offsets, and one run twice stores nothing twice.

Skipped (and counted): events the database does not hold (dead-lettered, or not processed
yet), invalid events, conflicting duplicates, and detections that already have a vector of
the version (a second run, or stored by a live consumer that ran the version).

**Never ahead of the live consumer.** An event beyond the live group's committed offset is
not stored yet; a replay that skipped it would never give it a vector. The replay therefore
holds each partition at the live group's committed offset (re-read every second) and
follows it. A partition the live group has not committed yet is held where the replay stands
(the live consumer may be storing its events right now); a replay with no live consumer at all
says so (``follow_live=False``, ``replay --no-live``) and reads to the end.
A failed read of those offsets never releases the hold: the last ones read are kept (before
any, every partition is held where it stands), and no end is declared until a read succeeds.

**The end** (``--until-end``) is where the replay reached, on every partition, the live
group's committed offset (everything the live consumer stored; with ``--no-live``, the
partition's end offset), and no message arrived for
``idle_s``. The idle wait is needed because the embedded tansu broker reports a wrong high
watermark (too low), so its end offsets alone cannot say the replay is done.

**By time** (``--from-time``) uses ``offsets_for_times``. Brokers that cannot look offsets up
by time (the embedded tansu broker returns offset 0 for any timestamp) are detected by a
probe with a timestamp far in the future (a real broker answers "no such offset", -1) and the
command stops with a message instead of replaying from a wrong place.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    Consumer,
    KafkaError,
    KafkaException,
    TopicPartition,
)

from reid.embedder import Embedder
from sinks.cache import CentroidCache
from sinks.metrics import ReplayMetrics
from sinks.store import PgStore
from streams.logs import progress_bar
from streams.replay_batch import ReplayBatch, ReplayStats
from streams.settings import Settings
from streams.versions import file_sha256, version_spec

log = logging.getLogger(__name__)

# A timestamp no record has: a broker that looks offsets up by time answers -1 for it.
_FUTURE_PROBE_MS = 4_102_444_800_000  # 2100-01-01
# Without a terminal (a container's log) progress is a log line this often, the first at once.
PROGRESS_LOG_S = 30.0
CAP_REFRESH_S = 1.0


class ReplayError(RuntimeError):
    """A replay that cannot start as asked (wrong weights, unusable start position)."""


def replay_group(settings: Settings, version: str) -> str:
    """The replay's consumer group: one per version, beside the live group."""
    return f"{settings.group_id}-replay-{re.sub(r'[^A-Za-z0-9._-]', '_', version)}"


class Replayer:
    """One replay run; see the module docstring. ``start()``, ``run()``, ``stop()``."""

    def __init__(
        self,
        settings: Settings,
        embedder: Embedder,
        *,
        version: str,
        weights_path: Path | None = None,
        metrics: ReplayMetrics | None = None,
        progress: bool = False,
        idle_s: float = 2.0,
        follow_live: bool = True,
    ) -> None:
        self.settings = settings
        self.embedder = embedder
        self.version = version
        self.weights_path = weights_path
        self.metrics = metrics or ReplayMetrics()
        self.progress = progress
        self.idle_s = idle_s
        self.follow_live = follow_live
        self.topic = settings.topic_detections
        self.group = replay_group(settings, version)
        self.store = PgStore(settings.database_url.get_secret_value())
        redis_url = settings.redis_url.get_secret_value() if settings.redis_url else None
        self.cache = (
            CentroidCache(redis_url, key_prefix=settings.cache_key_prefix) if redis_url else None
        )
        self._stop = threading.Event()
        self._consumer: Consumer | None = None
        self._live: Consumer | None = None
        self._said_no_commits = False
        self._pool: ThreadPoolExecutor | None = None
        self._batch: ReplayBatch | None = None  # set by start()
        self._partitions: list[int] = []
        self._caps: dict[int, int] | None = None  # the live group's offsets, last read
        self._caps_fresh = True  # False while reading them fails

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Start the embedder, check it is the version asked for, register the version."""
        self.embedder.start()
        if self.embedder.embedding_version != self.version:
            raise ReplayError(
                f"the weights make embedding version {self.embedder.embedding_version!r}, "
                f"not {self.version!r}"
            )
        self.store.start()
        known = self.store.registry.get(self.version)
        if known is not None and known.weights_sha256 and self.weights_path is not None:
            digest = file_sha256(self.weights_path)
            if digest != known.weights_sha256:
                raise ReplayError(
                    f"{self.weights_path} is not the checkpoint registered for {self.version!r} "
                    f"(SHA-256 {digest[:12]}... vs {known.weights_sha256[:12]}...)"
                )
        self.store.registry.register(version_spec(self.settings, self.embedder, self.weights_path))
        self.store.registry.set_state(self.version, "replaying")
        if self.cache is not None:
            self.cache.start()
        workers = self.settings.decode_workers or max(1, os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="replay-decode")
        self._batch = ReplayBatch(
            self.settings, self.embedder, self.store, self.cache, self.metrics, self._pool,
            self.version,
        )  # fmt: skip
        conf = self.settings.consumer_config(self.group)
        self._consumer = Consumer(conf)
        if self.follow_live:
            # Reads the live group's committed offsets only; it never joins that group.
            self._live = Consumer(
                {**self.settings.kafka_common(), "group.id": self.settings.group_id,
                 "enable.auto.commit": False},
            )  # fmt: skip
        meta = self._consumer.list_topics(self.topic, timeout=10)
        topic = meta.topics.get(self.topic)
        if topic is None or topic.error is not None or not topic.partitions:
            raise ReplayError(f"topic {self.topic!r} not found")
        self._partitions = sorted(topic.partitions)

    def request_stop(self) -> None:
        """Finish the batch in hand, commit it, and return from run() (signal-safe)."""
        self._stop.set()

    def stop(self) -> None:
        for closer in (
            lambda: self._consumer is not None and self._consumer.close(),
            lambda: self._live is not None and self._live.close(),
            lambda: self._pool is not None and self._pool.shutdown(wait=True, cancel_futures=True),
            lambda: self.cache is not None and self.cache.stop(),
            self.store.stop,
        ):
            try:
                closer()
            except Exception:
                log.exception("replay: error while stopping")
        self._consumer = self._live = self._pool = None

    # -- start positions ------------------------------------------------------------------
    def start_offsets(
        self,
        *,
        from_beginning: bool = False,
        offsets: dict[int, int] | None = None,
        from_time_ms: int | None = None,
    ) -> dict[int, int]:
        """Where each partition starts: the given offsets, the offsets at a time, the
        beginning, or (default) the replay group's committed offsets, else the beginning."""
        assert self._consumer is not None, "start() first"
        if offsets is not None:
            return {p: offsets.get(p, OFFSET_BEGINNING) for p in self._partitions}
        if from_time_ms is not None:
            return self._offsets_for_time(from_time_ms)
        if from_beginning:
            return {p: OFFSET_BEGINNING for p in self._partitions}
        committed = self._consumer.committed(
            [TopicPartition(self.topic, p) for p in self._partitions], timeout=10
        )
        return {tp.partition: tp.offset if tp.offset >= 0 else OFFSET_BEGINNING for tp in committed}

    def _offsets_for_time(self, ms: int) -> dict[int, int]:
        assert self._consumer is not None
        probe = self._consumer.offsets_for_times(
            [TopicPartition(self.topic, p, _FUTURE_PROBE_MS) for p in self._partitions], timeout=10
        )
        if any(tp.offset >= 0 or tp.error is not None for tp in probe):
            raise ReplayError(
                "this broker cannot look offsets up by timestamp (it answered an offset for a "
                "time in the year 2100; the embedded tansu broker answers 0 for any time), so "
                "--from-time cannot be honoured; use --from-beginning or --from-offsets FILE"
            )
        found = self._consumer.offsets_for_times(
            [TopicPartition(self.topic, p, ms) for p in self._partitions], timeout=10
        )
        # -1: no message at or after that time in the partition: nothing to replay there.
        return {tp.partition: tp.offset if tp.offset >= 0 else OFFSET_END for tp in found}

    # -- the loop -------------------------------------------------------------------------
    def run(
        self, starts: dict[int, int], *, until_end: bool = False, max_batches: int | None = None
    ) -> ReplayStats:
        """Replay from ``starts`` until stopped, until the end (``until_end``), or after
        ``max_batches`` stored batches. Returns what it did."""
        assert self._consumer is not None and self._batch is not None, "start() first"
        stats = ReplayStats(self.version, self.group)
        t0 = time.monotonic()
        positions = self._resolve(starts)
        stats.positions = dict(positions)
        # Created here, so that the rate counts from the first batch, not the model load.
        bar = progress_bar(f"replay {self.version}", enabled=self.progress)
        if self.metrics is not None:
            self.metrics.embedding_info.info({"embedding_version": self.version, "role": "replay"})
        self._consumer.assign([TopicPartition(self.topic, p, o) for p, o in positions.items()])
        held: set[int] = set()  # partitions paused at the live group's committed offset
        caps: dict[int, int] | None = None
        ends: dict[int, int] = {}
        next_cap = 0.0
        # Since when consume() has come back empty (None: the last one returned messages).
        empty_since: float | None = time.monotonic()
        next_log = 0.0  # when the next progress line is due (seconds since t0)
        log.info("replay: version=%s group=%s from %s", self.version, self.group,
                 _fmt_offsets(positions))  # fmt: skip
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_cap:
                caps = self._live_caps(positions)
                ends = self._ends(caps)
                next_cap = now + CAP_REFRESH_S
                release = [p for p in held if caps is None or caps[p] > positions[p]]
                if release:
                    self._consumer.resume([TopicPartition(self.topic, p) for p in release])
                    held.difference_update(release)
            remaining = sum(max(0, ends[p] - positions[p]) for p in self._partitions)
            self.metrics.replay_remaining.set(remaining)
            bar.total = stats.events + remaining
            bar.update(stats.events - bar.n)
            quiet = empty_since is not None and time.monotonic() - empty_since >= self.idle_s
            # Not at an end read from stale caps: the live group may have moved on.
            if until_end and remaining == 0 and quiet and self._caps_fresh:
                stats.reached_end = True
                break
            batch = self._window(positions, caps, held)
            if not batch:
                if empty_since is None:
                    empty_since = time.monotonic()
                continue
            empty_since = None
            self._batch(batch, stats)
            self._commit(batch, positions)
            stats.events += len(batch)
            stats.batches += 1
            stats.elapsed_s = time.monotonic() - t0
            self.metrics.replay_rate.set(stats.events_per_s)
            if bar.disable and stats.elapsed_s >= next_log:  # no bar drawn: a log line instead
                next_log = stats.elapsed_s + PROGRESS_LOG_S
                log.info(
                    "replay: progress events=%d remaining=%d rate=%.1f ev/s", stats.events,
                    max(0, remaining - len(batch)), stats.events_per_s,
                )  # fmt: skip
            if max_batches is not None and stats.batches >= max_batches:
                break
        stats.elapsed_s = time.monotonic() - t0
        stats.positions = dict(positions)
        bar.update(stats.events - bar.n)
        bar.close()
        if stats.reached_end:
            self.store.registry.set_state(self.version, "ready")
            self.store.registry.ensure_indexes(self.version)
        log.info("replay: done %s", json.dumps(stats.summary(), sort_keys=True))
        return stats

    def _resolve(self, starts: dict[int, int]) -> dict[int, int]:
        """Logical start offsets (OFFSET_BEGINNING/END resolved with the watermarks)."""
        assert self._consumer is not None
        out = {}
        for p in self._partitions:
            offset = starts.get(p, OFFSET_BEGINNING)
            if offset < 0:
                low, high = self._consumer.get_watermark_offsets(
                    TopicPartition(self.topic, p), timeout=10
                )
                offset = low if offset == OFFSET_BEGINNING else high
            out[p] = offset
        return out

    def _live_caps(self, positions: dict[int, int]) -> dict[int, int] | None:
        """The live group's committed offset per partition (0 where it committed none yet:
        nothing there is known stored), or None when the replay does not follow a live group.

        A failed read never releases the hold (the replay would commit past events that are
        not stored yet, and a re-run would not revisit them): it keeps the last caps read,
        or, before any, holds every partition where the replay stands. Caps never move back
        (events below a cap once read are stored, whatever the group's offsets say later)."""
        if self._live is None:
            return None
        try:
            committed = self._live.committed(
                [TopicPartition(self.topic, p) for p in self._partitions], timeout=10
            )
            failed = [tp for tp in committed if tp.error is not None]
            if failed:
                raise KafkaException(failed[0].error)
        except Exception as err:  # the broker is unreachable: hold, re-read soon
            self._caps_fresh = False
            kept = self._caps if self._caps is not None else dict(positions)
            log.warning(
                "replay: cannot read the live group's offsets (%s); holding at %s (%s)", err,
                _fmt_offsets(kept), "the last known" if self._caps is not None else "here",
            )  # fmt: skip
            return kept
        self._caps_fresh = True
        read = {tp.partition: tp.offset for tp in committed if tp.offset >= 0}
        if not read and self._caps is None and not self._said_no_commits:
            self._said_no_commits = True
            # Not "no live consumer": one starting up stores events before its first commit,
            # and a replay that skipped them would never revisit them.
            log.warning("replay: the live group %s has committed no offsets yet; holding every "
                        "partition (is REID_GROUP_ID the live stream's? without a live "
                        "consumer, run with --no-live)", self.settings.group_id)  # fmt: skip
        last = self._caps or {}
        self._caps = {p: max(read.get(p, 0), last.get(p, 0)) for p in self._partitions}
        return dict(self._caps)

    def _ends(self, caps: dict[int, int] | None) -> dict[int, int]:
        """Where the replay is done per partition: the live cap, else the end offset."""
        assert self._consumer is not None
        ends = {}
        for p in self._partitions:
            if caps is not None:
                ends[p] = caps[p]
                continue
            _, high = self._consumer.get_watermark_offsets(
                TopicPartition(self.topic, p), timeout=10, cached=False
            )
            ends[p] = max(high, 0)
        return ends

    def _window(
        self, positions: dict[int, int], caps: dict[int, int] | None, held: set[int]
    ) -> list[Any]:
        """Up to a batch of messages, none at or beyond the live group's committed offset:
        a partition that reached it is rewound to it and paused until the live group moves."""
        assert self._consumer is not None
        raw = self._consumer.consume(
            num_messages=self.settings.batch_max_size,
            timeout=self.settings.batch_max_wait_ms / 1000,
        )
        out = []
        stopped: set[int] = set()
        for msg in raw:
            err = msg.error()
            if err is not None:
                if err.fatal():
                    raise ReplayError(f"kafka: {err}")
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("replay: %s", err)
                continue
            p = msg.partition()
            if p in stopped or p in held:
                continue  # fetched before the pause; the seek delivers it again later
            if caps is not None and msg.offset() >= caps[p]:
                # Not stored by the live consumer yet: come back for it later.
                tp = TopicPartition(self.topic, p, msg.offset())
                self._consumer.seek(tp)
                self._consumer.pause([tp])
                held.add(p)
                stopped.add(p)
                continue
            out.append(msg)
        return out

    def _commit(self, batch: Sequence[Any], positions: dict[int, int]) -> None:
        assert self._consumer is not None
        t0 = time.perf_counter()
        ends: dict[int, int] = {}
        for msg in batch:
            ends[msg.partition()] = max(ends.get(msg.partition(), -1), msg.offset() + 1)
        self._consumer.commit(
            offsets=[TopicPartition(self.topic, p, o) for p, o in sorted(ends.items())],
            asynchronous=False,
        )
        positions.update(ends)
        self.metrics.replay_stage_seconds.labels(stage="commit").observe(time.perf_counter() - t0)


def _fmt_offsets(offsets: dict[int, int]) -> str:
    return ",".join(f"{p}:{o}" for p, o in sorted(offsets.items())) or "-"
