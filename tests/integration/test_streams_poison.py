"""Poison pills: whatever one event makes fail is that event's problem.

Driven through the whole batch processor (parse, decode, embed, match, the real PostgreSQL
store, the real broker for its output), not only the parser: an event the database refuses is
found by bisecting its batch and dead-lettered alone as ``unprocessable``, and generated events
at the edges of what JSON, Python and PostgreSQL accept never fail a batch.
"""

from __future__ import annotations

import base64
import io
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from sinks.cache import CentroidCache
from sinks.metrics import StreamMetrics
from sinks.publisher import KafkaPublisher
from sinks.store import PgStore
from streams.batch import SourceMessage
from streams.gallery import GalleryLoader
from streams.processor import BatchProcessor
from streams.tools.produce import detection_event
from streams.topics import ensure_topics, read_topic
from streams.versions import build_embedder
from tests.conftest import zebra_images
from tests.integration.test_streams_replay import settings_of

# Part of the delivery guarantees: `pytest -m faults` runs it, and its rows go to RELIABILITY.md.
pytestmark = pytest.mark.faults
COMMAND = "pytest tests/integration/test_streams_poison.py"


def row(scenario: str, sent: int, stored: int, dead: int, **extra: object) -> dict:
    return {"scenario": scenario, "sent": sent, "stored": stored,
            "lost": sent - stored - dead, "duplicated_rows": 0, "duplicate_deer": None,
            "dead_lettered": dead, **extra}  # fmt: skip


def small_jpeg(path, size: int = 64) -> bytes:
    out = io.BytesIO()
    Image.open(path).convert("RGB").resize((size, size)).save(out, "JPEG", quality=80)
    return out.getvalue()


@contextmanager
def live_processor(env: dict[str, str]) -> Iterator[BatchProcessor]:
    """A started processor on the test's database and topics (no consumer: the test hands
    it the batches)."""
    s = settings_of(env)
    kafka = {"bootstrap.servers": s.kafka_bootstrap_servers}
    ensure_topics(kafka, [s.topic_assignments, s.topic_dead_letters], 1)
    metrics = StreamMetrics()
    store = PgStore(s.database_url.get_secret_value())
    publisher = KafkaPublisher(s.producer_config())
    embedder = build_embedder(s)
    store.start()
    publisher.start()
    embedder.start()
    cache = CentroidCache(s.redis_url.get_secret_value(), key_prefix=s.cache_key_prefix)
    cache.start()
    gallery = GalleryLoader(store, cache, metrics, refresh_s=s.gallery_refresh_s,
                            refresh_margin_s=s.gallery_refresh_margin_s)  # fmt: skip
    processor = BatchProcessor(s, embedder, store, gallery, publisher, metrics)
    processor.start()
    try:
        yield processor
    finally:
        processor.stop()
        embedder.stop()
        publisher.stop()
        cache.stop()
        store.stop()


def as_messages(topic: str, values: list[bytes], first_offset: int = 0) -> list[SourceMessage]:
    return [
        SourceMessage(topic, 0, first_offset + i, b"k", value) for i, value in enumerate(values)
    ]


def stored_ids(database_url: str) -> set[str]:
    with psycopg.connect(database_url) as conn:
        return {row[0] for row in conn.execute("SELECT detection_id FROM detections")}


