"""`reid-stream`: the command line. Each module registers its commands; a command parses,
calls the service or a tool, and prints. Nothing outside this package imports it."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from importlib import metadata
from pathlib import Path

from streams.cli import deer, service, tools, versions, weights
from streams.cli.common import LOG_FORMAT, configure_logging
from streams.cli.errors import EXIT_FAILED, EXIT_INTERRUPTED, one_line, redacted
from streams.settings import unknown_variables

log = logging.getLogger("reid-stream")


def version() -> str:
    try:
        return metadata.version("deer-reid-stream")
    except metadata.PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reid-stream",
        description="Re-identify animals from camera-trap detections, as a stream: the "
        "service, its embedding-version commands and the development tools.",
    )
    parser.add_argument(
        "--settings", type=Path, default=None, help="dotenv settings file (REID_SETTINGS_FILE)"
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    parser.add_argument("--log-level", default=None, help="overrides REID_LOG_LEVEL")
    parser.add_argument(
        "--log-format", default=None, help="text or json; overrides REID_LOG_FORMAT"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    service.add_commands(sub)  # migrate, run, similar
    tools.add_commands(sub)  # stack, produce, bench, demo
    versions.add_commands(sub)  # replay, validate, activate, versions, drop-version
    deer.add_commands(sub)  # deer show|history|merge|split|move|confirm|publish, review
    weights.add_commands(sub)  # weights list, pull, verify, checkpoint
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(
        args.log_level or os.environ.get("REID_LOG_LEVEL", "INFO"),
        args.log_format or os.environ.get("REID_LOG_FORMAT", "text"),
    )
    for line in unknown_variables(os.environ):
        log.warning("%s", line)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as err:
        settings = getattr(args, "loaded_settings", None)
        message = one_line(err, settings)
        if message is None:
            # Not a failure we know: a bug, whose traceback helps; redacted all the same
            # (an exception's text may quote a connection string).
            print(redacted(traceback.format_exc(), settings), end="", file=sys.stderr)
            return EXIT_FAILED
        fail(f"{args.command}: {redacted(message, settings)}")
        return EXIT_FAILED


def fail(message: str) -> None:
    """The one line a failed command ends with: a log record in JSON mode, else plain text."""
    if LOG_FORMAT["current"] == "json":
        log.error("%s", message)
    else:
        print(f"reid-stream {message}", file=sys.stderr, flush=True)
