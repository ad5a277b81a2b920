"""JSON log lines: structured fields from ``extra=``, and nothing that looks like payload."""

from __future__ import annotations

import json
import logging

import pytest

from streams.logs import JsonFormatter, setup_logging


def record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("streams.processor", logging.INFO, __file__, 1, msg, args, None)
    rec.__dict__.update(extra)
    return rec


def test_json_line_carries_the_extra_fields() -> None:
    line = JsonFormatter().format(
        record("batch %d: messages=%d", 7, 3, batch_id=7, messages=3, offsets="det[0]:4-6")
    )
    doc = json.loads(line)
    assert doc["msg"] == "batch 7: messages=3"
    assert (doc["batch_id"], doc["messages"], doc["offsets"]) == (7, 3, "det[0]:4-6")
    assert doc["level"] == "INFO" and doc["logger"] == "streams.processor"
    assert doc["ts"].endswith("+00:00")
    assert "args" not in doc and "pathname" not in doc


def test_bytes_and_long_values_never_reach_the_line() -> None:
    image = b"\xff\xd8\xff\xe0" + b"JFIF" * 10_000
    line = JsonFormatter().format(
        record("x", payload=image, text="A" * 5000, nested={"v": image, "l": [image] * 2})
    )
    doc = json.loads(line)
    assert doc["payload"] == f"<{len(image)} bytes>"
    assert doc["nested"]["v"] == doc["nested"]["l"][0] == f"<{len(image)} bytes>"
    assert len(doc["text"]) < 600
    assert "JFIF" not in line


def test_exceptions_are_one_json_line() -> None:
    try:
        raise ValueError("bad")
    except ValueError:
        import sys

        rec = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    line = JsonFormatter().format(rec)
    assert "\n" not in line and "ValueError: bad" in json.loads(line)["exc"]


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_setup_logging_switches_format(fmt: str, capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging("info", fmt)
        logging.getLogger("t").info("hello %s", "there", extra={"batch_id": 1})
        err = capsys.readouterr().err.strip().splitlines()[-1]
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
    if fmt == "json":
        assert json.loads(err)["batch_id"] == 1
    else:
        assert err.endswith("INFO t hello there")
