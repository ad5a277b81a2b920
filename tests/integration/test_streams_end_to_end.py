"""`reid-stream run` as a real process against the embedded broker, PostgreSQL and Redis."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator

import psycopg
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from PIL import Image

from streams.tools.produce import detection_event
from streams.topics import ensure_topics, read_topic
from tests.conftest import ZEBRA_DIR, zebra_images
from tests.corpus import bad_events
from tests.integration.conftest import PARTITIONS


def produce(bootstrap: str, topic: str, values: list[tuple[str, bytes]]) -> dict[int, int]:
    """Publish (key, value) pairs; returns the end offset of each partition."""
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    ends: dict[int, int] = {}

    def delivered(err, msg) -> None:
        assert err is None, err
        ends[msg.partition()] = max(ends.get(msg.partition(), 0), msg.offset() + 1)

    for key, value in values:
        producer.produce(topic, value, key=key, on_delivery=delivered)
    assert producer.flush(30) == 0
    return ends


def scrape(port: int, timeout: float = 5.0) -> dict[str, float]:
    """Every sample of the /metrics page on ``port``, by its name with labels."""
    url = f"http://127.0.0.1:{port}/metrics"
    text = urllib.request.urlopen(url, timeout=timeout).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


# The same assertions for both runners (docs/delivery.md, Runners); SIGTERM at the end must exit 0.
@pytest.mark.parametrize("runner", ["confluent", "faust"])
def test_stream_end_to_end(stack, stream_env, database_url, tmp_path, runner):
    env = stream_env
    bootstrap = env["REID_KAFKA_BOOTSTRAP_SERVERS"]
    topics = [env["REID_TOPIC_DETECTIONS"], env["REID_TOPIC_ASSIGNMENTS"],
              env["REID_TOPIC_DEAD_LETTERS"]]  # fmt: skip
    ensure_topics({"bootstrap.servers": bootstrap}, topics, PARTITIONS)

    # Good events: inline crops of 4 zebras, two by image_uri with a box, and one redelivery.
    good: list[tuple[str, bytes]] = []
    for i, (_who, path) in enumerate(zebra_images(individuals=4, per_individual=5)):
        event = detection_event(path.read_bytes(), f"cam-{i % 3}", detection_id=f"det-{i:03d}")
        good.append((event["camera_id"], json.dumps(event).encode()))
    for j, (_who, path) in enumerate(zebra_images(individuals=1, per_individual=2)):
        with Image.open(path) as img:
            w, h = img.size
        event = detection_event(b"", "cam-uri", detection_id=f"uri-{j}")
        del event["image_b64"]
        event.update(
            image_uri=str(path.relative_to(ZEBRA_DIR)), bbox=[w * 0.1, h * 0.1, w * 0.9, h]
        )
        good.append(("cam-uri", json.dumps(event).encode()))
    good.append(good[0])  # the same detection delivered twice
    # A few kinds of bad input (test_streams_hostile_input.py has them all).
    corpus = bad_events(tmp_path / "images", max_message_bytes=8_000_000)
    bad = [(b.value, b.reason) for b in corpus[:12:2]]
    bad.append(bad[3])  # a bad event delivered twice: two dead letters
    # The same detection_id with other content, on the original's partition (same key).
    key, value = good[1]
    conflict = {**json.loads(value), "confidence": 0.123}
    bad.append((json.dumps(conflict).encode(), "duplicate_conflict"))
    mixed = good[:7] + [("cam-bad", v) for v, _ in bad[:-1]] + good[7:] + [(key, bad[-1][0])]
    ends = produce(bootstrap, topics[0], mixed)
    unique_ids = {json.loads(v)["detection_id"] for _, v in good}

    with stream_consumer(env, runner) as consumer:
        assignments = read_topic(
            {"bootstrap.servers": bootstrap}, topics[1], expected=len(good), timeout_s=240
        )
        dead = read_topic(
            {"bootstrap.servers": bootstrap}, topics[2], expected=len(bad), timeout_s=30
        )
        consumer.wait_committed(ends)
        metrics = consumer.metrics()
    output = consumer.output

    # Every good detection: one assignment event, the redelivery with identical content.
    events = [json.loads(m.value()) for m in assignments]
    assert len(events) == len(good), output[-3000:]
    by_id: dict[str, list[bytes]] = {}
    for m in assignments:
        by_id.setdefault(json.loads(m.value())["detection_id"], []).append(m.value())
        assert m.key().decode() == json.loads(m.value())["deer_id"]
    assert set(by_id) == unique_ids
    assert len(by_id["det-000"]) == 2 and by_id["det-000"][0] == by_id["det-000"][1]

    # Every bad event: a dead letter with its reason and the original bytes.
    reasons = Counter(dict(m.headers())["dlq.reason"].decode() for m in dead)
    assert reasons == Counter(reason for _, reason in bad)
    assert Counter(m.value() for m in dead) == Counter(v for v, _ in bad)

    # The database: one row per detection, deer consistent with the events.
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT detection_id, deer_id, is_new_deer, embedding_version FROM detections"
        ).fetchall()
        deer = conn.execute("SELECT id, sightings FROM deer").fetchall()
    assert {r[0] for r in rows} == unique_ids and len(rows) == len(unique_ids)
    assert sum(s for _, s in deer) == len(rows)
    assert {r[1] for r in rows} == {i for i, _ in deer}
    assert sum(1 for r in rows if r[2]) == len(deer)
    first = {e["detection_id"]: e for e in events}
    for detection_id, deer_id, is_new, version in rows:
        assert first[detection_id]["deer_id"] == str(deer_id)
        assert first[detection_id]["is_new_deer"] == is_new
        assert first[detection_id]["embedding_version"] == version
    # The review flag and candidates go out as stored; every crop keeps a bounded thumbnail.
    with psycopg.connect(database_url) as conn:
        kept = conn.execute(
            "SELECT detection_id, needs_review, candidates, octet_length(thumbnail) FROM detections"
        ).fetchall()
    for detection_id, flagged, candidates, thumb_bytes in kept:
        event = first[detection_id]
        assert event["needs_review"] == flagged
        assert [c["deer_id"] for c in event["candidates"]] == [
            str(c["deer_id"]) for c in candidates
        ]
        assert 0 < len(candidates) <= 3 or event["is_new_deer"]
        assert thumb_bytes is not None and 0 < thumb_bytes <= 16_384

    # The metrics the dashboards read.
    assert metrics["reid_events_consumed_total"] == len(mixed)
    assert (
        metrics['reid_assignments_total{outcome="existing"}']
        + metrics['reid_assignments_total{outcome="new"}']
    ) == len(unique_ids)
    assert metrics['reid_assignments_total{outcome="new"}'] == len(deer)
    for reason, count in reasons.items():
        assert metrics[f'reid_dead_letters_total{{reason="{reason}"}}'] == count
    assert metrics['reid_stage_duration_seconds_count{stage="embed"}'] >= 1
    # One worker reads Redis once per version (then keeps the deer in memory): a cold miss.
    assert metrics['reid_cache_requests_total{result="miss"}'] >= 1


class StreamConsumer:
    """A `reid-stream run --runner RUNNER` process configured by ``env``; stopped with SIGTERM
    on exit, and required to exit 0."""

    def __init__(self, env: dict[str, str], runner: str = "confluent") -> None:
        self.env = env
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streams.cli", "run", "--runner", runner], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        self.output = ""

    def metrics(self) -> dict[str, float]:
        return scrape(int(self.env["REID_METRICS_PORT"]))

    def wait_committed(self, ends: dict[int, int], timeout_s: float = 30.0) -> None:
        """Until the group's committed offsets reach ``ends`` (partition -> end offset)."""
        topic = self.env["REID_TOPIC_DETECTIONS"]
        consumer = Consumer(
            {"bootstrap.servers": self.env["REID_KAFKA_BOOTSTRAP_SERVERS"],
             "group.id": self.env["REID_GROUP_ID"]}
        )  # fmt: skip
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                committed = consumer.committed([TopicPartition(topic, p) for p in ends], timeout=5)
                got = {tp.partition: tp.offset for tp in committed}
                if got == ends or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert got == ends, f"committed {got}, expected {ends}"
        finally:
            consumer.close()

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.output, _ = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.output, _ = self.proc.communicate()
        return self.proc.returncode


@contextlib.contextmanager
def stream_consumer(env: dict[str, str], runner: str = "confluent") -> Iterator[StreamConsumer]:
    consumer = StreamConsumer(env, runner)
    try:
        yield consumer
    except BaseException:
        consumer.stop()
        raise
    code = consumer.stop()
    assert code == 0, consumer.output[-3000:]
