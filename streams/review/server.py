"""The review page's HTTP server: routes, the actions, and the rules of ``security``.

GET pages never change anything; every change is a POST of a form carrying the session's
CSRF token, and calls the same ``streams.curation.Curator`` methods as `reid-stream deer`.
One store connection serves the page (a lock keeps requests from sharing it at once): the
page is for a few reviewers, not for traffic.
"""

from __future__ import annotations

import logging
import re
import signal
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from sinks import curation_reads
from sinks.curation import CurationRefused
from sinks.pg import StoreUnavailable
from streams.curation import Curator
from streams.review import pages
from streams.review.security import (
    Session,
    Sessions,
    check_bind,
    cookie_header,
    cookie_value,
    origin_matches,
    same,
)
from streams.settings import Settings

log = logging.getLogger(__name__)

MAX_FORM_BYTES = 64 * 1024
_DEER_PATH = re.compile(r"^/deer/(\d{1,18})(?:/(merge|split))?$")
_HEADERS = [
    # The page loads only its own stylesheet and thumbnails, and is never framed.
    (
        "Content-Security-Policy",
        "default-src 'none'; style-src 'self'; img-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    # Not no-referrer: with it browsers send "Origin: null" on POSTs, which the CSRF check
    # (rightly) refuses; same-origin still keeps the page's URLs to itself.
    ("Referrer-Policy", "same-origin"),
]


@dataclass
class Reply:
    status: int
    body: bytes = b""
    content_type: str = "text/html; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)


def _redirect(location: str) -> Reply:
    return Reply(303, headers=[("Location", location)])


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    form: dict[str, list[str]]
    session: Session

    def one(self, name: str) -> str:
        values = self.form.get(name) or self.query.get(name) or [""]
        return values[0].strip()


class ReviewApp:
    """Routes a request to a page or an action; no sockets (``ReviewServer`` serves it)."""

    def __init__(self, settings: Settings, curator: Curator) -> None:
        self.settings = settings
        self.curator = curator
        token = settings.review_token
        self.token = token.get_secret_value() if token is not None else None
        self.sessions = Sessions()
        self._lock = threading.Lock()

    def handle(
        self, method: str, target: str, headers: dict[str, str], body: bytes
    ) -> tuple[Reply, str | None]:
        """The reply, and the cookie of a session created for this request (if any)."""
        parts = urlsplit(target)
        sid = cookie_value(headers.get("cookie"))
        session = self.sessions.get(sid)
        new_sid = None
        if session is None:
            new_sid, session = self.sessions.new()
        form = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        request = Request(method, parts.path, parse_qs(parts.query), headers, form, session)
        try:
            reply = self._route(request, fresh=new_sid is not None)
        except StoreUnavailable as err:
            log.warning("review: database unavailable: %s", err)
            reply = self._message(503, "The database is not reachable", "Try again shortly.")
        except Exception:
            log.exception("review: error serving %s %s", method, parts.path)
            reply = self._message(500, "Something went wrong", "The error is in the log.")
        return reply, new_sid

    # -- routing --------------------------------------------------------------------------------
    def _route(self, req: Request, *, fresh: bool) -> Reply:
        if req.method == "GET" and req.path == "/static/review.css":
            css = resources.files("streams.review").joinpath("static/review.css").read_bytes()
            return Reply(200, css, "text/css; charset=utf-8")
        if req.method == "POST" and (
            fresh
            or not same(req.one("csrf"), req.session.csrf)
            or not origin_matches(req.headers.get("origin"), req.headers.get("host"))
        ):
            log.warning("review: refused a POST to %s: CSRF check failed", req.path)
            return self._message(403, "Refused", "The form was stale or not from this page: "
                                 "reload the page and try again.")  # fmt: skip
        if req.path == "/login":
            return self._login(req)
        if not self._allowed(req):
            if req.method == "GET":
                return _redirect("/login")
            return self._message(401, "Log in first", "This page needs the review token.")
        with self._lock:
            return self._dispatch(req)

    def _allowed(self, req: Request) -> bool:
        if self.token is None or req.session.authenticated:
            return True
        bearer = req.headers.get("authorization", "")
        return bearer.startswith("Bearer ") and same(bearer[7:].strip(), self.token)

    def _dispatch(self, req: Request) -> Reply:
        path, get = req.path, req.method == "GET"
        if get and path in ("/", "/queue"):
            data = pages.queue(self.curator.store, self.settings)
            return self._page("queue.html", req, **data)
        if get and path == "/deer":
            wanted = req.one("id")
            return _redirect(f"/deer/{int(wanted)}" if wanted.isdigit() else "/queue")
        if get and path.startswith("/thumb/"):
            jpeg = curation_reads.thumbnail(self.curator.store, unquote(path[len("/thumb/") :]))
            if jpeg is None:
                return Reply(404, b"no thumbnail", "text/plain; charset=utf-8")
            return Reply(200, jpeg, "image/jpeg", [("Cache-Control", "private, max-age=3600")])
        match = _DEER_PATH.match(path)
        if match and get and match.group(2) is None:
            return self._deer(req, int(match.group(1)))
        if req.method == "POST":
            if match and match.group(2):
                return self._deer_action(req, int(match.group(1)), match.group(2))
            if path in ("/review/confirm", "/review/move", "/review/new"):
                return self._review_action(req, path.rsplit("/", 1)[1])
        return self._message(404, "Not found", f"Nothing at {path}.")

    # -- pages ----------------------------------------------------------------------------------
    def _page(self, template: str, req: Request, status: int = 200, **data: Any) -> Reply:
        flash, req.session.flash = req.session.flash, []
        body = pages.render(template, csrf=req.session.csrf, flash=flash,
                            token_required=self.token is not None, **data)  # fmt: skip
        return Reply(status, body, headers=[("Cache-Control", "no-store")])

    def _message(self, status: int, title: str, text: str) -> Reply:
        body = pages.render("message.html", title=title, text=text, flash=[], csrf="",
                            token_required=self.token is not None)  # fmt: skip
        return Reply(status, body)

    def _deer(self, req: Request, deer_id: int) -> Reply:
        survivor = curation_reads.resolve(self.curator.store, deer_id)
        if survivor is None:
            return self._message(404, "No such deer", f"There is no deer {deer_id}.")
        if survivor != deer_id:
            req.session.flash.append(("info", f"Deer {deer_id} was merged into deer {survivor}."))
            return _redirect(f"/deer/{survivor}")
        data = pages.deer(self.curator.store, deer_id)
        assert data is not None
        return self._page("deer.html", req, **data)

    def _login(self, req: Request) -> Reply:
        if self.token is None or req.session.authenticated:
            return _redirect("/queue")
        if req.method == "POST":
            if same(req.one("token"), self.token):
                req.session.authenticated = True
                return _redirect("/queue")
            log.warning("review: a login with a wrong token was refused")
            req.session.flash.append(("error", "That token is not the review token."))
            return _redirect("/login")
        return self._page("login.html", req)

    # -- actions --------------------------------------------------------------------------------
    def _review_action(self, req: Request, action: str) -> Reply:
        detection_id = req.one("detection_id")
        reason = req.one("reason") or None
        try:
            if action == "confirm":
                result = self.curator.confirm(detection_id, reason)
                text = f"Confirmed {detection_id}."
            elif action == "new":
                result = self.curator.new_deer(detection_id, reason or "review: a new deer")
                text = f"{detection_id} is a deer of its own now."
            else:
                target = _deer_id(req.one("deer_id"))
                result = self.curator.move([detection_id], target, reason or "review: moved")
                text = f"Moved {detection_id} to deer {target}."
            self._report(req, result.changed, text)
        except CurationRefused as err:
            req.session.flash.append(("error", str(err)))
        return _redirect("/queue")

    def _deer_action(self, req: Request, deer_id: int, action: str) -> Reply:
        reason = req.one("reason") or None
        try:
            if action == "merge":
                other = _deer_id(req.one("other"))
                result = self.curator.merge(deer_id, other, reason)
                text = f"Merged deer {other} into deer {deer_id}."
            else:
                chosen = [d for d in req.form.get("detections", []) if d]
                result = self.curator.split(deer_id, chosen, reason)
                new = result.change.other_id if result.change is not None else None
                text = f"Split {len(chosen)} detection(s) off into deer {new}."
            self._report(req, result.changed, text)
        except CurationRefused as err:
            req.session.flash.append(("error", str(err)))
        return _redirect(f"/deer/{deer_id}")

    @staticmethod
    def _report(req: Request, changed: bool, text: str) -> None:
        if changed:
            req.session.flash.append(("ok", text))
        else:
            req.session.flash.append(("info", "Already done: nothing changed."))


def _deer_id(text: str) -> int:
    if not text.isdigit():
        raise CurationRefused(f"{text!r} is not a deer id")
    return int(text)


class ReviewServer:
    """``ReviewApp`` on a threading HTTP server; ``start()`` returns the bound port."""

    def __init__(
        self,
        settings: Settings,
        *,
        host: str = "127.0.0.1",
        port: int = 8088,
        curator: Curator | None = None,
    ) -> None:
        token = settings.review_token.get_secret_value() if settings.review_token else None
        check_bind(host, token)
        self._owns = curator is None
        self.app = ReviewApp(settings, curator or Curator(settings))
        self._address = (host, port)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> int:
        if self._owns:
            self.app.curator.start()
        app = self.app

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self._serve(b"")

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_FORM_BYTES:
                    self.send_error(413, "form too large")
                    return
                self._serve(self.rfile.read(length))

            def _serve(self, body: bytes) -> None:
                headers = {k.lower(): v for k, v in self.headers.items()}
                reply, new_sid = app.handle(self.command, self.path, headers, body)
                self.send_response(reply.status)
                self.send_header("Content-Type", reply.content_type)
                self.send_header("Content-Length", str(len(reply.body)))
                for name, value in _HEADERS + reply.headers:
                    self.send_header(name, value)
                if new_sid is not None:
                    self.send_header("Set-Cookie", cookie_header(new_sid))
                self.end_headers()
                self.wfile.write(reply.body)

            def log_message(self, format: str, *args: object) -> None:
                log.debug("review http: " + format, *args)

        server = ThreadingHTTPServer(self._address, Handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="review-http",
                                        daemon=True)  # fmt: skip
        self._thread.start()
        port = int(server.server_address[1])
        log.info("review: serving http://%s:%d/ (token %s)", self._address[0], port,
                 "required" if app.token else "not set: loopback only")  # fmt: skip
        return port

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._owns:
            self.app.curator.stop()

    def serve_until_signal(self) -> None:
        """Serve until SIGTERM or SIGINT (the command's foreground run)."""
        done = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: done.set())
        self.start()
        try:
            done.wait()
        finally:
            self.stop()
