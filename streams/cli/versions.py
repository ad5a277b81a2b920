"""The embedding-version commands: `replay`, `validate`, `activate`, `versions`,
`drop-version` (docs/storage-and-versions.md)."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path

from sinks.cache import CacheUnavailable, CentroidCache
from sinks.metrics import StreamMetrics
from streams.cli.common import add_command, settings_from, started_store
from streams.cli.errors import CliError
from streams.versions import warm_cache

log = logging.getLogger("reid-stream")


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "replay", "re-embed the detections topic under an embedding version",
        "replay --embedding-version trained-v2 --weights models/v2.pt --until-end",
    )  # fmt: skip
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
    p.add_argument(
        "--no-live",
        action="store_true",
        help="no live consumer runs: read to the end instead of holding at the live group's "
        "committed offsets (events the database does not hold are skipped)",
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

    p = add_command(
        sub, "validate", "compare two embedding versions on the replayed history",
        "validate --from seed0-msr50+effb0-calib-v2 --to trained-v2 --out validate/",
    )  # fmt: skip
    p.add_argument("--from", dest="old", required=True, help="the current (old) version")
    p.add_argument("--to", dest="new", required=True, help="the candidate (new) version")
    p.add_argument("--out", type=Path, default=Path("validate"), help="folder for JSON and PNG")
    p.add_argument(
        "--old-threshold", type=float, default=None,
        help="OLD's threshold (default: its own in the registry, else REID_THRESHOLD)",
    )  # fmt: skip
    p.add_argument("--no-plot", action="store_true", help="JSON only")
    p.set_defaults(func=cmd_validate)

    p = add_command(sub, "activate", "switch the live consumers to an embedding version",
                    "activate trained-v2")  # fmt: skip
    p.add_argument("version")
    p.add_argument(
        "--force",
        action="store_true",
        help="also when some stored detections have no vector of that version",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="the version's own assignment threshold (stored in the registry; both runners "
        "use it instead of REID_THRESHOLD); reid-eval and validate suggest one",
    )
    p.set_defaults(func=cmd_activate)

    p = add_command(sub, "versions", "list the embedding versions and their coverage", "versions")
    p.set_defaults(func=cmd_versions)

    p = add_command(sub, "drop-version", "delete an (inactive) embedding version's vectors",
                    "drop-version seed0-msr50+effb0-calib-v2 --yes")  # fmt: skip
    p.add_argument("version")
    p.add_argument("--yes", action="store_true", help="required: the deletion cannot be undone")
    p.set_defaults(func=cmd_drop_version)


def cmd_replay(args: argparse.Namespace) -> int:
    from sinks.metrics import ReplayMetrics
    from streams.replay import Replayer, ReplayError
    from streams.versions import build_embedder

    settings = settings_from(args)
    try:
        offsets = read_offsets_file(args.from_offsets) if args.from_offsets else None
        from_time_ms = parse_time(args.from_time) if args.from_time else None
    except ValueError as err:
        print(f"reid-stream replay: {err}", file=sys.stderr)
        return 2
    weights = args.weights if args.weights is not None else settings.weights_path
    if weights is not None and not Path(weights).is_file():
        raise CliError(f"weights file {weights} not found (--weights or REID_WEIGHTS_PATH)")
    version = args.embedding_version
    metrics = ReplayMetrics()
    if args.metrics_port is not None:
        metrics.serve(args.metrics_port, settings.metrics_host)
    embedder = build_embedder(settings, weights_path=weights)
    replayer = Replayer(
        settings, embedder, version=version, weights_path=weights, metrics=metrics,
        progress=not args.no_progress, idle_s=args.idle_s, follow_live=not args.no_live,
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
            offsets=offsets,
            from_time_ms=from_time_ms,
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

    settings = settings_from(args)
    try:
        result = validate(
            settings, args.old, args.new, args.out, old_threshold=args.old_threshold,
            make_plot=not args.no_plot,
        )  # fmt: skip
    except ValueError as err:
        print(f"reid-stream validate: {err}", file=sys.stderr)
        return 2
    print(table(result))
    print(f"to use the suggested threshold: {result['activate']}")
    print(f"written: {args.out / 'validate.json'}"
          + ("" if args.no_plot else f", {args.out / 'validate.png'}"))  # fmt: skip
    return 0


def cmd_activate(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    store = started_store(settings)
    try:
        info = store.registry.get(args.version)
        if info is None:
            print(f"reid-stream activate: unknown version {args.version!r}; replay it first "
                  "(reid-stream versions lists them)", file=sys.stderr)  # fmt: skip
            return 2
        cover = store.registry.coverage(args.version)
        missing = cover["detections"] - cover["vectors"]
        if missing > 0 and not args.force:
            print(f"reid-stream activate: {missing} of {cover['detections']} stored detections "
                  f"have no {args.version} vector; run the replay again (it resumes where it "
                  "stopped) or pass --force", file=sys.stderr)  # fmt: skip
            return 2
        info = store.registry.activate(args.version, threshold=args.threshold)
    finally:
        store.stop()
    # Warm Redis now, so that the consumers' own warm-up (and any consumer that restarts)
    # finds the version complete there.
    deer = warm_cache(settings, args.version, StreamMetrics())
    poll = settings.version_poll_s
    own = "REID_THRESHOLD" if info.threshold is None else f"{info.threshold:g}"
    print(f"active embedding version: {info.version} (deer={deer}, threshold {own}); live "
          f"consumers switch within REID_VERSION_POLL_S={poll:g}s plus the model load")  # fmt: skip
    return 0


def cmd_versions(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    store = started_store(settings)
    try:
        rows = []
        for info in store.registry.versions():
            cover = store.registry.coverage(info.version)
            rows.append({"version": info.version, "state": info.state,
                         "vectors": cover["vectors"], "detections": cover["detections"],
                         "centroids": cover["centroids"], "deer": cover["deer"],
                         "weights": info.weights_path or f"seed={info.seed} size={info.input_size}",
                         "threshold": info.threshold,
                         "activated_at": info.activated_at.isoformat()
                         if info.activated_at else None})  # fmt: skip
    finally:
        store.stop()
    for row in rows:
        print(json.dumps(row, sort_keys=True))
    return 0


def cmd_drop_version(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    if not args.yes:
        print("reid-stream drop-version: pass --yes to delete the version's vectors, centroids "
              "and indexes", file=sys.stderr)  # fmt: skip
        return 2
    store = started_store(settings)
    try:
        dropped = store.registry.drop(args.version)
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


def read_offsets_file(path: Path) -> dict[int, int]:
    """``{"<partition>": <offset>, ...}``; partitions not named start at the beginning."""
    try:
        raw = json.loads(Path(path).read_text())
        offsets = {int(p): int(o) for p, o in raw.items()}
    except (OSError, ValueError, AttributeError, TypeError) as err:
        raise ValueError(f"{path}: expected a JSON object partition -> offset: {err}") from err
    if any(o < 0 for o in offsets.values()):
        raise ValueError(f"{path}: offsets must be >= 0")
    return offsets


def parse_time(text: str) -> int:
    """RFC 3339 (``2026-11-02T05:00:00Z``) or Unix milliseconds, as Unix milliseconds."""
    if text.isdigit():
        return int(text)
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as err:
        raise ValueError(f"--from-time {text!r}: not RFC 3339 nor Unix milliseconds") from err
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)
