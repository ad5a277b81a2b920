"""Reading the image an event refers to (confined to the configured roots), and turning it
into the model's input: one path for the live stream and the replay."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import unquote, urlparse

import torch

from reid.preprocess import ImageError, Preprocess, crop, decode_image
from streams.events import DetectionEvent, InvalidEvent

MAX_FILE_BYTES = 64 * 1024 * 1024


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
    data = image_bytes(event, roots)
    try:
        image = crop(decode_image(data, max_pixels=max_pixels), event.bbox)
    except ImageError as err:
        raise InvalidEvent(err.reason, str(err)) from None
    return preprocess.to_uint8(image)
