import base64
import json
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sinks.records import CandidateScore
from streams.events import (
    REASONS,
    InvalidEvent,
    assignment_event,
    dead_letter_headers,
    parse_detection,
)

LIMIT = 100_000


def event(**changes):
    doc = {
        "schema": 1,
        "detection_id": "d-1",
        "camera_id": "cam-1",
        "captured_at": "2026-11-02T05:31:12.250Z",
        "image_b64": base64.b64encode(b"\xff\xd8jpeg").decode(),
        "confidence": 0.9,
        "species": "deer",
    }
    doc.update(changes)
    return json.dumps({k: v for k, v in doc.items() if v is not ...}).encode()


def reason_of(raw: bytes | None) -> str:
    with pytest.raises(InvalidEvent) as info:
        parse_detection(raw, max_bytes=LIMIT)
    return info.value.reason


def test_valid_event_with_inline_crop():
    parsed = parse_detection(event(), max_bytes=LIMIT)
    assert parsed.detection_id == "d-1"
    assert parsed.camera_id == "cam-1"
    assert parsed.captured_at == datetime(2026, 11, 2, 5, 31, 12, 250000, tzinfo=UTC)
    assert parsed.image_bytes == b"\xff\xd8jpeg"
    assert parsed.image_uri is None and parsed.bbox is None
    assert parsed.confidence == 0.9 and parsed.species == "deer"


def test_valid_event_with_uri_and_box_and_offset():
    raw = event(
        image_b64=..., image_uri="cam1/a.jpg", bbox=[1, 2.5, 30, 40],
        captured_at="2026-11-02T07:31:12+02:00",
    )  # fmt: skip
    parsed = parse_detection(raw, max_bytes=LIMIT)
    assert parsed.image_uri == "cam1/a.jpg"
    assert parsed.bbox == (1.0, 2.5, 30.0, 40.0)
    assert parsed.captured_at.utcoffset() == timedelta(hours=2)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (None, "empty_message"),
        (b"", "empty_message"),
        (b"x" * (LIMIT + 1), "message_too_large"),
        (b"{not json", "bad_json"),
        (b"\xff\xfe", "bad_json"),
        (b"[1, 2]", "bad_json"),
        (b"[" * 100_00 + b"]" * 100_00, "bad_json"),
        (event(schema=...), "missing_field"),
        (event(schema="1"), "wrong_type"),
        (event(schema=True), "wrong_type"),
        (event(schema=2), "unknown_schema"),
        (event(detection_id=...), "missing_field"),
        (event(detection_id=17), "wrong_type"),
        (event(detection_id="  "), "wrong_type"),
        (event(detection_id="a\nb"), "wrong_type"),
        (event(camera_id=...), "missing_field"),
        (event(captured_at=...), "missing_field"),
        (event(captured_at="yesterday"), "bad_timestamp"),
        (event(captured_at="2026-11-02T05:31:12"), "bad_timestamp"),
        (event(captured_at=1700000000), "wrong_type"),
        (event(image_b64=...), "bad_image_field"),
        (event(image_uri="a.jpg", bbox=[0, 0, 1, 1]), "bad_image_field"),
        (event(image_b64="***"), "bad_image_field"),
        (event(image_b64=""), "bad_image_field"),
        (event(image_b64=..., image_uri="a.jpg"), "missing_field"),
        (event(bbox=[0, 0, 1]), "bad_bbox"),
        (event(bbox=[0, 0, "1", 2]), "bad_bbox"),
        (event(bbox="0,0,1,1"), "bad_bbox"),
        (event(confidence=1.5), "wrong_type"),
        (event(confidence="high"), "wrong_type"),
        (event(species=5), "wrong_type"),
    ],
)
def test_invalid_events_have_specific_reasons(raw, reason):
    assert reason_of(raw) == reason


def test_nan_in_bbox_is_refused():
    raw = event().replace(b'"species"', b'"bbox": [0, 0, NaN, 1], "species"')
    assert reason_of(raw) == "bad_bbox"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_parser_only_raises_invalid_event_on_bytes(raw):
    try:
        parse_detection(raw, max_bytes=LIMIT)
    except InvalidEvent as err:
        assert err.reason in REASONS


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    st.fixed_dictionaries(
        {},
        optional={
            k: json_values
            for k in ("schema", "detection_id", "camera_id", "captured_at", "image_b64",
                      "image_uri", "bbox", "confidence", "species")
        },
    )
)  # fmt: skip
def test_parser_only_raises_invalid_event_on_json_objects(doc):
    try:
        parse_detection(json.dumps(doc).encode(), max_bytes=LIMIT)
    except InvalidEvent as err:
        assert err.reason in REASONS


class Stored:
    detection_id = "d-1"
    deer_id = 42
    is_new_deer = False
    similarity = 0.8123456789
    score_resnet = 0.9
    score_effnet = 0.7
    embedding_version = "v1"
    camera_id = "cam-1"
    captured_at = datetime(2026, 11, 2, 5, 31, 12, 250000, tzinfo=UTC)
    processed_at = datetime(2026, 11, 2, 5, 31, 13, tzinfo=UTC)
    needs_review = True
    candidates = (
        CandidateScore(42, None, 0.8123456789, 0.9, 0.7),
        CandidateScore(7, None, 0.8012, 0.81, 0.78),
    )


def test_assignment_event_is_a_pure_function_of_the_stored_row():
    first, second = assignment_event(Stored()), assignment_event(Stored())
    assert first == second
    doc = json.loads(first)
    assert doc["deer_id"] == "42" and doc["similarity"] == 0.812346
    assert doc["captured_at"] == "2026-11-02T05:31:12.250Z"
    assert set(doc) >= {"detection_id", "deer_id", "is_new_deer", "similarity",
                        "similarity_resnet", "similarity_effnet", "embedding_version",
                        "camera_id", "captured_at", "processed_at"}  # fmt: skip
    # The review flag and the deer it was compared with, best first, ids as strings.
    assert doc["needs_review"] is True
    assert [c["deer_id"] for c in doc["candidates"]] == ["42", "7"]
    runner_up = {"deer_id": "7", "similarity": 0.8012, "similarity_resnet": 0.81,
                 "similarity_effnet": 0.78}  # fmt: skip
    assert doc["candidates"][1] == runner_up


def test_dead_letter_headers_carry_reason_and_source():
    headers = dict(
        dead_letter_headers("bad_json", "oops", "detections", 3, 17, Stored.processed_at)
    )
    assert headers["dlq.reason"] == b"bad_json"
    assert headers["dlq.source.partition"] == b"3" and headers["dlq.source.offset"] == b"17"
