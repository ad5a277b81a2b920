"""The development commands: `stack`, `produce`, `demo`, `bench` (streams/tools/)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from streams.cli.common import settings_from


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stack", help="start/stop the embedded broker, PostgreSQL and Redis")
    p.add_argument("action", choices=["up", "down"])
    p.add_argument("--state", type=Path, required=True, help="folder for data, logs and pids")
    p.set_defaults(func=cmd_stack)

    p = sub.add_parser("produce", help="camera simulator: one detection event per image")
    p.add_argument("--images", type=Path, required=True, help="folder searched recursively")
    p.add_argument("--cameras", type=int, default=4, help="number of simulated cameras")
    p.add_argument("--limit", type=int, default=None, help="stop after N events (cycles images)")
    p.set_defaults(func=cmd_produce)

    p = sub.add_parser("bench", help="model, stream, matching and latency benchmark (a table)")
    from streams.tools.bench import add_arguments

    add_arguments(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="stack up, migrate, produce, consume, summarise, stack down")
    p.add_argument("--images", type=Path, default=None, help="photos (default: generated)")
    p.add_argument("--events", type=int, default=None, help="number of events")
    p.add_argument("--state", type=Path, default=None, help="stack folder (default: temporary)")
    p.set_defaults(func=cmd_demo)


def cmd_stack(args: argparse.Namespace) -> int:
    from streams.tools.stack import EmbeddedStack

    stack = EmbeddedStack(args.state)
    if args.action == "up":
        info = stack.up()
        print(info.export_lines())
    else:
        stack.down()
        print(f"# stack under {args.state} stopped", file=sys.stderr)
    return 0


def cmd_produce(args: argparse.Namespace) -> int:
    from streams.tools.produce import photos_from, produce_events
    from streams.topics import ensure_topics

    settings = settings_from(args)
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
    from streams.tools.demo import run_demo

    summary = run_demo(args.images, args.events, args.state)
    print(json.dumps(summary, sort_keys=True), flush=True)
    return 0 if summary["unaccounted"] == 0 else 1


def cmd_bench(args: argparse.Namespace) -> int:
    from streams.tools.bench import format_tables, plan_from, run_bench

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
