"""The commands of the live service: `migrate`, `run`, `similar`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading

from streams.cli.common import add_command, settings_from, started_store
from streams.cli.errors import require_module
from streams.settings import Settings

log = logging.getLogger("reid-stream")

# The exit status when the shutdown bound passed with a batch still in flight.
EXIT_ABANDONED = 3


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "migrate",
        "create or upgrade the database schema (REID_DATABASE_URL)",
        "migrate",
        "--settings prod.env migrate",
    )
    p.set_defaults(func=cmd_migrate)

    p = add_command(
        sub,
        "run",
        "consume detections and publish assignments until SIGTERM",
        "run",
        "--log-format json run --runner faust",
    )
    p.add_argument(
        "--runner", choices=["confluent", "faust"], default="confluent",
        help="Kafka client driving the batches: confluent-kafka, or a faust-streaming agent "
        "(needs the `faust` extra; see docs/delivery.md, Runners)",
    )  # fmt: skip
    p.set_defaults(func=cmd_run)

    p = add_command(
        sub,
        "similar",
        "the stored detections most like one (pgvector HNSW)",
        "similar 3f6c0a52-1d2e-4c3b-9a61-0d4b2f9e8a11 -k 10",
    )
    p.add_argument("detection_id")
    p.add_argument("-k", type=int, default=5, help="how many (default 5)")
    p.add_argument("--version", default=None, help="embedding version (default: the active one)")
    p.add_argument("--ef-search", type=int, default=100, help="HNSW candidate list size")
    p.set_defaults(func=cmd_similar)


def cmd_migrate(args: argparse.Namespace) -> int:
    from sinks.migrate import migrate

    settings = settings_from(args)
    applied = migrate(settings.database_url.get_secret_value())
    print(f"applied {len(applied)} migration(s): {', '.join(applied) or 'none (up to date)'}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    # Missing extras stop the command here, before the model loads or a server is contacted.
    if args.runner == "faust":
        require_module("faust", "--runner faust")
    if settings.backend == "onnx":
        require_module("onnxruntime", "REID_BACKEND=onnx")
    from streams.app import StreamApp  # torch: seconds to import

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
    try:
        # Waits (one line per attempt, /readyz not ready) while the broker or the database
        # is down; False: stopped during the wait, nothing was consumed.
        if app.start():
            # Switches to a newly activated embedding version between batches (`activate`).
            app.consumer.run(between_batches=app.between_batches)
    finally:
        app.stop()
    return 0


def _abandon(settings: Settings) -> None:
    log.error(
        "run: shutdown bound of %.0fs passed; abandoning the in-flight batch uncommitted",
        settings.shutdown_timeout_s,
    )
    logging.shutdown()
    os._exit(EXIT_ABANDONED)


def cmd_similar(args: argparse.Namespace) -> int:
    from sinks.search import similar_to_stored

    settings = settings_from(args)
    store = started_store(settings)
    try:
        version = args.version
        if version is None:
            active = store.registry.active()
            if active is None:
                sys.exit("reid-stream: no active embedding version; pass --version")
            version = active.version
        try:
            found = similar_to_stored(
                store, version, args.detection_id, k=args.k, ef_search=args.ef_search,
                w_resnet=settings.weight_resnet, w_effnet=settings.weight_effnet,
            )  # fmt: skip
        except LookupError as err:
            sys.exit(f"reid-stream: {err}")
    finally:
        store.stop()
    for hit in found:
        doc = {**hit.__dict__, "captured_at": hit.captured_at.isoformat(), "version": version}
        print(json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in doc.items()}))
    return 0
