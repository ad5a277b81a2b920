"""Reading the image an event refers to (confined to the configured roots), and turning it
into the model's input: one path for the live stream and the replay; and the small JPEG
thumbnail of the crop that the live stream stores with each detection (docs/curation.md)."""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import torch
from PIL import Image

from reid.preprocess import ImageError, Preprocess, crop, decode_image
from streams.events import DetectionEvent, InvalidEvent

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 64 * 1024 * 1024
# Tried in turn until the JPEG fits the size bound (a 128 px crop is 3-6 KB at 80).
THUMBNAIL_QUALITIES = (80, 60, 40)


class ImageRoots:
    """The folders that ``image_uri`` may name; symlinks are resolved before the check."""

    def __init__(self, roots: Sequence[Path]) -> None:
        self.roots = [Path(r).resolve() for r in roots]

    def resolve(self, uri: str) -> Path:
        parsed = urlparse(uri)
        if parsed.scheme not in ("", "file"):
            raise InvalidEvent(
                "image_uri_remote", f"only local files are read, not {parsed.scheme}:"
            )
        if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
            raise InvalidEvent("image_uri_remote", "file: URIs must not name a host")
        raw = unquote(parsed.path) if parsed.scheme == "file" else uri
        if "\x00" in raw or not raw:
            raise InvalidEvent("image_uri_forbidden", "image_uri is empty or holds a NUL byte")
        if not self.roots:
            raise InvalidEvent("image_uri_forbidden", "no image roots are configured")
        candidates = [Path(raw)] if os.path.isabs(raw) else [root / raw for root in self.roots]
        for candidate in candidates:
            real = candidate.resolve()
            if any(real.is_relative_to(root) for root in self.roots):
                if real.is_file():
                    return real
                continue
            raise InvalidEvent("image_uri_forbidden", "image_uri points outside the image roots")
        raise InvalidEvent("image_not_found", "no such file under the image roots")

    def read(self, uri: str) -> bytes:
        path = self.resolve(uri)
        try:
            if path.stat().st_size > MAX_FILE_BYTES:
                raise InvalidEvent("image_too_large", f"file larger than {MAX_FILE_BYTES} bytes")
            return path.read_bytes()
        except OSError as err:
            raise InvalidEvent(
                "image_not_found", f"cannot read the file ({err.strerror})"
            ) from None


def image_bytes(event: DetectionEvent, roots: ImageRoots) -> bytes:
    if event.image_bytes is not None:
        return event.image_bytes
    assert event.image_uri is not None
    return roots.read(event.image_uri)


def crop_pixels(
    event: DetectionEvent, roots: ImageRoots, preprocess: Preprocess, *, max_pixels: int
) -> torch.Tensor:
    """The event's crop as the model's uint8 input: read, decode, crop to the box, resize.
    An image that cannot be read or decoded is the event's own problem (InvalidEvent)."""
    return crop_with_thumbnail(event, roots, preprocess, max_pixels=max_pixels)[0]


@dataclass(frozen=True)
class ThumbnailSpec:
    """A thumbnail's long side in pixels and the most bytes it may take."""

    long_side: int
    max_bytes: int


def crop_with_thumbnail(
    event: DetectionEvent,
    roots: ImageRoots,
    preprocess: Preprocess,
    *,
    max_pixels: int,
    thumbnail: ThumbnailSpec | None = None,
) -> tuple[torch.Tensor, bytes | None]:
    """``crop_pixels``, and the crop's thumbnail (None when not asked for or too large)."""
    data = image_bytes(event, roots)
    try:
        image = crop(decode_image(data, max_pixels=max_pixels), event.bbox)
    except ImageError as err:
        raise InvalidEvent(err.reason, str(err)) from None
    pixels = preprocess.to_uint8(image)
    return pixels, None if thumbnail is None else thumbnail_jpeg(image, thumbnail)


def thumbnail_jpeg(image: Image.Image, spec: ThumbnailSpec) -> bytes | None:
    """The image scaled down to ``spec.long_side`` on its long side (never up), as a JPEG of
    at most ``spec.max_bytes``; None if no quality tried fits. Never raises: a thumbnail is
    a convenience, and its failure must not cost the detection."""
    try:
        width, height = image.size
        scale = min(1.0, spec.long_side / max(width, height))
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        # reducing_gap: a cheap integer reduction first, then bilinear (large crops stay fast).
        small = image.convert("RGB").resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
        for quality in THUMBNAIL_QUALITIES:
            out = io.BytesIO()
            small.save(out, format="JPEG", quality=quality, optimize=False)
            if out.tell() <= spec.max_bytes:
                return out.getvalue()
    except Exception as err:  # PIL raises a zoo of types on odd images; none is fatal here
        log.debug("images: no thumbnail: %s", err)
        return None
    log.debug("images: thumbnail over %d bytes at every quality; not stored", spec.max_bytes)
    return None


def thumbnail_from_bytes(
    data: bytes, bbox: Sequence[float] | None, spec: ThumbnailSpec, *, max_pixels: int
) -> bytes | None:
    """A thumbnail for decoders that never make a PIL crop (the GPU path): the JPEG decoded
    at a reduced scale (``draft``: libjpeg's DCT scaling, far cheaper than a full decode),
    then cropped to the box scaled alike. None on any failure."""
    try:
        image = Image.open(io.BytesIO(data))
        full = image.size
        if full[0] * full[1] > max_pixels:
            return None
        if bbox is not None:
            x1, y1, x2, y2 = bbox
            side = max(x2 - x1, y2 - y1)
        else:
            side = max(full)
        if image.format == "JPEG" and side > 0:
            # Keep at least twice the thumbnail's size in the box, so the resize stays sharp.
            factor = max(1.0, side / (2 * spec.long_side))
            image.draft("RGB", (int(full[0] / factor), int(full[1] / factor)))
        image = image.convert("RGB")
        sx, sy = image.size[0] / full[0], image.size[1] / full[1]
        if bbox is not None:
            scaled = (bbox[0] * sx, bbox[1] * sy, bbox[2] * sx, bbox[3] * sy)
            image = crop(image, scaled)
    except Exception as err:
        log.debug("images: no thumbnail from bytes: %s", err)
        return None
    return thumbnail_jpeg(image, spec)
