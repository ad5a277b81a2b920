"""The review page's rules over real HTTP (urllib with a cookie jar, as a browser keeps its
session): loopback unless a token is set, the token when set, CSRF on every change, GET never
changes anything, headers, thumbnails, aliases redirect."""

from __future__ import annotations

import html
import http.cookiejar
import re
import urllib.error
import urllib.parse
import urllib.request

import psycopg
import pytest

from sinks.migrate import migrate
from sinks.store import PgStore
from streams.curation import Curator
from streams.review.security import check_bind, is_loopback, origin_matches
from streams.review.server import ReviewServer
from tests.herd import curation_settings, seed_herd


class Browser:
    """urllib with cookies; answers (status, url, body) without raising on 4xx/5xx."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar())
        )

    def get(self, path: str, headers: dict[str, str] | None = None):
        return self._open(urllib.request.Request(self.base + path, headers=headers or {}))

    def post(self, path: str, form: dict[str, str], headers: dict[str, str] | None = None):
        data = urllib.parse.urlencode(form).encode()
        request = urllib.request.Request(self.base + path, data=data, headers=headers or {})
        return self._open(request)

    def _open(self, request: urllib.request.Request):
        try:
            with self.opener.open(request, timeout=10) as r:
                return r.status, r.url, r.read(), dict(r.headers)
        except urllib.error.HTTPError as err:
            return err.code, err.url, err.read(), dict(err.headers)


def csrf_of(page: bytes) -> str:
    match = re.search(rb'name="csrf" value="([^"]+)"', page)
    assert match, page[:500]
    return match.group(1).decode()


def flash(page: bytes) -> list[str]:
    found = re.findall(rb'class="flash [a-z]+" role="status">([^<]*)<', page)
    return [html.unescape(m.decode()) for m in found]  # the page escapes what it shows


@pytest.fixture()
def served(stack, database_url, unique):
    migrate(database_url)
    store = PgStore(database_url)
    store.start()
    herd = seed_herd(store)
    made = []

    def serve(**settings_overrides):
        settings = curation_settings(stack, database_url, unique, **settings_overrides)
        curator = Curator(settings, store=store)
        curator.start()
        server = ReviewServer(settings, port=0, curator=curator)
        made.append((server, curator))
        return f"http://127.0.0.1:{server.start()}"

    yield serve, herd
    for server, curator in made:
        server.stop()
        curator.stop()


def test_loopback_rule() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    check_bind("127.0.0.1", None)
    check_bind("0.0.0.0", "a-token")
    with pytest.raises(ValueError, match="needs REID_REVIEW_TOKEN"):
        check_bind("0.0.0.0", None)
    assert origin_matches(None, "127.0.0.1:8088")  # a browser that sends none
    assert origin_matches("http://127.0.0.1:8088", "127.0.0.1:8088")
    assert not origin_matches("http://evil.example", "127.0.0.1:8088")
    assert not origin_matches("null", "127.0.0.1:8088")


def test_the_command_refuses_a_public_bind_without_a_token(stack, database_url, unique) -> None:
    settings = curation_settings(stack, database_url, unique)
    with pytest.raises(ValueError, match="needs REID_REVIEW_TOKEN"):
        ReviewServer(settings, host="0.0.0.0", port=0)


def test_changes_need_the_session_csrf_token(served, database_url) -> None:
    serve, herd = served
    base = serve()
    browser = Browser(base)
    status, _, page, headers = browser.get("/queue")
    assert status == 200
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    assert "HttpOnly" in headers["Set-Cookie"] and "SameSite=Strict" in headers["Set-Cookie"]
    target = herd.flagged[0]

    # A GET to an action changes nothing; a POST without the token, with another session's
    # token, or from another origin is refused.
    assert browser.get(f"/review/confirm?detection_id={target}")[0] == 404
    assert browser.post("/review/confirm", {"detection_id": target})[0] == 403
    other = Browser(base)
    foreign = csrf_of(other.get("/queue")[2])
    assert browser.post("/review/confirm", {"detection_id": target, "csrf": foreign})[0] == 403
    token = csrf_of(page)
    evil = {"Origin": "http://evil.example"}
    assert browser.post("/review/confirm", {"detection_id": target, "csrf": token}, evil)[0] == 403
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM deer_changes").fetchone() == (0,)

    status, url, page, _ = browser.post("/review/confirm", {"detection_id": target, "csrf": token})
    assert status == 200 and url.endswith("/queue") and flash(page) == [f"Confirmed {target}."]
    # A repeat (e.g. a double click) is a no-op, said so.
    page = browser.post("/review/confirm", {"detection_id": target, "csrf": token})[2]
    assert flash(page) == ["Already done: nothing changed."]


def test_thumbnails_aliases_and_refusals_on_the_page(served) -> None:
    serve, herd = served
    browser = Browser(serve())
    token = csrf_of(browser.get("/queue")[2])
    some = next(iter(herd.deer_of))
    status, _, jpeg, headers = browser.get(f"/thumb/{some}")
    assert status == 200 and headers["Content-Type"] == "image/jpeg" and jpeg[:2] == b"\xff\xd8"
    assert browser.get("/thumb/no-such")[0] == 404

    keep, other = sorted(set(herd.deer_of.values()))[:2]
    page = browser.post(f"/deer/{keep}/merge", {"other": str(other), "csrf": token})[2]
    assert flash(page) == [f"Merged deer {other} into deer {keep}."]
    status, url, page, _ = browser.get(f"/deer/{other}")
    assert url.endswith(f"/deer/{keep}") and flash(page) == [
        f"Deer {other} was merged into deer {keep}."
    ]
    page = browser.post(f"/deer/{other}/merge", {"other": str(keep), "csrf": token})[2]
    assert "would make a cycle" in flash(page)[0]
    assert browser.get("/deer/999999")[0] == 404


def test_a_token_guards_every_page(served) -> None:
    serve, _ = served
    base = serve(review_token="s3cret-token")
    browser = Browser(base)
    status, url, page, _ = browser.get("/queue")
    assert url.endswith("/login") and b"REID_REVIEW_TOKEN" in page
    token = csrf_of(page)
    assert browser.post("/login", {"token": "wrong", "csrf": token})[1].endswith("/login")
    assert browser.get("/thumb/x")[1].endswith("/login")
    status, url, _, _ = browser.post("/login", {"token": "s3cret-token", "csrf": token})
    assert status == 200 and url.endswith("/queue")
    # A script can use the header instead of a session.
    assert (
        Browser(base).get("/queue", {"Authorization": "Bearer s3cret-token"})[1].endswith("/queue")
    )


def test_move_and_new_deer_from_the_queue(served, database_url) -> None:
    serve, herd = served
    browser = Browser(serve())
    token = csrf_of(browser.get("/queue")[2])
    first, second = herd.flagged[:2]
    target = next(d for d in set(herd.deer_of.values()) if d != herd.deer_of[first])
    page = browser.post("/review/move", {"detection_id": first, "deer_id": str(target),
                                         "csrf": token})[2]  # fmt: skip
    assert flash(page) == [f"Moved {first} to deer {target}."]
    page = browser.post("/review/new", {"detection_id": second, "csrf": token})[2]
    assert flash(page) == [f"{second} is a deer of its own now."]
    page = browser.post("/review/move", {"detection_id": first, "deer_id": "x", "csrf": token})[2]
    assert flash(page) == ["'x' is not a deer id"]
    with psycopg.connect(database_url) as conn:
        rows = {d: (deer, outcome) for d, deer, outcome in conn.execute(
            "SELECT detection_id, deer_id, review_outcome FROM detections "
            "WHERE detection_id = ANY(%s)", ([first, second],)).fetchall()}  # fmt: skip
        kinds = [k for (k,) in conn.execute("SELECT kind FROM deer_changes ORDER BY id")]
    assert rows[first] == (target, "moved")
    assert rows[second][0] not in herd.deer_of.values() and rows[second][1] == "new_deer"
    assert kinds[-1] == "split" and kinds[0] in ("move", "merge")  # a lone detection: a merge
