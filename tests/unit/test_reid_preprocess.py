import io
import math
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from reid.preprocess import ImageError, Preprocess, crop, decode_image


def _encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return (
        struct.pack(">I", len(body))
        + kind
        + body
        + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    )


def _png_with_declared_size(width: int, height: int) -> bytes:
    """A valid-looking PNG header declaring a huge RGB image, with a tiny IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + _png_chunk(b"IEND", b"")
    )


def _reason(data: bytes, **kwargs: int) -> str:
    with pytest.raises(ImageError) as info:
        decode_image(data, **kwargs)
    assert str(info.value)  # a human message, not just a code
    return info.value.reason


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "TIFF", "BMP", "GIF"])
def test_decode_returns_loaded_rgb(fmt: str) -> None:
    image = decode_image(_encode(_noise_image(40, 30), fmt))
    assert image.mode == "RGB"
    assert image.size == (40, 30)


def test_decode_converts_greyscale_and_alpha_to_rgb() -> None:
    grey = Image.new("L", (8, 6), 77)
    rgba = Image.new("RGBA", (8, 6), (10, 20, 30, 40))
    assert decode_image(_encode(grey, "PNG")).getpixel((0, 0)) == (77, 77, 77)
    assert decode_image(_encode(rgba, "PNG")).getpixel((3, 3)) == (10, 20, 30)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_image_is_undecodable(fmt: str) -> None:
    data = _encode(_noise_image(128, 128), fmt)
    assert _reason(data[: len(data) // 2]) == "undecodable_image"


@pytest.mark.parametrize(
    "data",
    [b"", b"not an image at all", np.random.default_rng(3).bytes(4096), b"\x89PNG\r\n\x1a\n"],
)
def test_garbage_is_undecodable(data: bytes) -> None:
    assert _reason(data) == "undecodable_image"


@pytest.mark.parametrize("fmt", ["PSD", "TGA", "SGI", "ICO", "PCX", "PPM", "DDS", "QOI", "EPS"])
def test_formats_cameras_do_not_write_never_reach_their_decoder(fmt: str) -> None:
    """Images PIL itself reads, in formats outside IMAGE_FORMATS: refused from the header,
    with the accepted formats named (EPS would otherwise run Ghostscript, where installed)."""
    image = _noise_image(32, 24)
    if fmt == "PSD":  # PIL reads PSD but cannot write it: a minimal 1-channel header
        data = b"8BPS\x00\x01" + b"\x00" * 6 + struct.pack(">HIIHH", 1, 24, 32, 8, 1)
        data += b"\x00" * 12 + struct.pack(">H", 0) + b"\x00" * (24 * 32)
    elif fmt == "EPS":
        data = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 24\nshowpage\n"
    else:
        data = _encode(image, fmt)
    with pytest.raises(ImageError) as info:
        decode_image(data)
    assert info.value.reason == "undecodable_image"
    assert "JPEG, PNG, WEBP, TIFF, BMP, GIF" in str(info.value)


def test_an_mpo_jpeg_is_read_as_its_first_picture() -> None:
    """Some cameras write MPO (several JPEGs in one file): PIL opens it as MPO, not JPEG."""
    frames = [_noise_image(40, 30, seed=k) for k in range(2)]
    buf = io.BytesIO()
    frames[0].save(buf, format="MPO", save_all=True, append_images=frames[1:])
    image = decode_image(buf.getvalue())
    assert image.size == (40, 30) and image.mode == "RGB"


def test_corrupt_png_chunk_is_undecodable() -> None:
    data = bytearray(_encode(_noise_image(16, 16), "PNG"))
    data[40:60] = b"\x00" * 20  # inside the IDAT: breaks its CRC and its zlib stream
    assert _reason(bytes(data)) == "undecodable_image"


def test_decompression_bomb_header_is_refused() -> None:
    # Far beyond PIL's own limit: PIL raises DecompressionBombError while opening.
    assert _reason(_png_with_declared_size(50_000, 50_000)) == "image_too_large"


def test_size_limit_is_checked_before_pixels_are_decoded() -> None:
    # 48 Mpx is under PIL's limit but over ours; its pixel data is missing, so a load()
    # would have said undecodable_image instead.
    assert _reason(_png_with_declared_size(8000, 6000)) == "image_too_large"
    small = _encode(_noise_image(64, 64), "PNG")
    assert _reason(small, max_pixels=64 * 64 - 1) == "image_too_large"
    assert decode_image(small, max_pixels=64 * 64).size == (64, 64)


def test_crop_whole_image_and_box() -> None:
    image = _noise_image(100, 80)
    assert crop(image, None).size == (100, 80)
    part = crop(image, [10, 20, 30.4, 60])
    assert part.size == (20, 40)
    assert part.getpixel((0, 0)) == image.getpixel((10, 20))


def test_crop_allows_half_pixel_tolerance() -> None:
    image = _noise_image(100, 80)
    assert crop(image, [-0.4, -0.5, 100.4, 80.5]).size == (100, 80)


@pytest.mark.parametrize(
    "bbox", [[-0.6, 0, 10, 10], [0, -3, 10, 10], [0, 0, 100.6, 10], [90, 70, 120, 90]]
)
def test_bbox_outside_image(bbox: list[float]) -> None:
    with pytest.raises(ImageError) as info:
        crop(_noise_image(100, 80), bbox)
    assert info.value.reason == "bbox_outside_image"


@pytest.mark.parametrize(
    "bbox",
    [
        [10, 10, 10, 20],  # zero width
        [10, 20, 30, 20],  # zero height
        [30, 10, 10, 20],  # inverted
        [10, 10, 10.2, 20],  # positive width that is less than one pixel
        [0, 0, math.nan, 10],
        [0, 0, math.inf, 10],
        [0, 0, 10],
        [0, 0, 10, 10, 10],
        ["a", 0, 10, 10],
        "0,0,1,1",
    ],
)
def test_bbox_invalid(bbox: object) -> None:
    with pytest.raises(ImageError) as info:
        crop(_noise_image(100, 80), bbox)  # type: ignore[arg-type]
    assert info.value.reason == "bbox_invalid"


def test_to_uint8_shape_and_colour() -> None:
    pre = Preprocess(input_size=(32, 48))
    out = pre.to_uint8(Image.new("RGB", (300, 100), (12, 200, 99)))
    assert out.dtype == torch.uint8
    assert out.shape == (3, 32, 48)
    assert out[:, 5, 7].tolist() == [12, 200, 99]


def test_to_uint8_antialiases_when_shrinking() -> None:
    # A one-pixel checkerboard shrunk 4x: an antialiased filter averages it to grey, while
    # point sampling would return pure black or white.
    board = (np.indices((256, 256)).sum(axis=0) % 2 * 255).astype(np.uint8)
    out = Preprocess(input_size=(64, 64)).to_uint8(Image.fromarray(board).convert("RGB"))
    assert int(out.min()) >= 100
    assert int(out.max()) <= 155


def test_to_uint8_is_thread_safe() -> None:
    pre = Preprocess(input_size=(64, 64))
    images = [_noise_image(200 + 7 * i, 150 + 3 * i, seed=i) for i in range(12)]
    expected = [pre.to_uint8(im) for im in images]
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(pre.to_uint8, images))
    for a, b in zip(expected, got, strict=True):
        assert torch.equal(a, b)


def test_normalise_values() -> None:
    pre = Preprocess(mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    batch = torch.full((2, 3, 4, 5), 255, dtype=torch.uint8)
    batch[1] = 0
    out = pre.normalise(batch)
    assert out.dtype == torch.float32
    assert out.device == batch.device
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([1.0, 3.0, 1.0]), atol=1e-6)
    assert torch.allclose(out[1, :, 0, 0], torch.tensor([-1.0, -1.0, 0.0]), atol=1e-6)


def test_normalise_rejects_non_uint8() -> None:
    with pytest.raises(ValueError):
        Preprocess().normalise(torch.zeros((1, 3, 4, 4)))
    with pytest.raises(ValueError):
        Preprocess().normalise(torch.zeros((3, 4, 4), dtype=torch.uint8))


def test_preprocess_dict_round_trip() -> None:
    pre = Preprocess(input_size=(256, 128), mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6))
    assert Preprocess.from_dict(pre.to_dict()) == pre
    assert Preprocess.from_dict({}) == Preprocess()
    with pytest.raises(ValueError):
        Preprocess.from_dict({"input_size": [224, 224], "colour": "rgb"})
