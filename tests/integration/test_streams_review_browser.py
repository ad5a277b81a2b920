"""The review page in a real headless Chromium (Debian's chromium and chromium-driver, driven
by Selenium): load the queue, confirm a flagged detection, merge two deer, and check the
database and the deer.changes topic. ``REID_WRITE_SCREENSHOT=1`` saves the queue's screenshot
as docs/img/review.png (docs/curation.md shows it); otherwise it goes to the test's folder."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import psycopg
import pytest

from sinks.migrate import migrate
from sinks.store import PgStore
from streams.curation import Curator
from streams.review.server import ReviewServer
from streams.topics import read_topic
from tests.herd import VERSION, curation_settings, seed_herd

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "img" / "review.png"

pytestmark = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="needs Debian's chromium and chromium-driver (apt-get install -y chromium "
    "chromium-driver) at /usr/bin/chromium and /usr/bin/chromedriver",
)


@pytest.fixture()
def browser(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (test extra)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1400,1050",
                 f"--user-data-dir={tmp_path / 'chromium'}"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture()
def review(stack, database_url, unique):
    migrate(database_url)
    settings = curation_settings(stack, database_url, unique)
    store = PgStore(database_url)
    store.start()
    herd = seed_herd(store)
    store.registry.activate(VERSION)  # "most typical" is read under the active version
    curator = Curator(settings, store=store)
    curator.start()
    server = ReviewServer(settings, port=0, curator=curator)
    port = server.start()
    yield f"http://127.0.0.1:{port}", herd, settings
    server.stop()
    curator.stop()


def test_review_in_a_real_browser(browser, review, database_url, tmp_path):
    from selenium.webdriver.common.by import By

    base, herd, settings = review
    browser.get(f"{base}/queue")
    assert browser.title.startswith("Review queue")
    items = browser.find_elements(By.CSS_SELECTOR, "section.item")
    assert len(items) == len(herd.flagged) >= 2
    waiting = browser.find_element(By.ID, "waiting").text
    assert waiting == f"{len(herd.flagged)} waiting"
    # Every thumbnail on the page loaded (the detection's and its candidates' examples).
    images = browser.find_elements(By.CSS_SELECTOR, "img.thumb")
    assert len(images) > len(items)
    assert all(browser.execute_script("return arguments[0].naturalWidth", i) > 0 for i in images)
    first = items[0].get_attribute("data-detection")
    assert items[0].find_elements(By.CSS_SELECTOR, ".candidate h3 a")
    shot = SCREENSHOT if os.environ.get("REID_WRITE_SCREENSHOT") == "1" else tmp_path / "q.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(shot))

    # Confirm the first flagged detection.
    items[0].find_element(By.CSS_SELECTOR, "button.confirm").click()
    assert f"Confirmed {first}." in flash(browser)
    left = [s.get_attribute("data-detection") for s in
            browser.find_elements(By.CSS_SELECTOR, "section.item")]  # fmt: skip
    assert first not in left and len(left) == len(herd.flagged) - 1

    # Merge two deer from the survivor's page.
    keep, other = [d for d, _ in Counter(herd.deer_of.values()).most_common(2)]
    browser.get(f"{base}/deer/{keep}")
    before = int(browser.find_element(By.ID, "sightings").text)
    merge = browser.find_element(By.CSS_SELECTOR, "form.merge")
    merge.find_element(By.NAME, "other").send_keys(str(other))
    merge.find_element(By.NAME, "reason").send_keys("same stripes")
    merge.find_element(By.CSS_SELECTOR, "button").click()
    assert f"Merged deer {other} into deer {keep}." in flash(browser)
    merged = Counter(herd.deer_of.values())[other]
    assert int(browser.find_element(By.ID, "sightings").text) == before + merged
    browser.get(f"{base}/deer/{other}")  # the old id leads to the survivor
    assert browser.current_url.endswith(f"/deer/{keep}")

    # The database says the same.
    with psycopg.connect(database_url) as conn:
        outcome = conn.execute(
            "SELECT review_outcome FROM detections WHERE detection_id = %s", (first,)
        ).fetchone()
        alias = conn.execute(
            "SELECT deer_id FROM deer_aliases WHERE alias_id = %s", (other,)
        ).fetchone()
        gone = conn.execute("SELECT count(*) FROM deer WHERE id = %s", (other,)).fetchone()
        changes = conn.execute(
            "SELECT id, kind, published_at IS NOT NULL FROM deer_changes ORDER BY id"
        ).fetchall()
    assert outcome == ("confirmed",) and alias == (keep,) and gone == (0,)
    assert [(k, p) for _, k, p in changes] == [("confirm", True), ("merge", True)]

    # And so does the deer.changes topic, in the same order.
    read = read_topic(settings.kafka_common(), settings.topic_deer_changes, expected=2)
    events = [json.loads(m.value()) for m in read]
    assert [(e["change_id"], e["kind"]) for e in events] == [(i, k) for i, k, _ in changes]
    assert events[0]["detections"] == [first]
    assert (events[1]["deer_id"], events[1]["other_deer_id"]) == (str(keep), str(other))
    assert events[1]["reason"] == "same stripes"


def flash(browser, timeout_s: float = 15.0) -> str:
    """The confirmation a form's POST leads to: click() returns before the next page has
    loaded, so wait for it (on a busy machine the old page is still there for a while)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    found = WebDriverWait(browser, timeout_s).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, ".flash.ok")
    )
    return found[0].text
