"""Decoding, cropping and tensor preparation of detection images.

Everything here runs on untrusted bytes from camera producers, so every failure is turned
into an `ImageError` whose `reason` code can be routed to the dead-letter topic.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

_BBOX_TOLERANCE = 0.5


class ImageError(ValueError):
    """An image or bounding box that cannot be used; `reason` is a stable snake_case code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


# The formats camera traps write; untrusted bytes reach no other PIL plugin. EPS would run
# Ghostscript, and the rarer decoders (PSD, FLI, SGI, ICNS, ...) have each had their own CVEs.
# (A multi-picture MPO file is read by the JPEG plugin, as its first picture.)
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "TIFF", "BMP", "GIF")


def open_image(data: bytes) -> Image.Image:
    """PIL's lazy open of ``data`` (header only), for ``IMAGE_FORMATS`` alone; raises what
    ``Image.open`` raises, e.g. ``UnidentifiedImageError`` for any other format."""
    return Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)


def decode_image(data: bytes, *, max_pixels: int = 40_000_000) -> Image.Image:
    """Decode `data` into a fully loaded RGB image.

    Raises `ImageError` with reason `undecodable_image` or `image_too_large`.
    """
    if not data:
        raise ImageError("undecodable_image", "empty image payload")
    try:
        image = open_image(data)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # The warning only arrives here as an exception when warnings are errors; either way
        # PIL judged the declared size hostile.
        raise ImageError("image_too_large", str(exc)) from exc
    except Exception as exc:
        # PIL's format plugins raise a zoo of exception types on hostile input
        # (OSError, SyntaxError, struct.error, IndexError, ...); all mean "not an image".
        accepted = ", ".join(IMAGE_FORMATS)
        raise ImageError("undecodable_image", f"not a {accepted} image: {exc}") from exc

    # The header size is known before any pixel data is decoded: refuse bombs before
    # `load()` allocates width*height*channels bytes.
    # PIL's own limit also counts: above it PIL only warns, and a warning is not a refusal.
    limit = min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels)
    width, height = image.size
    if width * height > limit:
        raise ImageError(
            "image_too_large", f"declared size {width}x{height} exceeds {limit} pixels"
        )
    if width <= 0 or height <= 0:
        raise ImageError("undecodable_image", f"declared size {width}x{height}")
    try:
        # load() is where truncated or corrupt pixel data is detected, as long as
        # ImageFile.LOAD_TRUNCATED_IMAGES stays False (we never set it).
        image.load()
        return image if image.mode == "RGB" else image.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError("image_too_large", str(exc)) from exc
    except Exception as exc:
        raise ImageError("undecodable_image", f"corrupt or truncated image: {exc}") from exc


def crop(image: Image.Image, bbox: Sequence[float] | None) -> Image.Image:
    """Crop the pixel box [x1, y1, x2, y2]; None means the whole image.

    Raises `ImageError` with reason `bbox_invalid` or `bbox_outside_image`.
    """
    if bbox is None:
        return image
    return image.crop(crop_box(bbox, image.size))


