"""Credentials out of every text that leaves the process: log lines, ``/readyz``, error exits.

Two passes, because a driver may echo any part of a connection string, well-formed or not
(libpq quotes a malformed URL whole, or only the piece after an ``@`` inside a password):

1. by shape, whatever the URL: the password of ``scheme://user:secret@host`` (lenient: the
   secret may hold ``@ : / ? #``, the URL may have one slash), and ``password=...`` /
   ``"password": "..."`` keyword forms;
2. by value: the secrets this process was configured with (:func:`add_secrets`, fed with
   the database and Redis URLs and the passwords of the settings and of ``REID_*``
   variables), their URL-decoded and JSON-escaped forms, and their pieces between URL
   delimiters, so a fragment that libpq quotes on its own is hidden too.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Mapping
from urllib.parse import unquote

MASK = "***"
# Shorter values are not redacted by value: "ab" would blank every "ab" in every line.
MIN_SECRET_CHARS = 4

_URL_PASSWORD = re.compile(
    # scheme, then 1-2 slashes (a malformed URL may have one), then user ':' secret '@'; the
    # secret runs to the last '@' of the token (greedy), so one holding '@' is hidden whole.
    r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*:/{1,2}[^\s:/@'\"]*:)(?P<secret>[^\s'\"]*)@"
)
_KEYWORD_PASSWORD = re.compile(
    r"(?i)(?P<head>\b[\w.-]*(?:password|passwd|pwd|secret|token)['\"]?\s*[=:]\s*)"
    r"(?P<value>'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|[^\s,;&'\"]+)"
)
# libpq's own words when it quotes a piece of a malformed URL that may be the password.
_LIBPQ_QUOTES = re.compile(
    r'(?P<head>(?:unexpected spaces found in|percent-encoded token:) ")[^"]*"'
)
_DELIMITERS = re.compile(r"[/@:?#&=,;\s'\"]+")
_SECRET_NAME = re.compile(r"(?i)password|passwd|secret|token")
# Settings that are connection URLs: only their password is secret, not the whole value.
URL_VARIABLES = ("REID_DATABASE_URL", "REID_REDIS_URL")

_lock = threading.Lock()
_secrets: tuple[str, ...] = ()  # longest first, so a secret is replaced before its pieces


def redact(text: str) -> str:
    """``text`` with URL passwords, ``password=`` values and every known secret masked."""
    if not text:
        return text
    text = _URL_PASSWORD.sub(lambda m: f"{m['head']}{MASK}@", text)
    text = _KEYWORD_PASSWORD.sub(_mask_keyword, text)
    text = _LIBPQ_QUOTES.sub(lambda m: f'{m["head"]}{MASK}"', text)
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def _mask_keyword(m: re.Match[str]) -> str:
    value = m["value"]
    quote = value[0] if value[0] in "'\"" else ""
    return f"{m['head']}{quote}{MASK}{quote}"


def add_secrets(*values: str | None) -> None:
    """Remember secret values (passwords, tokens) so that :func:`redact` hides them, with
    their decoded, escaped and fragment forms; empty and very short values are ignored."""
    found: set[str] = set()
    for value in values:
        if value:
            found |= _forms(value)
    if not found:
        return
    global _secrets
    with _lock:
        merged = set(_secrets) | found
        _secrets = tuple(sorted(merged, key=lambda s: (-len(s), s)))


def add_url_secrets(url: str | None) -> None:
    """Remember the password(s) found in a connection string of any shape."""
    if url:
        add_secrets(*passwords_in(url))


def add_environ_secrets(environ: Mapping[str, str]) -> None:
    """Remember the secrets of ``REID_*`` variables: the passwords inside the URL settings,
    and whole values of the ones named like a password, secret or token."""
    for name, value in environ.items():
        upper = name.upper()
        if not upper.startswith("REID_") or not value:
            continue
        if upper in URL_VARIABLES:
            add_url_secrets(value)
        elif _SECRET_NAME.search(upper):
            add_secrets(value)


def passwords_in(url: str) -> list[str]:
    """The password(s) of a connection string, found leniently: the userinfo of a URL up
    to its last ``@`` (so a password may hold ``@ : /``), ``password=`` keywords, and a
    ``password`` query parameter. Never raises."""
    found: list[str] = []
    at = url.rfind("@")
    if at > 0:
        head = re.sub(r"^\s*[A-Za-z][A-Za-z0-9+.-]*:/*", "", url[:at])
        if ":" in head:
            found.append(head.split(":", 1)[1])
    for m in _KEYWORD_PASSWORD.finditer(url):
        value = m["value"]
        if value[:1] in "'\"" and value[-1:] == value[:1] and len(value) >= 2:
            value = value[1:-1]
        found.append(value)
    return [p for p in found if p]


def _forms(secret: str) -> set[str]:
    forms = {secret, unquote(secret), json.dumps(secret)[1:-1]}
    for form in list(forms):
        forms.update(_DELIMITERS.split(form))
    return {f for f in forms if len(f) >= MIN_SECRET_CHARS and f != MASK}


def known_secrets() -> tuple[str, ...]:
    """The values redacted by value (for tests)."""
    return _secrets
