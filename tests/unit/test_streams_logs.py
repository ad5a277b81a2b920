"""JSON log lines: structured fields from ``extra=``, and nothing that looks like payload."""

from __future__ import annotations

import json
import logging

import pytest

from streams.logs import JsonFormatter, RateLimit, setup_logging


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


def test_rate_limit_lets_one_line_of_a_kind_through_per_interval() -> None:
    limit = RateLimit(interval_s=60.0)

    def passes(msg: str, *args: object, level: int = logging.ERROR) -> logging.LogRecord | None:
        rec = logging.LogRecord("librdkafka", level, __file__, 1, msg, args, None)
        return rec if limit.filter(rec) else None

    first = passes("%s: Connect to %s failed (after %dms)", "FAIL", "127.0.0.1:9092", 0)
    assert first is not None and "suppressed" not in first.getMessage()
    # The same kind (numbers differ), many times: held back.
    assert not any(
        passes("FAIL: Connect to 127.0.0.1:9092 failed (after %dms)", i) for i in range(50)
    )
    # Another kind, or another level, is its own kind.
    assert passes("FAIL: Disconnected from 127.0.0.1:9092") is not None
    assert passes("FAIL: Connect to 127.0.0.1:9092 failed (after 0ms)", level=logging.INFO)
    # Once the interval has passed, the next line says how many were held back.
    limit.interval_s = 0.0
    again = passes("FAIL: Connect to 127.0.0.1:9092 failed (after 1ms)")
    assert again is not None and again.suppressed == 50
    assert again.getMessage().endswith("(50 similar suppressed)")


def test_librdkafka_lines_go_through_logging_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    """A producer pointed at a closed port: librdkafka's connection errors reach stderr only
    as JSON lines of the `librdkafka` logger, a handful instead of one per retry."""
    import socket
    import time

    from confluent_kafka import Producer

    from streams.settings import load_settings

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    setup_logging("INFO", "json")
    try:
        settings = load_settings(kafka_bootstrap_servers=f"127.0.0.1:{port}")
        # Retries every few ms: without the limit, dozens of lines in two seconds.
        producer = Producer({**settings.producer_config(), "reconnect.backoff.ms": 5,
                             "reconnect.backoff.max.ms": 20})  # fmt: skip
        producer.produce("t", b"x")
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            producer.poll(0.05)
        producer.purge()
        producer.flush(1)
    finally:
        setup_logging("INFO", "text")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    docs = [json.loads(line) for line in lines]  # every line is JSON
    kafka = [d for d in docs if d["logger"] == "librdkafka"]
    assert kafka and any("Connect to" in d["msg"] for d in kafka), lines
    assert len(kafka) <= 5, lines