def test_an_event_the_database_refuses_is_dead_lettered_alone(
    stream_env, database_url, reliability
):
    env = {**stream_env, "REID_INPUT_SIZE": "64"}
    # A real per-event failure in the real store: a constraint only this camera breaks
    # (what a NUL byte or an out-of-range number did before the parser knew them).
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("ALTER TABLE detections ADD CONSTRAINT no_poison "
                     "CHECK (camera_id <> 'cam-poison')")  # fmt: skip
    photos = [small_jpeg(path) for _, path in zebra_images(individuals=4, per_individual=3)]
    good = [
        json.dumps(detection_event(p, f"cam-{i % 3}", detection_id=f"good-{i}")).encode()
        for i, p in enumerate(photos)
    ]
    poison = json.dumps(detection_event(photos[0], "cam-poison", detection_id="pill")).encode()
    values = [*good[:5], poison, *good[5:], poison]  # the pill, and a repeat of it

    with live_processor(env) as processor:
        outcome = processor.process(as_messages(env["REID_TOPIC_DETECTIONS"], values))
        s = processor.settings

    assert outcome.dead_letter_reasons == {"unprocessable": 2}
    assert {m.offset for m, _ in outcome.dead_letters} == {5, len(values) - 1}
    assert outcome.new_deer + outcome.assigned_existing == len(good)
    assert stored_ids(database_url) == {f"good-{i}" for i in range(len(good))}
    kafka = {"bootstrap.servers": s.kafka_bootstrap_servers}
    dead = read_topic(kafka, s.topic_dead_letters, expected=2, timeout_s=30)
    headers = [dict(m.headers()) for m in dead]
    assert [h["dlq.reason"] for h in headers] == [b"unprocessable", b"unprocessable"]
    assert {h["dlq.exception"] for h in headers} == {b"psycopg.errors.CheckViolation"}
    assert [m.value() for m in dead] == [poison, poison]
    assigned = read_topic(kafka, s.topic_assignments, expected=len(good), timeout_s=30)
    assert sorted(json.loads(m.value())["detection_id"] for m in assigned) == sorted(
        f"good-{i}" for i in range(len(good))
    )
    stored = len(stored_ids(database_url))
    reliability.record(row(
        "an event the database refuses (a CHECK constraint), and its repeat, in a batch of 14 "
        "-> `unprocessable` (the batch bisected; dlq.exception psycopg.errors.CheckViolation); "
        "the 12 others written", len(values), stored, outcome.dead_lettered,
    ), command=f"{COMMAND} -k refuses")  # fmt: skip


# -- generated events ---------------------------------------------------------------------
_edge_ints = st.one_of(
    st.integers(-(10**6), 10**6),
    st.sampled_from([2**31, 2**63, -(2**63) - 1, 10**20, 10**400, -(10**400)]),
)
_edge_floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e308, -1e308, 5e-324, math.inf, math.nan, 0.0, -0.0]),
)
_edge_text = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", " ", "\x00", "a\x00b", "\ud800", "\udfff", "\u202e", "🦌" * 300,
                     "x" * 300, "../../etc/passwd", "/etc/passwd", "NaN", "\\"]),
)  # fmt: skip
_anything = st.one_of(st.none(), st.booleans(), _edge_ints, _edge_floats, _edge_text,
                      st.lists(_edge_ints, max_size=5))  # fmt: skip
_timestamps = st.one_of(
    st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat()),
    st.sampled_from(["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00",
                     "0001-01-01T00:00:00Z", "9999-12-31T23:59:59.999999Z",
                     "2026-02-30T00:00:00Z", "2026-12-01T00:00:00+25:00", "2026-12-01"]),
    _anything,
)  # fmt: skip
_bbox = st.one_of(
    st.lists(st.one_of(_edge_ints, _edge_floats), min_size=4, max_size=4),
    st.lists(st.integers(0, 64), min_size=4, max_size=4),
    _anything,
)


