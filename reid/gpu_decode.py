"""Decode, crop and resize JPEG detections on the GPU (nvJPEG through torchvision).

`decode_crops` turns a batch of image payloads and boxes into the model's uint8 input
[M, 3, H, W] on the device, without the PIL round trip of the CPU path (`decode_image`,
`crop`, `Preprocess.to_uint8`). The same rules hold: an image whose header declares too many
pixels is refused before any pixel is decoded, boxes get the same rounding and errors, and
each refusal is an `ImageError` whose reason goes to the dead-letter topic.

Anything the fast path does not take (not a baseline/progressive 8-bit JPEG, no end-of-image
marker, CMYK, a decoder error) goes through the CPU path instead, which either decodes it the
usual way or names the reason. Without CUDA, a request for ``device="cuda"`` runs the CPU path
for everything; ``device="cpu"`` runs the very same tensor code with libjpeg (for tests).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from reid.preprocess import ImageError, Preprocess, crop, crop_box, decode_image

# torchvision 0.29 deprecates its image codecs for TorchCodec, which is not installed here.
warnings.filterwarnings(
    "ignore", message=r"The image decoding and encoding capabilities", category=DeprecationWarning
)

# Baseline, extended sequential and progressive Huffman JPEGs (nvJPEG's and libjpeg's ground).
_FAST_SOF = {0xC0, 0xC1, 0xC2}
# Every start-of-frame marker; 0xC4 (DHT), 0xC8 (JPG) and 0xCC (DAC) share the range.
_ANY_SOF = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


@dataclass
class DecodedCrops:
    """The decoded batch: ``images[k]`` is input ``index[k]``; refused inputs are in ``errors``."""

    images: torch.Tensor  # uint8 [M, 3, H, W]
    index: list[int]
    errors: dict[int, ImageError] = field(default_factory=dict)
    cpu_fallbacks: int = 0  # inputs that went through the PIL path

    def __len__(self) -> int:
        return len(self.index)


@dataclass(frozen=True)
class JpegHeader:
    width: int
    height: int
    components: int
    precision: int
    sof: int  # the start-of-frame marker (0xC0 baseline, 0xC2 progressive, ...)


def jpeg_header(data: bytes) -> JpegHeader | None:
    """The frame header of a JPEG, read from the markers alone; None if none is found first.

    Reads at most the headers (a few KB); the entropy-coded data is never touched.
    """
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    i = 2
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        if marker in (0xD8, 0xD9, 0xDA):  # a second SOI, EOI or scan data before any frame
            return None
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if length < 2:
            return None
        if marker in _ANY_SOF:
            if length < 8 or i + 10 > n:
                return None
            return JpegHeader(
                width=int.from_bytes(data[i + 7 : i + 9], "big"),
                height=int.from_bytes(data[i + 5 : i + 7], "big"),
                components=data[i + 9],
                precision=data[i + 4],
                sof=marker,
            )
        i += 2 + length
    return None


def decode_crops(
    payloads: Sequence[bytes],
    bboxes: Sequence[Sequence[float] | None],
    input_size: tuple[int, int] | Preprocess,
    *,
    device: str | torch.device = "cuda",
    max_pixels: int = 40_000_000,
) -> DecodedCrops:
    """Decode each payload, cut its box (None = whole image), resize it as ``input_size``
    says: (H, W) squashed, or a `Preprocess` (its fit and views, as the CPU path draws them).

    Returns the successes stacked in input order on ``device`` (the CPU when CUDA is absent),
    and an `ImageError` per refused input (reasons as `decode_image` and `crop` give them).
    """
    if len(payloads) != len(bboxes):
        raise ValueError(f"{len(payloads)} payloads but {len(bboxes)} boxes")
    target = torch.device(device)
    if target.type == "cuda" and not torch.cuda.is_available():
        target = torch.device("cpu")
        fast = False
    else:
        fast = True
    preprocess = (
        input_size if isinstance(input_size, Preprocess) else Preprocess(input_size=input_size)
    )
    height, width = preprocess.input_size
    limit = min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels)
    results: dict[int, torch.Tensor] = {}
    errors: dict[int, ImageError] = {}
    slow: list[int] = []
    jobs: list[tuple[int, tuple[int, int, int, int], JpegHeader]] = []

    for i, data in enumerate(payloads):
        header = jpeg_header(data) if fast else None
        if header is None or not _fast_path_takes(data, header):
            slow.append(i)
            continue
        if header.width * header.height > limit:
            errors[i] = ImageError(
                "image_too_large",
                f"declared size {header.width}x{header.height} exceeds {limit} pixels",
            )
            continue
        try:
            box = crop_box(bboxes[i], (header.width, header.height))
        except ImageError as err:
            errors[i] = err
            continue
        jobs.append((i, box, header))

    for (i, box, header), image in zip(jobs, _decode_all(payloads, jobs, target), strict=True):
        if image is None or tuple(image.shape) != (3, header.height, header.width):
            slow.append(i)  # a decoder error, or a frame other than the header said
            continue
        left, top, right, bottom = box
        results[i] = preprocess.render_tensor(image[:, top:bottom, left:right])

    for i in slow:
        try:
            image = crop(decode_image(payloads[i], max_pixels=max_pixels), bboxes[i])
            results[i] = preprocess.to_uint8(image).to(target)
        except ImageError as err:
            errors[i] = err

    index = sorted(results)
    images = (
        torch.stack([results[i] for i in index])
        if index
        else torch.zeros((0, 3, height, width), dtype=torch.uint8, device=target)
    )
    return DecodedCrops(images=images, index=index, errors=errors, cpu_fallbacks=len(slow))


def _fast_path_takes(data: bytes, header: JpegHeader) -> bool:
    # No end-of-image marker usually means a truncated file: the CPU path refuses those, and
    # a GPU decoder might fill the missing part instead. CMYK/YCCK and 12-bit images need
    # PIL's conversions.
    return (
        header.sof in _FAST_SOF
        and header.precision == 8
        and header.components in (1, 3)
        and header.width > 0
        and header.height > 0
        and data.endswith(b"\xff\xd9")
    )


def _decode_all(
    payloads: Sequence[bytes],
    jobs: Sequence[tuple[int, tuple[int, int, int, int], JpegHeader]],
    device: torch.device,
) -> list[torch.Tensor | None]:
    """Decode the jobs' payloads on ``device``; None for each one the decoder refuses."""
    if not jobs:
        return []
    data = [torch.frombuffer(bytearray(payloads[i]), dtype=torch.uint8) for i, _, _ in jobs]
    try:
        # One batched call: nvJPEG decodes the whole list together.
        return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        pass  # one bad image fails the whole call; find it one by one
    decoded: list[torch.Tensor | None] = []
    for item in data:
        try:
            decoded.append(decode_jpeg(item, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            decoded.append(None)
    return decoded
