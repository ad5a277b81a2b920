"""Which embedding version the live consumer runs, and switching it without a restart.

The registry (``embedding_versions``, see ``sinks.versions``) names the active version and
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

Switching back is the same path (``activate OLD``). A version whose weights cannot be
loaded, or that load as another version than the registry says, is logged and not switched
to; the consumer keeps its version and tries again a minute later.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from sinks.cache import CacheUnavailable, CentroidCache
from sinks.metrics import StreamMetrics
from sinks.store import PgStore
from sinks.versions import VersionInfo, VersionSpec
from streams.gallery import GalleryLoader
from streams.settings import Settings

if TYPE_CHECKING:  # torch is imported only by the commands that run a model
    from reid.embedder import Embedder

log = logging.getLogger(__name__)

RETRY_FAILED_S = 60.0


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


def embedder_for(settings: Settings, info: VersionInfo | VersionSpec) -> Embedder:
    """The (unstarted) embedder of a registered version, on this process's device/precision."""
    from streams.app import build_embedder

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
    ) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.current = current
        self.poll_s = settings.version_poll_s if poll_s is None else poll_s
        self.background = background
        self._next_poll = time.monotonic() + self.poll_s
        self._building: str | None = None  # the version being built
        self._thread: threading.Thread | None = None
        self._ready: Embedder | None = None  # set by the build thread when it succeeded
        # Versions that failed to build, and when: retried after RETRY_FAILED_S.
        self._failed: dict[str, float] = {}

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
            active = self.store.active_version()
        except Exception as err:  # a store outage: the batch path reports it; try again later
            log.debug("versions: poll failed: %s", err)
            return None
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


