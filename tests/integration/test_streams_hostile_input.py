"""Hostile and broken input: each bad event is dead-lettered with its reason, nothing is lost,
and the good events around it are processed."""

from __future__ import annotations

import itertools
import json
import shutil
from collections import Counter

import psycopg
import pytest

from streams.tools.produce import detection_event
from streams.topics import ensure_topics, read_topic
from tests.conftest import zebra_images
from tests.corpus import bad_events
from tests.integration.test_streams_end_to_end import produce, stream_consumer

# Part of the delivery guarantees: `pytest -m faults` runs it beside the fault scenarios.
pytestmark = pytest.mark.faults

MAX_MESSAGE_BYTES = 300_000


def test_every_bad_event_is_dead_lettered_with_its_reason(
    stack, stream_env, database_url, tmp_path, reliability
):
    root = tmp_path / "images"
    root.mkdir()
    env = {
        **stream_env,
        "REID_IMAGE_ROOTS": json.dumps([str(root)]),
        "REID_MAX_MESSAGE_BYTES": str(MAX_MESSAGE_BYTES),
        "REID_INPUT_SIZE": "64",
    }
    bootstrap = env["REID_KAFKA_BOOTSTRAP_SERVERS"]
    topics = [env["REID_TOPIC_DETECTIONS"], env["REID_TOPIC_ASSIGNMENTS"],
              env["REID_TOPIC_DEAD_LETTERS"]]  # fmt: skip
    ensure_topics({"bootstrap.servers": bootstrap}, topics, 2)

    good: list[tuple[str, bytes]] = []
    for i, (_who, path) in enumerate(zebra_images(individuals=6, per_individual=4)):
        if i % 4 == 0:  # some by reference, inside the root
            shutil.copy(path, root / path.name)
            event = detection_event(b"", f"cam-{i % 3}", detection_id=f"good-{i}")
            del event["image_b64"]
            event.update(image_uri=path.name, bbox=[0, 0, 64, 64])
        else:
            event = detection_event(path.read_bytes(), f"cam-{i % 3}", detection_id=f"good-{i}")
        good.append((event["camera_id"], json.dumps(event).encode()))
    bad = bad_events(root, max_message_bytes=MAX_MESSAGE_BYTES)
    # Same detection_id as a good event, other content, same key (so after it in order).
    key, value = good[1]
    conflict = json.dumps({**json.loads(value), "confidence": 0.01}).encode()

    interleaved: list[tuple[str, bytes]] = []
    for pair in itertools.zip_longest(good, [(b.key, b.value) for b in bad]):
        interleaved += [item for item in pair if item is not None]
    interleaved.append((key, conflict))
    ends = produce(bootstrap, topics[0], interleaved)
    expected_dead = len(bad) + 1

    with stream_consumer(env) as consumer:
        assignments = read_topic(
            {"bootstrap.servers": bootstrap}, topics[1], expected=len(good), timeout_s=180
        )
        dead = read_topic(
            {"bootstrap.servers": bootstrap}, topics[2], expected=expected_dead, timeout_s=60
        )
        consumer.wait_committed(ends)

    with psycopg.connect(database_url) as conn:
        stored = {r[0] for r in conn.execute("SELECT detection_id FROM detections")}
    dead_by_value = Counter(
        (m.value() or b"", dict(m.headers())["dlq.reason"].decode()) for m in dead
    )
    good_ids = {json.loads(v)["detection_id"] for _, v in good}
    assigned = {json.loads(m.value())["detection_id"] for m in assignments}

    rows = []
    for item in bad:
        dead_lettered = dead_by_value[(item.value, item.reason)]
        rows.append(_row(item.name, item.reason, dead_lettered, _id(item.value) in stored))
        assert dead_lettered == 1, f"{item.name}: expected one dead letter with {item.reason}"
    conflicts = dead_by_value[(conflict, "duplicate_conflict")]
    rows.append(_row("duplicate detection_id, different content", "duplicate_conflict",
                     conflicts, stored=False))  # fmt: skip
    assert conflicts == 1
    rows.append(
        {
            "scenario": "good events around the bad ones",
            "sent": len(good),
            "stored": len(stored & good_ids),
            "lost": len(good_ids - assigned),
            "duplicated_rows": 0,
            "duplicate_deer": None,
            "dead_lettered": 0,
        }
    )
    assert stored == good_ids and assigned == good_ids
    assert len(dead) == expected_dead
    for row in rows:
        reliability.record(row, command="pytest tests/integration/test_streams_hostile_input.py")


def _id(value: bytes) -> str | None:
    try:
        return json.loads(value)["detection_id"]
    except (ValueError, KeyError, TypeError):
        return None


def _row(name: str, reason: str, dead_lettered: int, stored: bool) -> dict:
    return {
        "scenario": f"bad input: {name} -> `{reason}`",
        "sent": 1,
        "stored": int(stored),
        "lost": 1 - dead_lettered - int(stored),
        "duplicated_rows": 0,
        "duplicate_deer": None,
        "dead_lettered": dead_lettered,
    }
