"""What keeps the review page safe to run: loopback by default, an access token for anything
else, a session per browser with its own CSRF token, and changes only by POST.

- **Bind.** A loopback address (127.0.0.0/8, ::1, ``localhost``) needs no token; any other
  address is refused unless ``REID_REVIEW_TOKEN`` is set, since anyone who can reach the page
  could change the herd.
- **Token.** When set, every request needs a session that logged in with it (a form POST to
  ``/login``) or an ``Authorization: Bearer`` header; compared in constant time.
- **CSRF.** Each session gets a random token, put in every form; a POST whose form token does
  not match its session's is refused, and so is one whose ``Origin`` names another host.
  The session cookie is ``HttpOnly`` and ``SameSite=Strict``.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from urllib.parse import urlsplit

COOKIE = "reid_review"
MAX_SESSIONS = 1000
SESSION_TTL_S = 12 * 3600.0


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Raise ValueError when ``host`` is not loopback and no token protects the page."""
    if not is_loopback(host) and not token:
        raise ValueError(
            f"refused to serve the review page on {host}: beyond loopback it needs "
            "REID_REVIEW_TOKEN (anyone who can reach the page could change the herd)"
        )


def same(a: str | None, b: str | None) -> bool:
    """Constant-time equality of two secrets (False when either is missing)."""
    if not a or not b:
        return False
    return hmac.compare_digest(a.encode(), b.encode())


def origin_matches(origin: str | None, host_header: str | None) -> bool:
    """A POST's ``Origin`` (when the browser sends one) must name the page's own host."""
    if not origin:
        return True
    if origin == "null" or not host_header:
        return False
    return urlsplit(origin).netloc.lower() == host_header.lower()


@dataclass
class Session:
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    authenticated: bool = False
    flash: list[tuple[str, str]] = field(default_factory=list)  # (kind, text) for the next page
    seen: float = field(default_factory=time.monotonic)


class Sessions:
    """Sessions by cookie value, newest kept (at most ``MAX_SESSIONS``, idle ones expire)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def get(self, sid: str | None) -> Session | None:
        if not sid:
            return None
        with self._lock:
            session = self._sessions.get(sid)
            if session is None:
                return None
            if time.monotonic() - session.seen > SESSION_TTL_S:
                del self._sessions[sid]
                return None
            session.seen = time.monotonic()
            self._sessions.move_to_end(sid)
            return session

    def new(self) -> tuple[str, Session]:
        sid = secrets.token_urlsafe(32)
        session = Session()
        with self._lock:
            self._sessions[sid] = session
            while len(self._sessions) > MAX_SESSIONS:
                self._sessions.popitem(last=False)
        return sid, session


def cookie_header(sid: str) -> str:
    return f"{COOKIE}={sid}; HttpOnly; SameSite=Strict; Path=/"


def cookie_value(header: str | None) -> str | None:
    for part in (header or "").split(";"):
        name, _, value = part.strip().partition("=")
        if name == COOKIE:
            return value
    return None
