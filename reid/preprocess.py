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
from PIL import Image

_BBOX_TOLERANCE = 0.5


class ImageError(ValueError):
    """An image or bounding box that cannot be used; `reason` is a stable snake_case code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


def decode_image(data: bytes, *, max_pixels: int = 40_000_000) -> Image.Image:
    """Decode `data` into a fully loaded RGB image.

    Raises `ImageError` with reason `undecodable_image` or `image_too_large`.
    """
    if not data:
        raise ImageError("undecodable_image", "empty image payload")
    try:
        image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # The warning only arrives here as an exception when warnings are errors; either way
        # PIL judged the declared size hostile.
        raise ImageError("image_too_large", str(exc)) from exc
    except Exception as exc:
        # PIL's format plugins raise a zoo of exception types on hostile input
        # (OSError, SyntaxError, struct.error, IndexError, ...); all mean "not an image".
        raise ImageError("undecodable_image", f"cannot identify image: {exc}") from exc

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


@dataclass(frozen=True)
class Preprocess:
    """How a crop becomes a model input; stored in checkpoints so training and serving agree."""

    input_size: tuple[int, int] = (224, 224)  # (H, W)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        if len(self.input_size) != 2 or min(self.input_size) < 1:
            raise ValueError(f"input_size must be (H, W) positive, got {self.input_size}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean/std must be 3 values with std > 0: {self.mean} {self.std}")

    def to_uint8(self, image: Image.Image) -> torch.Tensor:
        """Resize the whole image to `input_size`; returns uint8 [3, H, W].

        Uses PIL's bilinear resampling, which widens its support when shrinking (antialias).
        It touches no shared state and releases the GIL, so decode threads can call it.
        """
        height, width = self.input_size
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        resized = rgb.resize((width, height), Image.Resampling.BILINEAR)
        array = np.array(resized, dtype=np.uint8)  # copy: torch wants a writable buffer
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()

    def normalise(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, H, W] on any device -> float32 normalised on the same device."""
        if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[1] != 3:
            raise ValueError(f"expected uint8 [N, 3, H, W], got {batch.dtype} {tuple(batch.shape)}")
        mean = torch.tensor(self.mean, dtype=torch.float32, device=batch.device)
        std = torch.tensor(self.std, dtype=torch.float32, device=batch.device)
        scale = 1.0 / (255.0 * std)
        # (x/255 - mean)/std folded into one multiply-add.
        return batch.to(torch.float32) * scale.view(1, 3, 1, 1) - (mean / std).view(1, 3, 1, 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_size": list(self.input_size),
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocess:
        unknown = set(data) - {"input_size", "mean", "std"}
        if unknown:
            raise ValueError(f"unknown preprocess fields: {sorted(unknown)}")
        defaults = cls()
        return cls(
            input_size=tuple(int(v) for v in data.get("input_size", defaults.input_size)),
            mean=tuple(float(v) for v in data.get("mean", defaults.mean)),
            std=tuple(float(v) for v in data.get("std", defaults.std)),
        )
