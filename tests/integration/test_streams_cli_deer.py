"""`reid-stream deer ...` as a person types it, in a real process against the embedded stack:
show, merge (and its repeat and refusals), split, history, publish."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest

from sinks.migrate import migrate
from sinks.store import PgStore
from streams.topics import read_topic
from tests.conftest import stream_environment
from tests.herd import seed_herd


@pytest.fixture()
def cli(stack, database_url, unique):
    migrate(database_url)
    store = PgStore(database_url)
    store.start()
    herd = seed_herd(store)
    store.stop()
    env = stream_environment(stack, database_url, unique,
                             REID_TOPIC_DEER_CHANGES=f"deer.changes-{unique}")  # fmt: skip

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "streams.cli", "deer", *args], env=env,
                              capture_output=True, text=True, timeout=120)  # fmt: skip

    return run, herd, env


def test_deer_commands(cli) -> None:
    run, herd, env = cli
    keep, other = [d for d, _ in Counter(herd.deer_of.values()).most_common(2)]
    shown = run("show", str(keep))
    assert shown.returncode == 0, shown.stderr
    doc = json.loads(shown.stdout)
    assert doc["deer_id"] == keep and doc["sightings"] == Counter(herd.deer_of.values())[keep]
    assert {"first_seen", "last_seen", "cameras", "versions", "recent_detections"} <= set(doc)

    merged = run("merge", str(keep), str(other), "--reason", "same stripes")
    assert merged.returncode == 0, merged.stderr
    change = json.loads(merged.stdout)
    assert change["changed"] and change["change"]["kind"] == "merge"
    assert json.loads(run("merge", str(keep), str(other)).stdout)["changed"] is False
    refused = run("merge", str(other), str(keep))
    assert refused.returncode == 1 and "would make a cycle" in refused.stderr
    assert json.loads(run("show", str(other)).stdout)["merged_into"] == keep

    mine = sorted(d for d, deer in herd.deer_of.items() if deer == keep)
    split = run("split", str(keep), "--detections", *mine[:2])
    assert split.returncode == 0, split.stderr
    new = int(json.loads(split.stdout)["change"]["other_deer_id"])
    assert json.loads(run("show", str(new)).stdout)["sightings"] == 2
    refused = run("split", str(keep), "--detections", "no-such-detection")
    assert refused.returncode == 1 and "no detection" in refused.stderr

    history = json.loads(run("history", str(keep)).stdout)
    assert [c["kind"] for c in history["changes"]] == ["merge", "split"]
    assert run("publish").stdout.strip() == "published 0 pending change event(s)"
    events = read_topic({"bootstrap.servers": env["REID_KAFKA_BOOTSTRAP_SERVERS"]},
                        env["REID_TOPIC_DEER_CHANGES"], expected=2)  # fmt: skip
    assert [json.loads(m.value())["kind"] for m in events] == ["merge", "split"]
