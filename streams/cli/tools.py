"""The development commands: `stack`, `produce`, `demo`, `bench` (streams/tools/)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from streams.cli.common import add_command, settings_from
from streams.cli.errors import CliError


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "stack", "start/stop the embedded broker, PostgreSQL and Redis",
                    'stack up --state .state   # then: eval "$(reid-stream stack up ...)"',
                    "stack down --state .state")  # fmt: skip
    p.add_argument("action", choices=["up", "down"])
    p.add_argument("--state", type=Path, required=True, help="folder for data, logs and pids")
    p.set_defaults(func=cmd_stack)

    p = add_command(sub, "produce", "camera simulator: one detection event per image",
                    "produce --images tests/data/zebra --cameras 4 --limit 100")  # fmt: skip
    p.add_argument("--images", type=Path, required=True, help="folder searched recursively")
    p.add_argument("--cameras", type=positive, default=4, help="number of simulated cameras")
    p.add_argument("--limit", type=positive, default=None, help="stop after N events (cycles)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=cmd_produce)

    p = add_command(
        sub,
        "bench",
        "model, stream, matching and latency benchmark (a table)",
        "bench --quick",
        "bench --sections model,stream --json bench.json",
    )
    from streams.tools.bench import add_arguments

    add_arguments(p)
    p.set_defaults(func=cmd_bench)

    p = add_command(
        sub,
        "demo",
        "stack up, migrate, produce, consume, summarise, stack down",
        "demo",
        "demo --images tests/data/zebra --events 200",
    )
    p.add_argument("--images", type=Path, default=None, help="photos (default: generated)")
    p.add_argument("--events", type=positive, default=None, help="number of events")
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
    from streams.tools.produce import find_images, photos_from, produce_events
    from streams.topics import ensure_stream_topics

    folder = image_folder(args.images)  # before the broker: a wrong folder fails at once
    photos = photos_from(folder, args.limit)
    settings = settings_from(args)
    ensure_stream_topics(settings, [settings.topic_detections])
    produced = produce_events(
        settings.producer_config(), settings.topic_detections, photos, cameras=args.cameras,
        progress=not args.no_progress, total=args.limit or len(find_images(folder)),
    )  # fmt: skip
    print(f"produced {len(produced)} detection events to {settings.topic_detections}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from streams.tools.demo import run_demo

    images = image_folder(args.images) if args.images is not None else None
    summary = run_demo(images, args.events, args.state)
    print(json.dumps(summary, sort_keys=True), flush=True)
    return 0 if summary["unaccounted"] == 0 else 1


def cmd_bench(args: argparse.Namespace) -> int:
    from streams.tools.bench import format_tables, plan_from, run_bench

    if args.images is not None:
        image_folder(args.images)
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


def positive(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is less than 1")
    return value


def image_folder(path: Path) -> Path:
    """``path`` if it is a folder with at least one image in it (searched recursively), so
    that a wrong ``--images`` fails at once, before any server is started or contacted."""
    from streams.tools.produce import IMAGE_SUFFIXES, find_images

    if not path.is_dir():
        what = "is not a folder" if path.exists() else "does not exist"
        raise CliError(f"--images {path} {what}; give a folder of photos")
    if not find_images(path):
        raise CliError(f"--images {path} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return path
