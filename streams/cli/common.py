"""What every `reid-stream` command needs first: its parser entry (a one-line description
and an example), logging, the settings, a started store."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from sinks.store import PgStore
from streams.logs import setup_logging
from streams.settings import Settings, explain, load_settings

# The format configure_logging() chose last: the final error line follows it.
LOG_FORMAT = {"current": "text"}


def add_command(
    sub: argparse._SubParsersAction, name: str, summary: str, *examples: str, **kwargs: Any
) -> argparse.ArgumentParser:
    """A subcommand whose ``--help`` starts with ``summary`` (one line, also shown in the
    command list) and ends with ``examples`` (command lines, without the program name)."""
    lines = "\n".join(f"  reid-stream {example}" for example in examples)
    return sub.add_parser(
        name, help=summary, description=summary[:1].upper() + summary[1:] + ".",
        epilog=f"example{'s' if len(examples) > 1 else ''}:\n{lines}",
        formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs,
    )  # fmt: skip


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Logging as asked, falling back to INFO/text: before the settings are validated, a
    wrong value must not stop the message that says so."""
    level = level.upper() if level.upper() in logging.getLevelNamesMapping() else "INFO"
    LOG_FORMAT["current"] = fmt if fmt in ("text", "json") else "text"
    setup_logging(level, LOG_FORMAT["current"])


def settings_from(args: argparse.Namespace, **overrides: object) -> Settings:
    """The validated settings (environment, ``--settings`` file, ``overrides``); exits with
    the offending variables named when they are invalid. Logging flags given on the command
    line win over the settings."""
    from pydantic import ValidationError
    from pydantic_settings.exceptions import SettingsError

    try:
        settings = load_settings(args.settings, **overrides)
    except ValidationError as err:
        sys.exit(f"reid-stream: invalid settings:\n{explain(err)}")
    except (SettingsError, FileNotFoundError) as err:
        sys.exit(f"reid-stream: invalid settings:\n  {err}")
    configure_logging(args.log_level or settings.log_level, args.log_format or settings.log_format)
    args.loaded_settings = settings  # for the error line: which broker, which database
    return settings


def started_store(settings: Settings) -> PgStore:
    """A connected store; the caller stops it."""
    store = PgStore(settings.database_url.get_secret_value())
    store.start()
    return store