@st.composite
def edge_events(draw: st.DrawFn, photo: bytes) -> bytes:
    doc = detection_event(photo, "cam-0")
    fields = draw(st.sets(st.sampled_from(
        ["detection_id", "camera_id", "captured_at", "bbox", "confidence", "species",
         "image_b64", "image_uri", "schema", "extra"]), max_size=4))  # fmt: skip
    if "detection_id" in fields:
        doc["detection_id"] = draw(st.one_of(_edge_text, _anything))
    if "camera_id" in fields:
        doc["camera_id"] = draw(st.one_of(_edge_text, _anything))
    if "captured_at" in fields:
        doc["captured_at"] = draw(_timestamps)
    if "bbox" in fields:
        doc["bbox"] = draw(_bbox)
    if "confidence" in fields:
        doc["confidence"] = draw(_anything)
    if "species" in fields:
        doc["species"] = draw(st.one_of(_edge_text, _anything))
    if "image_b64" in fields:
        raw = draw(st.one_of(st.binary(max_size=64), st.just(photo[: len(photo) // 2])))
        doc["image_b64"] = base64.b64encode(raw).decode()
    if "image_uri" in fields:
        del doc["image_b64"]
        doc["image_uri"] = draw(_edge_text)
    if "schema" in fields:
        doc["schema"] = draw(_anything)
    if "extra" in fields:
        doc[draw(_edge_text)] = draw(_anything)
    return json.dumps(doc).encode("utf-8", "surrogatepass")


@pytest.mark.filterwarnings("ignore::hypothesis.errors.NonInteractiveExampleWarning")
def test_generated_edge_events_never_fail_a_batch(stream_env, database_url, reliability):
    env = {**stream_env, "REID_INPUT_SIZE": "64", "REID_BATCH_MAX_SIZE": "16"}
    photo = small_jpeg(zebra_images(individuals=1, per_individual=1)[0][1])
    topic = env["REID_TOPIC_DETECTIONS"]
    offsets = iter(range(10**9))
    totals = {"batches": 0, "sent": 0, "dead": 0, "reasons": set()}

    with live_processor(env) as processor:

        @settings(max_examples=40, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(st.lists(edge_events(photo), min_size=1, max_size=6))
        def one_batch(values: list[bytes]) -> None:
            good = json.dumps(detection_event(photo, "cam-1")).encode()
            batch = [*values, good]
            messages = [SourceMessage(topic, 0, next(offsets), b"k", v) for v in batch]
            outcome = processor.process(messages)  # must not raise, whatever the events
            dead = {m.offset for m, _ in outcome.dead_letters}
            stored = stored_ids(database_url)
            for message in messages:
                if message.offset in dead:
                    continue
                doc = json.loads(message.value)
                assert doc["detection_id"] in stored, (message.value, outcome)
            assert messages[-1].offset not in dead, outcome.dead_letters
            assert outcome.messages == len(messages)
            totals["batches"] += 1
            totals["sent"] += len(messages)
            totals["dead"] += len(dead)
            totals["reasons"] |= set(outcome.dead_letter_reasons)

        one_batch()
    stored = len(stored_ids(database_url))
    reasons = ", ".join(sorted(totals["reasons"]))
    reliability.record(row(
        f"{totals['batches']} generated batches of events at the edges of JSON, Python and "
        "PostgreSQL (hypothesis) through the processor and the store; no batch fails",
        totals["sent"], stored, totals["dead"], notes=f"dead-letter reasons seen: {reasons}",
    ), command=f"{COMMAND} -k generated")  # fmt: skip


def test_a_passing_file_error_retries_the_batch_and_loses_nothing(
    stream_env, database_url, tmp_path, monkeypatch, reliability
):
    """EIO (or EMFILE, ESTALE...) reading an image_uri is not the event's fault: the batch
    fails like an outage, nothing is stored or dead-lettered, and the retry stores it."""
    import errno

    from streams.images import ImageRoots, ImageSourceUnavailable

    root = tmp_path / "images"
    root.mkdir()
    (root / "a.jpg").write_bytes(small_jpeg(zebra_images(1, 1)[0][1]))
    env = {**stream_env, "REID_INPUT_SIZE": "64", "REID_IMAGE_ROOTS": json.dumps([str(root)])}
    event = detection_event(b"", "cam-1", detection_id="by-uri")
    del event["image_b64"]
    event.update(image_uri="a.jpg", bbox=[0, 0, 64, 64])
    inline = json.dumps(detection_event(small_jpeg(zebra_images(1, 1)[0][1]), "cam-2")).encode()
    real_read = ImageRoots._read_once
    failing = {"on": True}

    def flaky(self, uri):
        if failing["on"]:
            raise OSError(errno.EIO, "Input/output error")
        return real_read(self, uri)

    monkeypatch.setattr(ImageRoots, "_read_once", flaky)
    messages = as_messages(env["REID_TOPIC_DETECTIONS"], [json.dumps(event).encode(), inline])
    with live_processor(env) as processor:
        batch = processor.embed(processor.prepare(messages))
        with pytest.raises(ImageSourceUnavailable):
            processor.finish(batch)  # what the runner retries after a backoff
        assert stored_ids(database_url) == set()
        failing["on"] = False
        outcome = processor.finish(batch)
    assert outcome.dead_lettered == 0
    assert outcome.new_deer + outcome.assigned_existing == 2
    assert "by-uri" in stored_ids(database_url)
    reliability.record(row(
        "EIO reading an image_uri (a passing file error): the batch fails like an outage, "
        "nothing stored or dead-lettered, the retry stores both events",
        2, len(stored_ids(database_url)), outcome.dead_lettered,
    ), command=f"{COMMAND} -k file_error")  # fmt: skip


def test_a_dead_letter_too_large_for_the_producer_goes_out_truncated(
    stream_env, database_url, reliability
):
    """REID_MAX_MESSAGE_BYTES=300000 and a 1.2 MB event: its dead letter cannot be published
    as it is (that stalled the partition: the size error was retried for ever); it goes out
    truncated, with the original's size and digest, and the batch's good event is written."""
    import hashlib

    env = {**stream_env, "REID_INPUT_SIZE": "64", "REID_MAX_MESSAGE_BYTES": "300000"}
    photo = small_jpeg(zebra_images(1, 1)[0][1])
    huge = json.dumps({**detection_event(photo, "cam-1"), "species": "x" * 1_200_000}).encode()
    good = json.dumps(detection_event(photo, "cam-2", detection_id="beside-it")).encode()
    with live_processor(env) as processor:
        outcome = processor.process(as_messages(env["REID_TOPIC_DETECTIONS"], [huge, good]))
        s = processor.settings
    assert outcome.dead_letter_reasons == {"message_too_large": 1}
    assert outcome.new_deer == 1
    kafka = {"bootstrap.servers": s.kafka_bootstrap_servers}
    (dead,) = read_topic(kafka, s.topic_dead_letters, expected=1, timeout_s=30)
    headers = dict(dead.headers())
    assert headers["dlq.truncated"] == b"true"
    assert int(headers["dlq.original.size"]) == len(huge)
    assert headers["dlq.original.sha256"] == hashlib.sha256(huge).hexdigest().encode()
    assert len(dead.value()) < len(huge) and huge.startswith(dead.value())
    reliability.record(row(
        "a 1.2 MB event at REID_MAX_MESSAGE_BYTES=300000 -> `message_too_large`, its dead "
        "letter published truncated (dlq.truncated, original size and sha256); the event "
        "beside it written", 2, len(stored_ids(database_url)), outcome.dead_lettered,
    ), command=f"{COMMAND} -k too_large")  # fmt: skip


def test_a_batch_of_the_old_version_is_embedded_again_after_the_switch(
    stream_env, database_url, reliability
):
    """A batch embedded under V1 that would create a deer after `activate V2` is not written
    under V1 (a V2 worker could not see that deer): it waits for the switch, then is prepared
    and embedded again under V2 and written there."""
    from sinks.registry import VersionSpec
    from sinks.store import NewDeerDeferred

    env = {**stream_env, "REID_INPUT_SIZE": "64"}
    photo = small_jpeg(zebra_images(1, 1)[0][1])
    value = json.dumps(detection_event(photo, "cam-1", detection_id="during-switch")).encode()
    with live_processor(env) as processor:
        v1 = processor.embedder.embedding_version
        processor.store.registry.register(VersionSpec(v1), activate_if_none=True)
        v2_embedder = build_embedder(settings_of(env, seed=1))
        v2_embedder.start()
        v2 = v2_embedder.embedding_version
        assert v2 != v1
        processor.store.registry.register(VersionSpec(v2))
        batch = processor.embed(processor.prepare(as_messages("detections", [value])))
        processor.store.registry.activate(v2)
        with pytest.raises(NewDeerDeferred):  # not switched yet: the runner retries
            processor.finish(batch)
        processor.embedder = v2_embedder  # what between_batches does at the switch
        outcome = processor.finish(batch)
        v2_embedder.stop()
    assert outcome.new_deer == 1
    with psycopg.connect(database_url) as conn:
        (version,) = conn.execute(
            "SELECT embedding_version FROM detections WHERE detection_id = 'during-switch'"
        ).fetchone()
        versions = {r[0] for r in conn.execute("SELECT embedding_version FROM deer_centroids")}
    assert version == v2 and versions == {v2}
    reliability.record(row(
        "a batch embedded under V1 that makes a new deer after `activate V2`: held, then "
        "embedded again and written under V2 (no V1-only deer)", 1, 1, 0,
    ), command=f"{COMMAND} -k switch")  # fmt: skip
