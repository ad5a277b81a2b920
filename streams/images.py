"""Reading the image an event refers to (confined to the configured roots), and turning it
into the model's input: one path for the live stream and the replay; and the small JPEG
thumbnail of the crop that the live stream stores with each detection (docs/curation.md)."""

from __future__ import annotations

import errno
import io
import logging
import os
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO
from urllib.parse import unquote, urlparse

import torch
from PIL import Image

from reid.preprocess import ImageError, Preprocess, crop, decode_image, open_image
from streams.events import DetectionEvent, InvalidEvent

if TYPE_CHECKING:
    from streams.settings import Settings

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 64 * 1024 * 1024
# Tried in turn until the JPEG fits the size bound (a 128 px crop is 3-6 KB at 80).
THUMBNAIL_QUALITIES = (80, 60, 40)


# What an OSError reading an image says about the event (docs/events.md#image-files).
# Absent: the file may still be coming (an uploader writing it after the event): looked for
# again for ``wait_s``, then the event is ``image_not_found``.
ABSENT_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR})
# Transient: the image store or the host is failing, not the event: retried a few times, then
# ImageSourceUnavailable (the batch is retried like after a database outage).
TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "EAGAIN", "EBUSY", "ECOMM", "ECONNABORTED", "ECONNREFUSED", "ECONNRESET", "EDEADLK",
        "EHOSTDOWN", "EHOSTUNREACH", "EINTR", "EIO", "EMFILE", "ENETDOWN", "ENETRESET",
        "ENETUNREACH", "ENFILE", "ENOBUFS", "ENOLCK", "ENOLINK", "ENOMEM", "ENOTCONN",
        "EREMOTEIO", "ESTALE", "ETIMEDOUT", "EWOULDBLOCK",
    )
    if hasattr(errno, name)
)  # fmt: skip
# Anything else (EACCES, EPERM, EISDIR, ELOOP, ENAMETOOLONG, EINVAL, no errno...) is the
# event's: it names something that cannot be read as it stands, now or on a retry.
POLL_S = 0.1
TRANSIENT_RETRY_S = (0.05, 0.2, 0.5)


class ImageSourceUnavailable(RuntimeError):
    """Reading an image failed for a reason that is not the event's (too many open files, an
    I/O error, a stale NFS handle, ...), and kept failing over a few quick retries: a
    dependency failure like a database outage. Never an InvalidEvent: the event must not be
    dead-lettered for it; its batch is retried."""

    def __init__(self, uri: str, err: OSError) -> None:
        name = errno.errorcode.get(err.errno or -1, str(err.errno))
        super().__init__(f"image source unavailable: {name} {err.strerror} ({_short(uri)})")
        self.errno = err.errno


class _Absent(InvalidEvent):
    """No file (yet) at the name: ``read`` looks again until its wait is over."""

    def __init__(self) -> None:
        super().__init__("image_not_found", "no such file under the image roots")


def errno_class(err: OSError) -> str:
    """``absent``, ``transient`` or ``bad`` (the event's own problem); see the constants."""
    if err.errno in ABSENT_ERRNOS:
        return "absent"
    if err.errno in TRANSIENT_ERRNOS:
        return "transient"
    return "bad"


def _event_error(err: OSError) -> Exception:
    """What an OSError becomes: _Absent, the OSError itself (transient), or InvalidEvent."""
    kind = errno_class(err)
    if kind == "absent":
        return _Absent()
    if kind == "transient":
        return err
    return InvalidEvent("image_not_found", f"cannot read the file ({err.strerror or err})")


def _not_a_file() -> InvalidEvent:
    return InvalidEvent("image_not_found", "image_uri names a directory or other non-file")


