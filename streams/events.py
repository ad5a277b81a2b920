"""The event contracts: detection events in, assignment events and dead letters out.

Parsing never raises anything but :class:`InvalidEvent`, whose ``reason`` is one of
:data:`REASONS` (a bounded set, used as a metric label and a dead-letter header).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

SCHEMA_VERSION = 1
MAX_ID_LENGTH = 256

REASONS = (
    "empty_message",
    "message_too_large",
    "bad_json",
    "missing_field",
    "wrong_type",
    "unknown_schema",
    "bad_timestamp",
    "bad_image_field",
    "bad_bbox",
    "image_uri_remote",
    "image_uri_forbidden",
    "image_not_found",
    "undecodable_image",
    "image_too_large",
    "bbox_invalid",
    "bbox_outside_image",
    "duplicate_conflict",
    # Anything else one event made fail (a bug, or an edge no rule above names): found by
    # bisecting the batch; the exception's type goes in the dlq.exception header.
    "unprocessable",
)


class InvalidEvent(ValueError):
    """An event that cannot be processed; it goes to the dead-letter topic with the reason."""

    def __init__(self, reason: str, detail: str, *, exception: str | None = None) -> None:
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.exception = exception  # the type of the unexpected error, for `unprocessable`

    @classmethod
    def unprocessable(cls, err: BaseException) -> InvalidEvent:
        kind = type(err)
        first_line = str(err).strip().split("\n", 1)[0]  # psycopg's DETAIL quotes the row
        return cls("unprocessable", f"{kind.__name__}: {first_line}"[:500],
                   exception=f"{kind.__module__}.{kind.__qualname__}")  # fmt: skip


@dataclass(frozen=True)
class DetectionEvent:
    detection_id: str
    camera_id: str
    captured_at: datetime
    image_bytes: bytes | None  # decoded from image_b64
    image_uri: str | None
    bbox: tuple[float, float, float, float] | None
    confidence: float | None
    species: str | None


def parse_detection(value: bytes | None, *, max_bytes: int) -> DetectionEvent:
    """Validate one raw input message against schema version 1."""
    if not value:
        raise InvalidEvent("empty_message", "the message has no value")
    if len(value) > max_bytes:
        raise InvalidEvent("message_too_large", f"{len(value)} bytes > limit {max_bytes}")
    try:
        doc = json.loads(value)
    except (UnicodeDecodeError, ValueError) as err:
        raise InvalidEvent("bad_json", f"not valid UTF-8 JSON ({err})") from None
    except RecursionError:
        raise InvalidEvent("bad_json", "JSON nested too deeply") from None
    if not isinstance(doc, dict):
        raise InvalidEvent("bad_json", f"expected a JSON object, got {type(doc).__name__}")

    schema = _required(doc, "schema")
    if type(schema) is not int:
        raise InvalidEvent("wrong_type", "schema must be an integer")
    if schema != SCHEMA_VERSION:
        raise InvalidEvent("unknown_schema", f"schema {schema} (this consumer reads 1)")

    image_b64 = doc.get("image_b64")
    image_uri = doc.get("image_uri")
    if (image_b64 is None) == (image_uri is None):
        raise InvalidEvent("bad_image_field", "give exactly one of image_b64 and image_uri")

    return DetectionEvent(
        detection_id=_identifier(doc, "detection_id"),
        camera_id=_identifier(doc, "camera_id"),
        captured_at=_timestamp(_required(doc, "captured_at")),
        image_bytes=_base64(image_b64) if image_b64 is not None else None,
        image_uri=_string(image_uri, "image_uri") if image_uri is not None else None,
        bbox=_bbox(doc.get("bbox"), required=image_uri is not None),
        confidence=_confidence(doc.get("confidence")),
        species=_string(doc["species"], "species") if doc.get("species") is not None else None,
    )


def _required(doc: dict[str, Any], name: str) -> Any:
    if name not in doc or doc[name] is None:
        raise InvalidEvent("missing_field", f"{name} is required")
    return doc[name]


def _string(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise InvalidEvent("wrong_type", f"{name} must be a string")
    # JSON allows both, PostgreSQL text and UTF-8 do not: "\u0000", lone surrogates.
    if "\x00" in value:
        raise InvalidEvent("wrong_type", f"{name} contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidEvent("wrong_type", f"{name} is not valid Unicode (lone surrogate)") from None
    return value


def _identifier(doc: dict[str, Any], name: str) -> str:
    value = _string(_required(doc, name), name)
    if not value.strip() or len(value) > MAX_ID_LENGTH or not value.isprintable():
        raise InvalidEvent("wrong_type", f"{name} must be 1-{MAX_ID_LENGTH} printable characters")
    return value


def _timestamp(value: Any) -> datetime:
    text = _string(value, "captured_at")
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise InvalidEvent("bad_timestamp", "captured_at is not an RFC 3339 timestamp") from None
    if parsed.tzinfo is None:
        raise InvalidEvent("bad_timestamp", "captured_at needs a UTC offset (RFC 3339)")
    try:  # 0001-01-01T00:00+01:00 is before datetime.min in UTC: no output could carry it
        parsed.astimezone(UTC)
    except OverflowError:
        raise InvalidEvent("bad_timestamp", "captured_at is out of range in UTC") from None
    return parsed


def _base64(value: Any) -> bytes:
    text = _string(value, "image_b64")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidEvent("bad_image_field", "image_b64 is not valid base64") from None
    if not data:
        raise InvalidEvent("bad_image_field", "image_b64 is empty")
    return data


def _number(value: Any) -> float | None:
    if type(value) not in (int, float):
        return None
    try:
        number = float(value)  # a 400-digit JSON integer does not fit a float
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _bbox(value: Any, *, required: bool) -> tuple[float, float, float, float] | None:
    if value is None:
        if required:
            raise InvalidEvent("missing_field", "bbox is required with image_uri")
        return None
    if not isinstance(value, list) or len(value) != 4:
        raise InvalidEvent("bad_bbox", "bbox must be [x1, y1, x2, y2]")
    numbers = [_number(v) for v in value]
    if any(n is None for n in numbers):
        raise InvalidEvent("bad_bbox", "bbox must hold four finite numbers")
    return tuple(numbers)  # type: ignore[return-value]


def _confidence(value: Any) -> float | None:
    if value is None:
        return None
    number = _number(value)
    if number is None or not 0.0 <= number <= 1.0:
        raise InvalidEvent("wrong_type", "confidence must be a number in [0, 1]")
    return number


# -- output -------------------------------------------------------------------------------
def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(float(value), 6)


def assignment_event(stored: Any) -> bytes:
    """The output event for one stored detection (a ``sinks.records.StoredAssignment``).

    Built only from the stored row, so a redelivered detection republishes identical bytes
    (unless a curation change moved the detection meanwhile: then ``deer_id`` is the deer it
    belongs to now, the survivor of a merge; the scores and candidates stay those of the
    match-time decision; see docs/curation.md).
    """
    doc = {
        "schema": SCHEMA_VERSION,
        "detection_id": stored.detection_id,
        "deer_id": str(stored.deer_id),
        "is_new_deer": stored.is_new_deer,
        "similarity": _rounded(stored.similarity),
        "similarity_resnet": _rounded(stored.score_resnet),
        "similarity_effnet": _rounded(stored.score_effnet),
        "embedding_version": stored.embedding_version,
        "camera_id": stored.camera_id,
        "captured_at": rfc3339(stored.captured_at),
        "processed_at": rfc3339(stored.processed_at),
        "needs_review": bool(stored.needs_review),
        "candidates": [
            {
                "deer_id": str(c.deer_id),
                "similarity": _rounded(c.similarity),
                "similarity_resnet": _rounded(c.score_resnet),
                "similarity_effnet": _rounded(c.score_effnet),
            }
            for c in stored.candidates
        ],
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def dead_letter_headers(
    reason: str,
    detail: str,
    topic: str,
    partition: int,
    offset: int,
    failed_at: datetime,
    exception: str | None = None,
) -> list[tuple[str, bytes]]:
    """Kafka Connect style context headers; the record's key and value are the originals.
    ``exception``: the error's type, for ``unprocessable`` events."""
    headers = [
        ("dlq.reason", reason.encode()),
        # The detail may quote the event's own text, lone surrogates included.
        ("dlq.error", detail[:1000].encode("utf-8", "replace")),
        ("dlq.source.topic", topic.encode()),
        ("dlq.source.partition", str(partition).encode()),
        ("dlq.source.offset", str(offset).encode()),
        ("dlq.failed_at", rfc3339(failed_at).encode()),
    ]
    if exception is not None:
        headers.append(("dlq.exception", exception.encode("utf-8", "replace")))
    return headers