def crop_box(bbox: Sequence[float] | None, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The whole-pixel (left, top, right, bottom) that `crop` cuts from an image of ``size``
    (W, H), for decoders that crop tensors (reid.gpu_decode); same rounding, same errors."""
    width, height = size
    if bbox is None:
        return 0, 0, width, height
    x1, y1, x2, y2 = _validate_bbox(bbox, size)
    # Round to whole pixels and clamp, because the tolerance lets coordinates sit up to half
    # a pixel outside the image.
    left = min(max(math.floor(x1 + 0.5), 0), width)
    top = min(max(math.floor(y1 + 0.5), 0), height)
    right = min(max(math.floor(x2 + 0.5), 0), width)
    bottom = min(max(math.floor(y2 + 0.5), 0), height)
    if right <= left or bottom <= top:
        raise ImageError("bbox_invalid", f"bbox {list(bbox)} covers less than one pixel")
    return left, top, right, bottom


def _validate_bbox(bbox: Sequence[float], size: tuple[int, int]) -> tuple[float, ...]:
    if isinstance(bbox, str | bytes) or not isinstance(bbox, Sequence) or len(bbox) != 4:
        raise ImageError("bbox_invalid", f"bbox must be 4 numbers [x1, y1, x2, y2], got {bbox!r}")
    try:
        coords = tuple(float(v) for v in bbox)
    except (TypeError, ValueError) as exc:
        raise ImageError("bbox_invalid", f"bbox must be 4 numbers, got {bbox!r}") from exc
    if any(isinstance(v, bool) for v in bbox) or not all(math.isfinite(v) for v in coords):
        raise ImageError("bbox_invalid", f"bbox must be 4 finite numbers, got {bbox!r}")
    x1, y1, x2, y2 = coords
    if x2 <= x1 or y2 <= y1:
        raise ImageError("bbox_invalid", f"bbox {list(coords)} has zero or negative area")
    width, height = size
    tol = _BBOX_TOLERANCE
    if x1 < -tol or y1 < -tol or x2 > width + tol or y2 > height + tol:
        raise ImageError(
            "bbox_outside_image", f"bbox {list(coords)} lies outside the {width}x{height} image"
        )
    return coords


FITS = ("squash", "pad")


@dataclass(frozen=True)
class Preprocess:
    """How a crop becomes a model input; stored in checkpoints so training and serving agree.

    ``fit``: "squash" resizes the whole crop to ``input_size`` (the aspect changes); "pad"
    keeps the aspect (side views of animals are wide: 192 x 384 keeps a flank's pattern that
    a square would squeeze) and centres the resized crop on a canvas of the mean colour, so
    the padding is zero after normalisation.

    ``views``: for an ensemble whose members want different inputs (size, fit, mean/std),
    one single-view Preprocess per member, drawn side by side on one canvas (a contact
    sheet; `Preprocess.sheet`). Everything downstream (decoders, batches, the ONNX graph)
    still sees one uint8 image per detection; each member cuts its own view out of it
    (`view_boxes`).
    """

    input_size: tuple[int, int] = (224, 224)  # (H, W)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    fit: str = "squash"
    views: tuple[Preprocess, ...] = ()

    def __post_init__(self) -> None:
        if len(self.input_size) != 2 or min(self.input_size) < 1:
            raise ValueError(f"input_size must be (H, W) positive, got {self.input_size}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean/std must be 3 values with std > 0: {self.mean} {self.std}")
        if self.fit not in FITS:
            raise ValueError(f"fit must be one of {FITS}, got {self.fit!r}")
        if self.views:
            if any(v.views for v in self.views):
                raise ValueError("views cannot nest")
            size = (max(v.input_size[0] for v in self.views),
                    sum(v.input_size[1] for v in self.views))  # fmt: skip
            if tuple(self.input_size) != size:
                raise ValueError(f"a sheet of these views is {size}, not {self.input_size}")

    @classmethod
    def sheet(cls, views: Sequence[Preprocess]) -> Preprocess:
        """One input for members with their own views; equal views collapse into one."""
        distinct = list(dict.fromkeys(views))
        if len(distinct) == 1:
            return distinct[0]
        height = max(v.input_size[0] for v in distinct)
        width = sum(v.input_size[1] for v in distinct)
        first = distinct[0]
        return cls((height, width), first.mean, first.std, first.fit, tuple(distinct))

    def view_boxes(self) -> list[tuple[int, int, int]]:
        """(height, left, width) of each view on the canvas: a member's input is
        ``x[:, :, :height, left:left + width]``."""
        if not self.views:
            return [(self.input_size[0], 0, self.input_size[1])]
        boxes, left = [], 0
        for v in self.views:
            boxes.append((v.input_size[0], left, v.input_size[1]))
            left += v.input_size[1]
        return boxes

    def view_of(self, single: Preprocess) -> int:
        """The index of ``single``'s view on this canvas."""
        views = list(self.views) or [self]
        return views.index(single)

    def _layout(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(new H, new W, top, left) of a ``height`` x ``width`` crop on this view."""
        out_h, out_w = self.input_size
        if self.fit == "squash":
            return out_h, out_w, 0, 0
        scale = min(out_h / height, out_w / width)
        new_h = min(out_h, max(1, round(height * scale)))
        new_w = min(out_w, max(1, round(width * scale)))
        return new_h, new_w, (out_h - new_h) // 2, (out_w - new_w) // 2

    def _fill(self) -> tuple[int, int, int]:
        return tuple(round(255 * m) for m in self.mean)  # type: ignore[return-value]

    def to_uint8(self, image: Image.Image) -> torch.Tensor:
        """Resize (and pad) the crop to `input_size`; returns uint8 [3, H, W].

        Uses PIL's bilinear resampling, which widens its support when shrinking (antialias).
        It touches no shared state and releases the GIL, so decode threads can call it.
        """
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        if self.views:
            canvas = Image.new("RGB", self.input_size[::-1])
            for view, (_, left, _) in zip(self.views, self.view_boxes(), strict=True):
                canvas.paste(view._render(rgb), (left, 0))
            return _tensor(canvas)
        return _tensor(self._render(rgb))

    def _render(self, rgb: Image.Image) -> Image.Image:
        height, width = self.input_size
        new_h, new_w, top, left = self._layout(rgb.height, rgb.width)
        resized = rgb.resize((new_w, new_h), Image.Resampling.BILINEAR)
        if (new_h, new_w) == (height, width):
            return resized
        canvas = Image.new("RGB", (width, height), self._fill())
        canvas.paste(resized, (left, top))
        return canvas

    def render_tensor(self, crop: torch.Tensor) -> torch.Tensor:
        """uint8 [3, h, w] on any device -> uint8 [3, H, W]: what `to_uint8` does, in torch
        (bilinear with antialias, like PIL's resize), for decoders that crop tensors."""
        if self.views:
            canvas = crop.new_zeros((3, *self.input_size))
            for view, (height, left, width) in zip(self.views, self.view_boxes(), strict=True):
                canvas[:, :height, left : left + width] = view.render_tensor(crop)
            return canvas
        new_h, new_w, top, left = self._layout(crop.shape[1], crop.shape[2])
        x = crop.unsqueeze(0).to(torch.float32)
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", antialias=True,
                          align_corners=False)  # fmt: skip
        resized = x.round_().clamp_(0, 255).to(torch.uint8).squeeze(0)
        if (new_h, new_w) == tuple(self.input_size):
            return resized
        fill = torch.tensor(self._fill(), dtype=torch.uint8, device=crop.device)
        canvas = fill.view(3, 1, 1).expand(3, *self.input_size).clone()
        canvas[:, top : top + new_h, left : left + new_w] = resized
        return canvas

    def normalise(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, H, W] on any device -> float32 normalised on the same device (each
        view of a sheet with its own mean and std)."""
        if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[1] != 3:
            raise ValueError(f"expected uint8 [N, 3, H, W], got {batch.dtype} {tuple(batch.shape)}")
        views = list(self.views) or [self]
        widths = [v.input_size[1] for v in views] if self.views else [batch.shape[3]]
        mean = torch.tensor([v.mean for v in views], dtype=torch.float32, device=batch.device)
        std = torch.tensor([v.std for v in views], dtype=torch.float32, device=batch.device)
        repeats = torch.tensor(widths, device=batch.device)
        # Per column: [3, W], each view's statistics over its own columns.
        mean = mean.repeat_interleave(repeats, dim=0).T
        std = std.repeat_interleave(repeats, dim=0).T
        scale = 1.0 / (255.0 * std)
        # (x/255 - mean)/std folded into one multiply-add.
        return batch.to(torch.float32) * scale.view(1, 3, 1, -1) - (mean / std).view(1, 3, 1, -1)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "input_size": list(self.input_size),
            "mean": list(self.mean),
            "std": list(self.std),
        }
        if self.fit != "squash":  # older readers know only the three fields above
            out["fit"] = self.fit
        if self.views:
            out["views"] = [v.to_dict() for v in self.views]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocess:
        unknown = set(data) - {"input_size", "mean", "std", "fit", "views"}
        if unknown:
            raise ValueError(f"unknown preprocess fields: {sorted(unknown)}")
        if data.get("views"):
            return cls.sheet([cls.from_dict(v) for v in data["views"]])
        defaults = cls()
        return cls(
            input_size=tuple(int(v) for v in data.get("input_size", defaults.input_size)),
            mean=tuple(float(v) for v in data.get("mean", defaults.mean)),
            std=tuple(float(v) for v in data.get("std", defaults.std)),
            fit=str(data.get("fit", "squash")),
        )


def _tensor(image: Image.Image) -> torch.Tensor:
    array = np.array(image, dtype=np.uint8)  # copy: torch wants a writable buffer
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
