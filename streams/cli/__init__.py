"""`reid-stream`: the command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

log = logging.getLogger("reid-stream")


def _setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    from streams.logs import setup_logging

    # Before the settings are validated a wrong value must not stop the message saying so.
    level = level.upper() if level.upper() in logging.getLevelNamesMapping() else "INFO"
    setup_logging(level, fmt if fmt in ("text", "json") else "text")


def _settings(args: argparse.Namespace, **overrides):
    from pydantic import ValidationError
    from pydantic_settings.exceptions import SettingsError

    from streams.settings import explain, load_settings

    try:
        settings = load_settings(args.settings, **overrides)
    except ValidationError as err:
        sys.exit(f"reid-stream: invalid settings:\n{explain(err)}")
    except (SettingsError, FileNotFoundError) as err:
        sys.exit(f"reid-stream: invalid settings:\n  {err}")
    # Flags given on the command line win over the settings.
    _setup_logging(args.log_level or settings.log_level, args.log_format or settings.log_format)
    return settings


def cmd_stack(args: argparse.Namespace) -> int:
    from streams.stack import EmbeddedStack

    stack = EmbeddedStack(args.state)
    if args.action == "up":
        info = stack.up()
        print(info.export_lines())
    else:
        stack.down()
        print(f"# stack under {args.state} stopped", file=sys.stderr)
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from sinks.migrate import migrate

    settings = _settings(args)
    applied = migrate(settings.database_url.get_secret_value())
    print(f"applied {len(applied)} migration(s): {', '.join(applied) or 'none (up to date)'}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from streams.app import StreamApp

    settings = _settings(args)
    app = StreamApp(settings, runner=args.runner)

    def on_signal(signum: int, _frame: object) -> None:
        if app.consumer.stopping:
            return
        log.info("run: %s received, finishing the batch in hand", signal.Signals(signum).name)
        app.consumer.request_stop()
        # A batch stuck on an outage must not hold the process past the bound: exiting
        # without a commit abandons it, and the group redelivers it to another member.
        timer = threading.Timer(settings.shutdown_timeout_s, _abandon, args=(settings,))
        timer.daemon = True
        timer.start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    app.start()
    try:
        # Switches to a newly activated embedding version between batches (`activate`).
        app.consumer.run(between_batches=app.between_batches)
    finally:
        app.stop()
    return 0


def _abandon(settings) -> None:
    log.error(
        "run: shutdown bound of %.0fs passed; abandoning the in-flight batch uncommitted",
        settings.shutdown_timeout_s,
    )
    logging.shutdown()
    os._exit(3)


def cmd_produce(args: argparse.Namespace) -> int:
    from streams.produce import photos_from, produce_events
    from streams.topics import ensure_topics

    settings = _settings(args)
    ensure_topics(settings.kafka_common(), [settings.topic_detections], settings.topic_partitions)
    produced = produce_events(
        settings.producer_config(),
        settings.topic_detections,
        photos_from(args.images, args.limit),
        cameras=args.cameras,
    )
    print(f"produced {len(produced)} detection events to {settings.topic_detections}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from streams.demo import run_demo

    summary = run_demo(args.images, args.events, args.state)
    print(json.dumps(summary, sort_keys=True), flush=True)
    return 0 if summary["unaccounted"] == 0 else 1


def cmd_bench(args: argparse.Namespace) -> int:
    from streams.bench import format_tables, plan_from, run_bench

    plan = plan_from(args)
    sections = tuple(args.sections.split(",")) if args.sections else None
    report = run_bench(
        plan, use_env=args.use_env, images=args.images, settings_file=args.settings,
        sections=sections,
    )  # fmt: skip
    args.json.write_text(report.to_json())
    print(format_tables(report))
    print(f"figures written to {args.json}")
    return 0


def cmd_similar(args: argparse.Namespace) -> int:
    import psycopg

    from sinks.search import similar_detections, stored_vectors
    from sinks.store import PgStore

    settings = _settings(args)
    dsn = settings.database_url.get_secret_value()
    version = args.version
    if version is None:
        store = PgStore(dsn)
        store.start()
        try:
            active = store.active_version()
        finally:
            store.stop()
        if active is None:
            sys.exit("reid-stream: no active embedding version; pass --version")
        version = active.version
    with psycopg.connect(dsn, autocommit=True, application_name="reid-similar") as conn:
        query = stored_vectors(conn, version, args.detection_id)
        if query is None:
            sys.exit(f"reid-stream: detection {args.detection_id!r} has no vector of {version!r}")
        found = similar_detections(
            conn, version, *query, k=args.k, ef_search=args.ef_search, exclude=args.detection_id,
            w_resnet=settings.weight_resnet, w_effnet=settings.weight_effnet,
        )  # fmt: skip
    for hit in found:
        doc = {**hit.__dict__, "captured_at": hit.captured_at.isoformat(), "version": version}
        print(json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in doc.items()}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reid-stream", description=__doc__)
    parser.add_argument(
        "--settings", type=Path, default=None, help="dotenv settings file (REID_SETTINGS_FILE)"
    )
    parser.add_argument("--log-level", default=None, help="overrides REID_LOG_LEVEL")
    parser.add_argument(
        "--log-format", default=None, help="text or json; overrides REID_LOG_FORMAT"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("stack", help="start/stop the embedded broker, PostgreSQL and Redis")
    p.add_argument("action", choices=["up", "down"])
    p.add_argument("--state", type=Path, required=True, help="folder for data, logs and pids")
    p.set_defaults(func=cmd_stack)

    p = sub.add_parser("migrate", help="create or upgrade the database schema")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("run", help="consume detections and publish assignments until SIGTERM")
    p.add_argument(
        "--runner", choices=["confluent", "faust"], default="confluent",
        help="Kafka client driving the batches: confluent-kafka, or a faust-streaming agent "
        "(needs the `faust` extra; see README 'Runners')",
    )  # fmt: skip
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("produce", help="camera simulator: one detection event per image")
    p.add_argument("--images", type=Path, required=True, help="folder searched recursively")
    p.add_argument("--cameras", type=int, default=4, help="number of simulated cameras")
    p.add_argument("--limit", type=int, default=None, help="stop after N events (cycles images)")
    p.set_defaults(func=cmd_produce)

    p = sub.add_parser("similar", help="the stored detections most like one (pgvector HNSW)")
    p.add_argument("detection_id")
    p.add_argument("-k", type=int, default=5, help="how many (default 5)")
    p.add_argument("--version", default=None, help="embedding version (default: the active one)")
    p.add_argument("--ef-search", type=int, default=100, help="HNSW candidate list size")
    p.set_defaults(func=cmd_similar)

    p = sub.add_parser("bench", help="model, stream, matching and latency benchmark (a table)")
    from streams.bench import add_arguments

    add_arguments(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="stack up, migrate, produce, consume, summarise, stack down")
    p.add_argument("--images", type=Path, default=None, help="photos (default: generated)")
    p.add_argument("--events", type=int, default=None, help="number of events")
    p.add_argument("--state", type=Path, default=None, help="stack folder (default: temporary)")
    p.set_defaults(func=cmd_demo)

    # replay, validate, activate, versions, drop-version (README "Replay and model versions")
    from streams.versions import add_version_commands

    add_version_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(
        args.log_level or os.environ.get("REID_LOG_LEVEL", "INFO"),
        args.log_format or os.environ.get("REID_LOG_FORMAT", "text"),
    )
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
