"""Which embedding version the live consumer runs, and switching it without a restart.

The registry (``embedding_versions``, see ``sinks.registry``) names the active version and
how to build its embedder (a checkpoint path with its SHA-256, or the seed and input size of
the fallback initialisation). ``reid-stream activate V`` only changes the registry; every
live consumer polls it between batches (at most every ``REID_VERSION_POLL_S`` seconds, one
indexed read) and, when the active version changed:

1. builds and starts the new embedder in a background thread (the batches go on with the
   old one meanwhile),
2. warms the Redis cache for the new version in the same thread (a full gallery load through
   its own store and cache connections),
3. hands the started embedder to ``StreamApp.between_batches()``, which swaps it in at a batch
   boundary: the next batch is embedded, matched and written under the new version.

Switching back is the same path (``activate OLD``). Each version may carry its own
threshold in the registry (``activate V --threshold T``); the poll keeps the active version's
in the batch processor's ``thresholds``, which the batch path prefers over REID_THRESHOLD.

A version whose weights cannot be loaded, or that load as another version than the registry
says, is logged and not switched to; the consumer keeps its version and tries again a minute
later.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from sinks.cache import CentroidCache
from sinks.metrics import StreamMetrics
from sinks.registry import VersionInfo, VersionSpec
from sinks.store import PgStore
from streams.gallery import GalleryLoader
from streams.settings import Settings

if TYPE_CHECKING:  # torch is imported only by the commands that run a model
    from reid.embedder import Embedder

log = logging.getLogger(__name__)

RETRY_FAILED_S = 60.0
# Failed registry reads are retried after poll_s, doubling up to this.
POLL_BACKOFF_MAX_S = 60.0


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def version_spec(settings: Settings, embedder: Embedder, weights_path: Path | None) -> VersionSpec:
    """What the registry stores about a started embedder, to build it again elsewhere."""
    if weights_path is not None:
        path = Path(weights_path).resolve()
        return VersionSpec(
            embedder.embedding_version,
            weights_path=str(path),
            weights_sha256=file_sha256(path),
            input_size=embedder.preprocess.input_size[0],
        )
    return VersionSpec(
        embedder.embedding_version, seed=settings.seed, input_size=settings.input_size
    )


def build_embedder(settings: Settings, weights_path: Path | None = None) -> Embedder:
    """The embedder the settings describe (not started); ``weights_path`` overrides theirs."""
    from reid.embedder import Embedder

    return Embedder(
        weights_path=weights_path if weights_path is not None else settings.weights_path,
        seed=settings.seed,
        input_size=settings.input_size,
        device=settings.device,
        precision=settings.precision,
        backend=settings.backend,
        onnx_cache_dir=settings.onnx_cache_dir,
        max_batch=settings.batch_max_size,
        pad_batches={"auto": None, "on": True, "off": False}[settings.pad_batches],
        torch_compile=settings.torch_compile,
    )


def embedder_for(settings: Settings, info: VersionInfo | VersionSpec) -> Embedder:
    """The (unstarted) embedder of a registered version, on this process's device/precision."""
    if info.weights_path:
        # A checkpoint carries its input size; the settings' one must not override it.
        return build_embedder(
            settings.model_copy(update={"input_size": None}), weights_path=Path(info.weights_path)
        )
    update = {"weights_path": None, "input_size": info.input_size}
    if info.seed is not None:
        update["seed"] = info.seed
    return build_embedder(settings.model_copy(update=update))


def check_embedder(embedder: Embedder, info: VersionInfo | VersionSpec) -> None:
    """Raise when a started embedder is not the registered version (e.g. the checkpoint at
    the registered path was replaced by another one)."""
    if embedder.embedding_version != info.version:
        raise RuntimeError(
            f"the weights registered for embedding version {info.version!r} "
            f"({info.weights_path or 'seeded/ImageNet fallback'}) load as "
            f"{embedder.embedding_version!r}; fix the registry or the file"
        )
    if info.weights_path and info.weights_sha256:
        found = file_sha256(Path(info.weights_path))
        if found != info.weights_sha256:
            raise RuntimeError(
                f"{info.weights_path} has SHA-256 {found[:12]}..., not the registered "
                f"{info.weights_sha256[:12]}... of version {info.version!r}"
            )


def warm_cache(settings: Settings, version: str, metrics: StreamMetrics) -> int:
    """Load ``version``'s gallery through its own store and cache connections, which writes
    the full set to Redis (marked complete); returns the number of deer."""
    store = PgStore(settings.database_url.get_secret_value())
    redis_url = settings.redis_url.get_secret_value() if settings.redis_url else None
    cache = CentroidCache(redis_url, key_prefix=settings.cache_key_prefix) if redis_url else None
    store.start()
    try:
        if cache is not None:
            cache.start()
            # Written before this process knew the version was coming back: start afresh.
            try:
                cache.invalidate(version)
            except Exception as err:  # the cache is optional; the load below falls back
                log.warning("versions: could not clear the cache of %s: %s", version, err)
        return len(GalleryLoader(store, cache, metrics).load(version))
    finally:
        if cache is not None:
            cache.stop()
        store.stop()


