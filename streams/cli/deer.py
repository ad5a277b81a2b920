"""The curation commands: `deer show|history|merge|split|move|confirm|publish` and `review`
(docs/curation.md). They parse, call ``streams.curation`` / ``sinks.curation_reads`` or the
review server, and print JSON."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from typing import Any

from streams.cli.common import add_command, settings_from, started_store


def add_commands(sub: argparse._SubParsersAction) -> None:
    deer = add_command(
        sub,
        "deer",
        "show, merge, split and correct deer (curation)",
        "deer show 17",
        "deer merge 17 42 --reason 'same scar on the left flank'",
        "deer split 17 --detections cam3-0042 cam3-0043",
    )
    actions = deer.add_subparsers(dest="deer_command", required=True)

    p = add_command(
        actions,
        "show",
        "a deer as JSON: sightings, seen, cameras, versions, recent",
        "deer show 17",
        "deer show 42   # merged: shows its survivor",
    )
    p.add_argument("deer_id", type=int)
    p.add_argument("--recent", type=int, default=10, help="recent detections listed (10)")
    p.set_defaults(func=cmd_show)

    p = add_command(
        actions, "history", "the curation changes that named a deer, in order", "deer history 17"
    )
    p.add_argument("deer_id", type=int)
    p.set_defaults(func=cmd_history)

    p = add_command(
        actions,
        "merge",
        "merge deer OTHER into KEEP (OTHER stays an alias of KEEP)",
        "deer merge 17 42 --reason 'same animal'",
    )
    p.add_argument("keep", type=int)
    p.add_argument("other", type=int)
    p.add_argument("--reason", default=None, help="why, kept with the change")
    p.set_defaults(func=cmd_change, change="merge")

    p = add_command(
        actions,
        "split",
        "make some detections of a deer a new deer",
        "deer split 17 --detections cam3-0042 cam3-0043 --reason 'two animals'",
    )
    p.add_argument("deer_id", type=int)
    p.add_argument("--detections", nargs="+", required=True, help="detection ids to split off")
    p.add_argument("--reason", default=None, help="why, kept with the change")
    p.set_defaults(func=cmd_change, change="split")

    p = add_command(
        actions,
        "move",
        "move detections (of one deer) to another existing deer",
        "deer move 17 --detections cam3-0042",
    )
    p.add_argument("to_deer", type=int)
    p.add_argument("--detections", nargs="+", required=True, help="detection ids to move")
    p.add_argument("--reason", default=None, help="why, kept with the change")
    p.set_defaults(func=cmd_change, change="move")

    p = add_command(
        actions,
        "confirm",
        "mark a flagged detection reviewed where it is",
        "deer confirm cam3-0042",
    )
    p.add_argument("detection_id")
    p.add_argument("--reason", default=None, help="a note, kept with the change")
    p.set_defaults(func=cmd_change, change="confirm")

    p = add_command(
        actions,
        "publish",
        "send the deer.changes events the broker did not acknowledge",
        "deer publish",
    )
    p.set_defaults(func=cmd_publish)

    p = add_command(
        sub,
        "review",
        "serve the review page (queue, deer, merge, split) until SIGTERM",
        "review",
        "review --port 8090",
        "review --host 0.0.0.0   # needs REID_REVIEW_TOKEN",
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    p.add_argument("--port", type=int, default=8088, help="port (default 8088; 0 = any)")
    p.set_defaults(func=cmd_review)


def _print(doc: Any) -> None:
    def default(value: Any) -> Any:
        if isinstance(value, datetime):
            return value.isoformat()
        if hasattr(value, "__dataclass_fields__"):
            return {k: getattr(value, k) for k in value.__dataclass_fields__}
        return str(value)

    print(json.dumps(doc, indent=2, default=default))


def cmd_show(args: argparse.Namespace) -> int:
    from sinks.curation_reads import show

    store = started_store(settings_from(args))
    try:
        doc = show(store, args.deer_id, recent=args.recent)
    finally:
        store.stop()
    if doc is None:
        print(f"reid-stream deer show: no deer {args.deer_id}", file=sys.stderr)
        return 1
    _print(doc)
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    from sinks.curation_reads import history, resolve
    from streams.curation import change_event

    store = started_store(settings_from(args))
    try:
        changes = history(store, args.deer_id)
        now = resolve(store, args.deer_id)
    finally:
        store.stop()
    _print({"deer_id": args.deer_id, "now": now,
            "changes": [json.loads(change_event(c)) for c in changes]})  # fmt: skip
    return 0


def cmd_change(args: argparse.Namespace) -> int:
    from sinks.curation import CurationRefused
    from streams.curation import Curator, result_doc

    curator = Curator(settings_from(args))
    curator.start()
    try:
        if args.change == "merge":
            result = curator.merge(args.keep, args.other, args.reason)
        elif args.change == "split":
            result = curator.split(args.deer_id, args.detections, args.reason)
        elif args.change == "move":
            result = curator.move(args.detections, args.to_deer, args.reason)
        else:
            result = curator.confirm(args.detection_id, args.reason)
    except CurationRefused as err:
        print(f"reid-stream deer {args.change}: {err}", file=sys.stderr)
        return 1
    finally:
        curator.stop()
    _print(result_doc(result))
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    from streams.curation import Curator

    curator = Curator(settings_from(args))
    curator.start()
    try:
        sent = curator.publish_pending()
    finally:
        curator.stop()
    print(f"published {sent} pending change event(s)")
    return 0


def cmd_review(args: argparse.Namespace) -> int:
    from streams.review.server import ReviewServer

    settings = settings_from(args)
    try:
        server = ReviewServer(settings, host=args.host, port=args.port)
    except ValueError as err:
        print(f"reid-stream review: {err}", file=sys.stderr)
        return 2
    server.serve_until_signal()
    return 0