# -- the commands: replay, validate, activate, versions, drop-version ---------------------
def add_version_commands(sub: argparse._SubParsersAction) -> None:
    """Register the embedding-version subcommands on ``reid-stream``'s parser."""
    p = sub.add_parser("replay", help="re-embed the detections topic under an embedding version")
    p.add_argument("--embedding-version", required=True, help="the version the weights make")
    p.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="checkpoint of that version (default: REID_WEIGHTS_PATH, else seeded)",
    )
    start = p.add_mutually_exclusive_group()
    start.add_argument(
        "--from-beginning",
        action="store_true",
        help="start at the beginning (default: the replay group's committed "
        "offsets, else the beginning)",
    )
    start.add_argument(
        "--from-offsets",
        type=Path,
        default=None,
        help='JSON file {"<partition>": <offset>}; partitions not named start at the beginning',
    )
    start.add_argument(
        "--from-time",
        default=None,
        help="RFC 3339 time or Unix ms (brokers that support offset lookups by timestamp only)",
    )
    p.add_argument(
        "--until-end",
        action="store_true",
        help="stop when caught up with the live group (else follow it until SIGTERM)",
    )
    p.add_argument("--max-batches", type=int, default=None, help="stop after N batches")
    p.add_argument(
        "--idle-s",
        type=float,
        default=2.0,
        help="with --until-end: no message for this long at the end (default 2)",
    )
    p.add_argument(
        "--metrics-port", type=int, default=None, help="serve /metrics on this port (default: none)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("validate", help="compare two embedding versions on the replayed history")
    p.add_argument("--from", dest="old", required=True, help="the current (old) version")
    p.add_argument("--to", dest="new", required=True, help="the candidate (new) version")
    p.add_argument("--out", type=Path, default=Path("validate"), help="folder for JSON and PNG")
    p.add_argument(
        "--old-threshold", type=float, default=None, help="OLD's threshold (default REID_THRESHOLD)"
    )
    p.add_argument("--no-plot", action="store_true", help="JSON only")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("activate", help="switch the live consumers to an embedding version")
    p.add_argument("version")
    p.add_argument(
        "--force",
        action="store_true",
        help="also when some stored detections have no vector of that version",
    )
    p.set_defaults(func=cmd_activate)

    p = sub.add_parser("versions", help="list the embedding versions and their coverage")
    p.set_defaults(func=cmd_versions)

    p = sub.add_parser("drop-version", help="delete an (inactive) embedding version's vectors")
    p.add_argument("version")
    p.add_argument("--yes", action="store_true", help="required: the deletion cannot be undone")
    p.set_defaults(func=cmd_drop_version)


def _cli_settings(args: argparse.Namespace) -> Settings:
    from streams.cli import _settings

    return _settings(args)


def _store(settings: Settings) -> PgStore:
    store = PgStore(settings.database_url.get_secret_value())
    store.start()
    return store


def cmd_replay(args: argparse.Namespace) -> int:
    from sinks.metrics import ReplayMetrics
    from streams.app import build_embedder
    from streams.replay import (
        Progress,
        Replayer,
        ReplayError,
        parse_time,
        read_offsets_file,
    )

    settings = _cli_settings(args)
    weights = args.weights if args.weights is not None else settings.weights_path
    version = args.embedding_version
    metrics = ReplayMetrics()
    if args.metrics_port is not None:
        metrics.serve(args.metrics_port, settings.metrics_host)
    embedder = build_embedder(settings, weights_path=weights)
    replayer = Replayer(
        settings, embedder, version=version, weights_path=weights, metrics=metrics,
        progress=Progress(f"replay {version}", enabled=not args.no_progress), idle_s=args.idle_s,
    )  # fmt: skip

    def on_signal(signum: int, _frame: object) -> None:
        log.info("replay: %s received, finishing the batch in hand", signal.Signals(signum).name)
        replayer.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        replayer.start()
        starts = replayer.start_offsets(
            from_beginning=args.from_beginning,
            offsets=read_offsets_file(args.from_offsets) if args.from_offsets else None,
            from_time_ms=parse_time(args.from_time) if args.from_time else None,
        )
        stats = replayer.run(starts, until_end=args.until_end, max_batches=args.max_batches)
    except ReplayError as err:
        print(f"reid-stream replay: {err}", file=sys.stderr)
        return 2
    finally:
        replayer.stop()
        embedder.stop()
        metrics.shutdown()
    print(json.dumps(stats.summary(), sort_keys=True), flush=True)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from streams.validate import table, validate

    settings = _cli_settings(args)
    try:
        result = validate(
            settings, args.old, args.new, args.out, old_threshold=args.old_threshold,
            make_plot=not args.no_plot,
        )  # fmt: skip
    except ValueError as err:
        print(f"reid-stream validate: {err}", file=sys.stderr)
        return 2
    print(table(result))
    print(f"written: {args.out / 'validate.json'}"
          + ("" if args.no_plot else f", {args.out / 'validate.png'}"))  # fmt: skip
    return 0


def cmd_activate(args: argparse.Namespace) -> int:
    settings = _cli_settings(args)
    store = _store(settings)
    try:
        info = store.version(args.version)
        if info is None:
            print(f"reid-stream activate: unknown version {args.version!r}; replay it first "
                  "(reid-stream versions lists them)", file=sys.stderr)  # fmt: skip
            return 2
        cover = store.version_coverage(args.version)
        missing = cover["detections"] - cover["vectors"]
        if missing > 0 and not args.force:
            print(f"reid-stream activate: {missing} of {cover['detections']} stored detections "
                  f"have no {args.version} vector; run the replay again (it resumes where it "
                  "stopped) or pass --force", file=sys.stderr)  # fmt: skip
            return 2
        info = store.activate_version(args.version)
    finally:
        store.stop()
    # Warm Redis now, so that the consumers' own warm-up (and any consumer that restarts)
    # finds the version complete there.
    deer = warm_cache(settings, args.version, StreamMetrics())
    poll = settings.version_poll_s
    print(f"active embedding version: {info.version} (deer={deer}); live consumers switch "
          f"within REID_VERSION_POLL_S={poll:g}s plus the model load")  # fmt: skip
    return 0


def cmd_versions(args: argparse.Namespace) -> int:
    settings = _cli_settings(args)
    store = _store(settings)
    try:
        rows = []
        for info in store.versions():
            cover = store.version_coverage(info.version)
            rows.append({"version": info.version, "state": info.state,
                         "vectors": cover["vectors"], "detections": cover["detections"],
                         "centroids": cover["centroids"], "deer": cover["deer"],
                         "weights": info.weights_path or f"seed={info.seed} size={info.input_size}",
                         "activated_at": info.activated_at.isoformat()
                         if info.activated_at else None})  # fmt: skip
    finally:
        store.stop()
    for row in rows:
        print(json.dumps(row, sort_keys=True))
    return 0


def cmd_drop_version(args: argparse.Namespace) -> int:
    settings = _cli_settings(args)
    if not args.yes:
        print("reid-stream drop-version: pass --yes to delete the version's vectors, centroids "
              "and indexes", file=sys.stderr)  # fmt: skip
        return 2
    store = _store(settings)
    try:
        dropped = store.drop_version(args.version)
    except ValueError as err:
        print(f"reid-stream drop-version: {err}", file=sys.stderr)
        return 2
    finally:
        store.stop()
    redis_url = settings.redis_url.get_secret_value() if settings.redis_url else None
    if redis_url:
        cache = CentroidCache(redis_url, key_prefix=settings.cache_key_prefix)
        cache.start()
        try:
            cache.invalidate(args.version)
        except CacheUnavailable as err:
            print(f"warning: Redis keys of {args.version} not cleared: {err}", file=sys.stderr)
        finally:
            cache.stop()
    print(json.dumps({"dropped": args.version, **dropped}, sort_keys=True))
    return 0