class VersionSwitch:
    """Polls the registry between batches; see the module docstring.

    ``poll()`` is cheap (a clock check, and at most every ``poll_s`` one indexed read on the
    caller's store connection) and returns a started embedder of the new active version once
    it is ready, else None. It runs in the caller's thread; the build runs in a thread of its
    own (``background=False`` builds inline, for tests and tools).
    """

    def __init__(
        self,
        settings: Settings,
        store: PgStore,
        metrics: StreamMetrics,
        current: str,
        *,
        poll_s: float | None = None,
        background: bool = True,
        thresholds: dict[str, float] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.current = current
        self.poll_s = settings.version_poll_s if poll_s is None else poll_s
        self.background = background
        self._next_poll = time.monotonic() + self.poll_s
        self._poll_failures = 0
        self._building: str | None = None  # the version being built
        self._thread: threading.Thread | None = None
        self._ready: Embedder | None = None  # set by the build thread when it succeeded
        # Versions that failed to build, and when: retried after RETRY_FAILED_S.
        self._failed: dict[str, float] = {}
        # The versions' own thresholds (the batch processor's dict): the active version's is
        # refreshed at every poll, so `activate V --threshold T` reaches running consumers.
        self.thresholds = thresholds if thresholds is not None else {}
        try:
            self._note_threshold(store.registry.get(current))
        except Exception as err:  # the first poll tries again
            log.debug("versions: threshold of %s not read: %s", current, err)

    def _note_threshold(self, info: VersionInfo | None) -> None:
        if info is None:
            return
        before = self.thresholds.get(info.version)
        if info.threshold is None:
            self.thresholds.pop(info.version, None)
        else:
            self.thresholds[info.version] = float(info.threshold)
        if self.thresholds.get(info.version) != before:
            log.info("versions: threshold of %s is %s", info.version,
                     self.thresholds.get(info.version, "REID_THRESHOLD"))  # fmt: skip

    def poll(self) -> Embedder | None:
        thread = self._thread
        if thread is not None:
            if thread.is_alive():
                return None
            return self._take()
        now = time.monotonic()
        if now < self._next_poll:
            return None
        self._next_poll = now + self.poll_s
        try:
            active = self.store.registry.active()
        except Exception as err:  # a store outage: the batch path reports it; try again later
            # Backing off: each failed read may hold the consumer's thread up to its deadline
            # (a hung database), so a long outage must not cost that every poll_s.
            self._poll_failures += 1
            backoff = min(POLL_BACKOFF_MAX_S, self.poll_s * 2 ** min(self._poll_failures, 6))
            self._next_poll = now + max(self.poll_s, backoff)
            log.debug("versions: poll failed (%d in a row): %s", self._poll_failures, err)
            return None
        self._poll_failures = 0
        self._note_threshold(active)
        if active is None or active.version == self.current:
            self._failed.clear()
            return None
        if now - self._failed.get(active.version, -RETRY_FAILED_S) < RETRY_FAILED_S:
            return None
        log.info("versions: active version changed %s -> %s; preparing it",
                 self.current, active.version)  # fmt: skip
        self._building = active.version
        self._thread = threading.Thread(
            target=self._build, args=(active,), name="version-switch", daemon=True
        )
        self._thread.start()
        if not self.background:
            self._thread.join()
            return self._take()
        return None

    def _take(self) -> Embedder | None:
        """After a build ended: its embedder (now the current version), or None if it failed."""
        embedder, self._ready, self._thread = self._ready, None, None
        built, self._building = self._building, None
        if embedder is None:
            if built is not None:
                self._failed[built] = time.monotonic()
            return None
        self.current = str(built)
        return embedder

    def _build(self, info: VersionInfo) -> None:
        t0 = time.perf_counter()
        embedder = embedder_for(self.settings, info)
        try:
            embedder.start()
            check_embedder(embedder, info)
            deer = warm_cache(self.settings, info.version, self.metrics)
        except Exception:
            log.exception("versions: cannot switch to %s; staying on %s",
                          info.version, self.current)  # fmt: skip
            try:
                embedder.stop()
            except Exception:
                log.debug("versions: error stopping a failed embedder", exc_info=True)
            return
        log.info("versions: %s ready (deer=%d, %.1fs); switching at the next batch boundary",
                 info.version, deer, time.perf_counter() - t0)  # fmt: skip
        self._ready = embedder

    def stop(self) -> None:
        """Wait for a build in progress and release what it made."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout=120)
        if self._ready is not None:
            self._ready.stop()
            self._ready = None