def _open_untrusted(path: Path) -> BinaryIO:
    """``path`` opened for reading without blocking and without following a final symlink:
    the path may have changed since it was checked (a FIFO put there would hold the reading
    thread for good), so what was opened is checked again (``ImageRoots._check_opened``)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return open(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


class ImageRoots:
    """The folders that ``image_uri`` may name; symlinks are resolved before the check.

    ``read`` waits up to ``wait_s`` for an absent file and retries transient errors
    (``retry_s``, then ImageSourceUnavailable); ``sleep``/``clock`` are for the tests."""

    def __init__(
        self,
        roots: Sequence[Path],
        *,
        wait_s: float = 2.0,
        poll_s: float = POLL_S,
        retry_s: Sequence[float] = TRANSIENT_RETRY_S,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.roots = [Path(r).resolve() for r in roots]
        self.wait_s = wait_s
        self.poll_s = poll_s
        self.retry_s = tuple(retry_s)
        self._sleep = sleep
        self._clock = clock

    @classmethod
    def from_settings(cls, settings: Settings) -> ImageRoots:
        return cls(settings.image_roots, wait_s=settings.image_wait_ms / 1000)

    def resolve(self, uri: str) -> Path:
        """The regular file ``uri`` names, looked up once. Raises InvalidEvent (bad input; an
        absent file is ``image_not_found``) or a transient OSError."""
        absent = False
        for candidate in self._candidates(uri):
            try:
                real = candidate.resolve()
            except RuntimeError:  # Python 3.11's answer to a symlink loop
                raise InvalidEvent("image_not_found", "image_uri is a symlink loop") from None
            except OSError as err:
                raise _event_error(err) from None
            self._refuse_outside(real)
            try:
                mode = real.stat().st_mode
            except OSError as err:
                error = _event_error(err)
                if isinstance(error, _Absent):
                    absent = True
                    continue  # another root may hold it
                raise error from None
            if stat.S_ISREG(mode):
                return real
        if absent:
            raise _Absent()
        raise _not_a_file()

    def read(self, uri: str, *, deadline: float | None = None) -> bytes:
        """The file's bytes. An absent file is looked for every ``poll_s`` until ``wait_s``
        (or the monotonic ``deadline``, if sooner: one for a whole batch) is over, then
        InvalidEvent ``image_not_found``; a transient error is retried, then
        ImageSourceUnavailable; anything else is InvalidEvent at once."""
        give_up = self._clock() + self.wait_s
        if deadline is not None:
            give_up = min(give_up, deadline)
        failures = 0
        while True:
            try:
                return self._read_once(uri)
            except _Absent:
                now = self._clock()
                if now >= give_up:
                    raise InvalidEvent(
                        "image_not_found", "no such file under the image roots"
                    ) from None
                self._sleep(min(self.poll_s, give_up - now))
            except OSError as err:  # transient: the others became InvalidEvent
                if failures >= len(self.retry_s):
                    log.warning("images: giving up after %d tries: %s", failures + 1, err)
                    raise ImageSourceUnavailable(uri, err) from err
                self._sleep(self.retry_s[failures])
                failures += 1

    def _read_once(self, uri: str) -> bytes:
        path = self.resolve(uri)
        try:
            with _open_untrusted(path) as file:
                info = os.fstat(file.fileno())
                self._check_opened(file.fileno(), info.st_mode)
                size = info.st_size
                # At most one byte more than allowed: a file growing meanwhile is caught too.
                data = b"" if size > MAX_FILE_BYTES else file.read(MAX_FILE_BYTES + 1)
        except OSError as err:
            raise _event_error(err) from None
        if size > MAX_FILE_BYTES or len(data) > MAX_FILE_BYTES:
            raise InvalidEvent("image_too_large", f"file larger than {MAX_FILE_BYTES} bytes")
        return data

    def _check_opened(self, fd: int, mode: int) -> None:
        """What was opened is a regular file inside the roots (where the system says which
        file a descriptor is: Linux's /proc), whatever happened to the path meanwhile."""
        if not stat.S_ISREG(mode):
            raise _not_a_file()
        try:
            opened = Path(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            return  # no /proc: resolve()'s check stands alone
        self._refuse_outside(opened)

    def _refuse_outside(self, real: Path) -> None:
        """InvalidEvent unless ``real`` (a path without symlinks) lies inside a root."""
        if not any(real.is_relative_to(root) for root in self.roots):
            raise InvalidEvent("image_uri_forbidden", "image_uri points outside the image roots")

    def _candidates(self, uri: str) -> list[Path]:
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
        return [Path(raw)] if os.path.isabs(raw) else [root / raw for root in self.roots]


def image_bytes(
    event: DetectionEvent, roots: ImageRoots, *, deadline: float | None = None
) -> bytes:
    """The event's image: its ``image_b64`` or its file (see ``ImageRoots.read``)."""
    if event.image_bytes is not None:
        return event.image_bytes
    assert event.image_uri is not None
    return roots.read(event.image_uri, deadline=deadline)


def _short(uri: str) -> str:
    return uri if len(uri) <= 200 else uri[:200] + "..."


def crop_pixels(
    event: DetectionEvent,
    roots: ImageRoots,
    preprocess: Preprocess,
    *,
    max_pixels: int,
    deadline: float | None = None,
) -> torch.Tensor:
    """The event's crop as the model's uint8 input: read, decode, crop to the box, resize.
    An image that cannot be read or decoded is the event's own problem (InvalidEvent); an
    image store that fails is not (ImageSourceUnavailable)."""
    return crop_with_thumbnail(event, roots, preprocess, max_pixels=max_pixels, deadline=deadline)[
        0
    ]


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
    deadline: float | None = None,
) -> tuple[torch.Tensor, bytes | None]:
    """``crop_pixels``, and the crop's thumbnail (None when not asked for or too large)."""
    data = image_bytes(event, roots, deadline=deadline)
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
        image = open_image(data)
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
