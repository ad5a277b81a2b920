"""What an operator reads: logging setup (text lines for people, or JSON lines for log shippers,
``REID_LOG_FORMAT``) and progress bars for long jobs.

Structured fields ride on ``extra=`` (``log.info("...", extra={"batch_id": 7})``): the JSON
format writes them as top-level keys, the text format leaves them out (the message already
says the same in words). Only scalars and small lists/dicts of scalars are written, and long
strings are cut, so a careless ``extra`` cannot put image bytes into the logs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from tqdm import tqdm

from sinks.redaction import add_environ_secrets, redact

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
MAX_FIELD_CHARS = 512

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("x", 0, "x", 0, "x", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


def _clip(value: Any, depth: int = 0) -> Any:
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        if len(value) > MAX_FIELD_CHARS:
            return value[:MAX_FIELD_CHARS] + f"...(+{len(value) - MAX_FIELD_CHARS} chars)"
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes>"  # never the bytes themselves
    if depth < 2 and isinstance(value, list | tuple):
        return [_clip(v, depth + 1) for v in value[:64]]
    if depth < 2 and isinstance(value, dict):
        return {str(k): _clip(v, depth + 1) for k, v in list(value.items())[:64]}
    return _clip(str(value), depth + 1) if depth < 3 else "<...>"


def _redacted(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, list):
        return [_redacted(v) for v in value]
    if isinstance(value, dict):
        return {k: _redacted(v) for k, v in value.items()}
    return value


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, the ``extra`` fields, and exc;
    every string redacted (``sinks.redaction``) before it is JSON-escaped."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_") and key not in doc:
                doc[key] = _clip(value)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return json.dumps(_redacted(doc), default=str, ensure_ascii=False)


class RedactingFormatter(logging.Formatter):
    """The text format, with credentials masked in the whole line, traceback included: a
    driver's error may quote a connection string (``sinks.redaction``)."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    """(Re)configure the root logger to stderr; safe to call again once settings are read.
    Both formats redact credentials, the ``REID_*`` secrets of the environment included."""
    add_environ_secrets(os.environ)
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(RedactingFormatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


class RateLimit(logging.Filter):
    """Lets the first line of each kind through, then at most one per ``interval_s``; the
    next line let through says how many were held back (``suppressed`` in JSON). A kind is the
    level and the message with its numbers blanked, so "Connect to ...:9092 failed (after
    0ms)" repeating every second during an outage is one line per interval, not thousands."""

    MAX_KINDS = 1000

    def __init__(self, interval_s: float = 30.0) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._seen: dict[tuple[int, str], tuple[float, int]] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        kind = (record.levelno, re.sub(r"\d+", "#", message)[:200])
        now = time.monotonic()
        with self._lock:
            last, held = self._seen.get(kind, (None, 0))
            if last is not None and now - last < self.interval_s:
                self._seen[kind] = (last, held + 1)
                return False
            if len(self._seen) >= self.MAX_KINDS:
                self._seen.clear()  # bounded memory; at worst a few repeats get through
            self._seen[kind] = (now, 0)
        if held:
            record.msg, record.args = f"{message} ({held} similar suppressed)", None
            record.suppressed = held
        return True


_KAFKA_LOG = logging.getLogger("librdkafka")
_KAFKA_LOG.addFilter(RateLimit())


def kafka_logger() -> logging.Logger:
    """The logger to give every confluent-kafka client (config key ``logger``): librdkafka's
    own lines then go through the project's handlers (``--log-format json`` stays JSON) and
    are rate-limited, instead of going straight to stderr."""
    return _KAFKA_LOG


class _Hold(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.held = 0

    def filter(self, record: logging.LogRecord) -> bool:
        self.held += 1
        return False


@contextlib.contextmanager
def kafka_logs_held() -> Iterator[None]:
    """Hold back librdkafka's own lines for the body of the ``with`` (start-up waiting for a
    broker that is down: the wait logs one line per attempt instead of every client's
    connection errors); says how many were held at the end."""
    hold = _Hold()
    _KAFKA_LOG.addFilter(hold)
    try:
        yield
    finally:
        _KAFKA_LOG.removeFilter(hold)
        if hold.held:
            logging.getLogger(__name__).info(
                "librdkafka: %d line(s) held back while waiting for the broker", hold.held
            )


def with_kafka_logger(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with :func:`kafka_logger` unless it names a logger already."""
    return {"logger": _KAFKA_LOG, **config}


def progress_bar(
    desc: str, *, total: int | None = None, unit: str = "ev", enabled: bool = True
) -> tqdm:
    """A progress bar on stderr for a long job, redrawn at most twice a second. Quiet when
    stderr is not a terminal (logs, CI, a pipe): the job's own log lines say what it did."""
    tty = sys.stderr.isatty()
    return tqdm(
        desc=desc, total=total, unit=unit, file=sys.stderr, disable=not (enabled and tty),
        mininterval=0.5, dynamic_ncols=True,
    )  # fmt: skip
