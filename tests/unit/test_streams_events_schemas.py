"""The JSON Schema files in schemas/ and the code agree: the parser accepts exactly the
detection events the schema accepts (on valid and invalid examples of every rule), and what
the stream writes (assignment events, dead-letter headers) validates against its schema."""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from sinks.records import CandidateScore, StoredAssignment
from streams.events import REASONS, InvalidEvent, assignment_event, dead_letter_headers
from streams.events import parse_detection as parse

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"


def validator(name: str) -> Draft202012Validator:
    schema = json.loads((SCHEMAS / f"{name}.schema.json").read_text())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


JPEG = base64.b64encode(b"\xff\xd8\xff\xe0 not decoded by the parser").decode()
BASE = {"schema": 1, "detection_id": "cam-07/0", "camera_id": "cam-07",
        "captured_at": "2026-11-02T05:31:12.250Z", "image_b64": JPEG}  # fmt: skip
URI = {**{k: v for k, v in BASE.items() if k != "image_b64"},
       "image_uri": "z1/a.jpg", "bbox": [1, 2, 30, 40]}  # fmt: skip


def without(doc: dict[str, Any], *names: str) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k not in names}


VALID = {
    "inline crop": BASE,
    "by reference": URI,
    "all optional fields": {**BASE, "bbox": [0, 0.5, 10, 20.25], "confidence": 0.91,
                            "species": "deer"},
    "offset time": {**BASE, "captured_at": "2026-11-02T07:31:12+02:00"},
    "nulls are absent": {**BASE, "image_uri": None, "bbox": None, "confidence": None,
                         "species": None},
    "unknown fields ignored": {**BASE, "firmware": "2.1"},
    "confidence bounds": {**BASE, "confidence": 1},
    "id of 256": {**BASE, "detection_id": "d" * 256},
    "unicode id": {**BASE, "camera_id": "caméra-7 nord"},
}  # fmt: skip
INVALID = {
    "no schema": without(BASE, "schema"),
    "schema 2": {**BASE, "schema": 2},
    "schema as text": {**BASE, "schema": "1"},
    "no detection_id": without(BASE, "detection_id"),
    "empty id": {**BASE, "detection_id": ""},
    "blank id": {**BASE, "detection_id": "   "},
    "id of 257": {**BASE, "detection_id": "d" * 257},
    "control character in id": {**BASE, "camera_id": "cam\n07"},
    "id not a string": {**BASE, "camera_id": 7},
    "no time": without(BASE, "captured_at"),
    "time without offset": {**BASE, "captured_at": "2026-11-02T05:31:12"},
    "not a time": {**BASE, "captured_at": "yesterday"},
    "no image": without(BASE, "image_b64"),
    "both images": {**BASE, "image_uri": "z1/a.jpg", "bbox": [1, 2, 3, 4]},
    "not base64": {**BASE, "image_b64": "not base64!"},
    "base64 without padding": {**BASE, "image_b64": "abcde"},
    "empty image": {**BASE, "image_b64": ""},
    "uri without bbox": without(URI, "bbox"),
    "uri with null bbox": {**URI, "bbox": None},
    "bbox of 3": {**BASE, "bbox": [1, 2, 3]},
    "bbox of text": {**BASE, "bbox": [1, 2, 3, "4"]},
    "bbox of booleans": {**BASE, "bbox": [True, 2, 3, 4]},
    "bbox an object": {**BASE, "bbox": {"x1": 1}},
    "confidence above 1": {**BASE, "confidence": 1.5},
    "negative confidence": {**BASE, "confidence": -0.1},
    "confidence as text": {**BASE, "confidence": "high"},
    "species a number": {**BASE, "species": 3},
    "not an object": ["a", "list"],
}  # fmt: skip


def parser_accepts(doc: Any) -> bool:
    try:
        parse(json.dumps(doc).encode(), max_bytes=8_000_000)
    except InvalidEvent:
        return False
    return True


@pytest.mark.parametrize("name", sorted(VALID))
def test_valid_detection_events_pass_both(name: str) -> None:
    doc = VALID[name]
    assert list(validator("detection").iter_errors(doc)) == [], name
    assert parser_accepts(doc), name


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_detection_events_fail_both(name: str) -> None:
    doc = INVALID[name]
    assert not validator("detection").is_valid(doc), f"{name}: the schema accepts it"
    assert not parser_accepts(doc), f"{name}: the parser accepts it"


def stored(**changes: Any) -> StoredAssignment:
    moment = datetime(2026, 11, 2, 5, 31, 12, 250_000, tzinfo=UTC)
    row = StoredAssignment(
        detection_id="cam-07/0", deer_id=42, is_new_deer=False, similarity=0.734112,
        score_resnet=0.781204, score_effnet=0.663474, embedding_version="seed0-v2",
        camera_id="cam-07", captured_at=moment, processed_at=moment, needs_review=True,
        candidates=(CandidateScore(42, None, 0.734112, 0.781204, 0.663474),
                    CandidateScore(7, None, 0.70, 0.71, 0.69)),
    )  # fmt: skip
    return replace(row, **changes)


def test_assignment_events_match_their_schema() -> None:
    check = validator("assignment")
    first = stored(is_new_deer=True, similarity=None, score_resnet=None, score_effnet=None,
                   candidates=(), needs_review=False)  # fmt: skip
    for row in (stored(), first):
        doc = json.loads(assignment_event(row))
        assert list(check.iter_errors(doc)) == [], doc
    good = json.loads(assignment_event(stored()))
    for broken in (without(good, "deer_id"), {**good, "deer_id": 42},
                   {**good, "similarity": 1.5}, {**good, "processed_at": "2026-11-02"},
                   {**good, "candidates": [{"deer_id": "7"}]}, {**good, "schema": 2}):  # fmt: skip
        assert not check.is_valid(broken), broken


def test_dead_letter_headers_match_their_schema() -> None:
    check = validator("dead-letter")
    assert check.schema["properties"]["dlq.reason"]["enum"] == list(REASONS)
    moment = datetime(2026, 11, 2, 5, 31, 13, 4000, tzinfo=UTC)
    for reason in REASONS:
        headers = dead_letter_headers(reason, "x" * 5000, "detections", 3, 1742, moment)
        doc = {name: value.decode() for name, value in headers}
        assert list(check.iter_errors(doc)) == [], doc
    assert not check.is_valid({**doc, "dlq.reason": "no_such_reason"})
    assert not check.is_valid(without(doc, "dlq.source.offset"))
