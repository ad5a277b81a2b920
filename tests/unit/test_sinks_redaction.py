"""Credentials are redacted from any text, whatever the shape of the URL that carried them."""

from __future__ import annotations

import io
import json
import logging

import pytest

from sinks import redaction
from sinks.redaction import add_environ_secrets, add_url_secrets, passwords_in, redact

SECRET = "Zq7-wX9!kL"


@pytest.fixture(autouse=True)
def _fresh_secrets(monkeypatch):
    monkeypatch.setattr(redaction, "_secrets", ())


@pytest.mark.parametrize(
    ("url", "password"),
    [
        (f"postgresql://reid:{SECRET}@db:5432/reid", SECRET),
        (f"postgresql://reid:{SECRET}@x/y@db:5432/reid", f"{SECRET}@x/y"),  # '@' and '/'
        (f"postgresql://reid:{SECRET}:x@db/reid", f"{SECRET}:x"),
        (f"postgres:/reid:{SECRET}@db/reid", SECRET),  # one slash: libpq quotes it whole
        (f"redis://:{SECRET}@127.0.0.1:6379/0", SECRET),
        (f"host=db user=reid password={SECRET} port=abc", SECRET),
        (f"host=db password='{SECRET} x' dbname=reid", f"{SECRET} x"),
        (f"postgresql://db/reid?user=reid&password={SECRET}", SECRET),
    ],
)
def test_passwords_are_found_in_any_shape(url, password):
    assert password in passwords_in(url)


def test_no_password_no_secret():
    assert passwords_in("postgresql://postgres@127.0.0.1:5432/reid") == []
    assert passwords_in("redis://127.0.0.1:6379/0") == []


@pytest.mark.parametrize(
    "text",
    [
        # what libpq and psycopg say about malformed URLs (measured with psycopg 3)
        f'missing "=" after "postgres:/reid:{SECRET}@127.0.0.1/reid" in connection info string',
        f'unexpected spaces found in "{SECRET} x", use percent-encoded spaces (%20) instead',
        f'invalid percent-encoded token: "{SECRET}%ZZ"',
        f'end of string reached ... in URI: "postgresql://reid:{SECRET}@[::1/reid"',
        f"connection to postgresql://u:{SECRET}@h:1/db failed",
        f"options: password={SECRET} host=h",
        f'{{"password": "{SECRET}"}}',
    ],
)
def test_shapes_are_redacted_without_knowing_the_secret(text):
    assert SECRET not in redact(text)


def test_configured_secret_and_its_pieces_are_redacted_anywhere():
    # libpq splits a password holding '@' and quotes only the part after it as a host.
    add_url_secrets("postgresql://reid:Pa55word@4rest-Key@127.0.0.1:5432/reid")
    leaked = "failed to resolve host '4rest-Key@127.0.0.1': Name or service not known"
    assert "4rest-Key" not in redact(leaked)
    assert "Pa55word" not in redact("port Pa55word is not a number")
    # percent-encoded in the URL, decoded in an error, and the other way round
    add_url_secrets("postgresql://reid:Sp%40ce-Tr4il@db/reid")
    assert "Sp@ce-Tr4il" not in redact("password Sp@ce-Tr4il rejected")
    assert "Sp%40ce-Tr4il" not in redact("token Sp%40ce-Tr4il")


def test_environment_secrets_are_remembered():
    add_environ_secrets(
        {
            "REID_DATABASE_URL": f"postgresql://reid:{SECRET}@db/reid",
            "REID_KAFKA_PASSWORD": "K4fka-Pw",
            "REID_REVIEW_TOKEN": "t0ken-value",
            "REID_THRESHOLD": "0.75",  # not a secret: stays readable
            "PATH": "/usr/bin",
        }
    )
    text = redact(f"{SECRET} K4fka-Pw t0ken-value 0.75 db")
    assert SECRET not in text and "K4fka-Pw" not in text and "t0ken-value" not in text
    assert "0.75" in text and "db" in text


def test_short_and_plain_text_is_left_alone():
    add_url_secrets("postgresql://reid:ab@db/reid")  # too short to redact by value
    text = "a batch of 32 events; http://127.0.0.1:9108/metrics; postgresql://reid@db/reid"
    assert redact(text) == text


def test_log_formatters_redact_text_and_json(monkeypatch):
    from streams.logs import setup_logging

    monkeypatch.setenv("REID_DATABASE_URL", f"postgresql://reid:{SECRET}@x@db/reid")
    for fmt in ("text", "json"):
        stream = io.StringIO()
        monkeypatch.setattr("sys.stderr", stream)
        setup_logging("INFO", fmt)
        log = logging.getLogger("test.redaction")
        try:
            raise ValueError(f"cannot parse host '{SECRET}@x@db'")
        except ValueError:
            log.exception("connect to %s failed", f"postgresql://reid:{SECRET}@x@db/reid")
        log.info("quoted", extra={"dsn": f'password="{SECRET}"'})
        out = stream.getvalue()
        assert "connect to" in out and "ValueError" in out
        assert SECRET not in out, out
        if fmt == "json":
            for line in out.splitlines():
                json.loads(line)  # still valid JSON after redaction
    setup_logging("INFO", "text")
