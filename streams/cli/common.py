"""What every `reid-stream` command needs first: logging, the settings, a started store."""

from __future__ import annotations

import argparse
import logging
import sys

from sinks.store import PgStore
from streams.logs import setup_logging
from streams.settings import Settings, explain, load_settings


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Logging as asked, falling back to INFO/text: before the settings are validated, a
    wrong value must not stop the message that says so."""
    level = level.upper() if level.upper() in logging.getLevelNamesMapping() else "INFO"
    setup_logging(level, fmt if fmt in ("text", "json") else "text")


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
    return settings


def started_store(settings: Settings) -> PgStore:
    """A connected store; the caller stops it."""
    store = PgStore(settings.database_url.get_secret_value())
    store.start()
    return store
