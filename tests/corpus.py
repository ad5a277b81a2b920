"""A corpus of hostile and broken detection events, each with the dead-letter reason it earns."""

from __future__ import annotations

import base64
import io
import itertools
import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from streams.tools.produce import detection_event
from tests.conftest import ZEBRA_DIR


@dataclass(frozen=True)
class BadEvent:
    name: str  # the bad-input class, one row in RELIABILITY.md
    value: bytes
    reason: str  # the dead-letter reason it must get
    key: str = "cam-bad"


def png_bomb(width: int = 50_000, height: int = 50_000) -> bytes:
    """A tiny PNG whose header declares ``width`` x ``height`` pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def bad_events(image_root: Path, *, max_message_bytes: int) -> list[BadEvent]:
    """Every class of bad input; ``image_root`` is a configured root the test owns (a symlink
    out of it is planted here)."""
    image_root.mkdir(parents=True, exist_ok=True)
    ids = itertools.count()
    template = detection_event(b"x", "cam-bad")
    truncated = (ZEBRA_DIR / "z1" / "z1_left_img-0000001.jpg").read_bytes()[:2000]
    small = io.BytesIO()
    Image.new("RGB", (40, 30), "gray").save(small, format="PNG")
    outside = image_root.parent / "outside.jpg"
    outside.write_bytes((ZEBRA_DIR / "z1" / "z1_left_img-0000001.jpg").read_bytes())
    link = image_root / "escape.jpg"
    if not link.exists():
        os.symlink(outside, link)

    def event(**changes: object) -> bytes:
        doc = {**template, "detection_id": f"bad-{next(ids)}", **changes}
        return json.dumps({k: v for k, v in doc.items() if v is not None}).encode()

    uri = {"image_b64": None, "bbox": [0, 0, 10, 10]}
    return [
        BadEvent("malformed JSON", b'{"schema": 1, "detection_id": ', "bad_json"),
        BadEvent("JSON that is not an object", b'["schema", 1]', "bad_json"),
        BadEvent("wrong type (schema as text)", event(schema="1"), "wrong_type"),
        BadEvent("wrong type (bbox as text)", event(bbox="0,0,10,10"), "bad_bbox"),
        BadEvent("missing field (camera_id)", event(camera_id=None), "missing_field"),
        BadEvent("unknown schema version", event(schema=2), "unknown_schema"),
        BadEvent("empty message", b"", "empty_message"),
        BadEvent("empty image bytes", event(image_b64=""), "bad_image_field"),
        BadEvent("non-image bytes", event(image_b64=_b64(b"GIF? no, text")), "undecodable_image"),
        BadEvent("truncated JPEG", event(image_b64=_b64(truncated)), "undecodable_image"),
        BadEvent(
            "decompression bomb (50,000 x 50,000 PNG)",
            event(image_b64=_b64(png_bomb())),
            "image_too_large",
        ),
        BadEvent(
            "box outside the image",
            event(image_b64=_b64(small.getvalue()), bbox=[10, 10, 400, 20]),
            "bbox_outside_image",
        ),
        BadEvent(
            "box of zero area",
            event(image_b64=_b64(small.getvalue()), bbox=[10, 10, 10, 20]),
            "bbox_invalid",
        ),
        BadEvent(
            "image_uri with ../", event(**uri, image_uri="../outside.jpg"), "image_uri_forbidden"
        ),
        BadEvent(
            "image_uri absolute outside the root",
            event(**uri, image_uri=str(outside)),
            "image_uri_forbidden",
        ),
        BadEvent(
            "image_uri symlink out of the root",
            event(**uri, image_uri="escape.jpg"),
            "image_uri_forbidden",
        ),
        BadEvent(
            "image_uri remote URL",
            event(**uri, image_uri="https://example.org/deer.jpg"),
            "image_uri_remote",
        ),
        BadEvent(
            "oversized message",
            event(species="x" * (max_message_bytes + 1)),
            "message_too_large",
        ),
        # At the edges of what JSON, Python and PostgreSQL accept (these crashed the batch).
        BadEvent("NUL character in species", event(species="roe\x00deer"), "wrong_type"),
        BadEvent("lone surrogate in species", event(species="\udc00"), "wrong_type"),
        BadEvent(
            "401-digit integer in bbox",
            event(image_b64=_b64(small.getvalue()), bbox=[10**400, 0, 10, 10]),
            "bad_bbox",
        ),
        BadEvent(
            "timestamp outside the UTC range",
            event(captured_at="0001-01-01T00:00:00+01:00"),
            "bad_timestamp",
        ),
        BadEvent("image_uri with a NUL byte", event(**uri, image_uri="a\x00.jpg"), "wrong_type"),
        BadEvent("image_uri name too long", event(**uri, image_uri="x" * 5000), "image_not_found"),
    ]
