"""Synthetic animal photos for the demo when no folder of real photos is given.

Each individual is a body with its own coat pattern (stripe angle, frequency, spots, colours);
each sighting of it moves, scales and re-lights that body on a fresh background, so a working
model can tell the individuals apart and an untrained one shows what it cannot do.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def _coat(rng: np.random.Generator, size: int = 160) -> Image.Image:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = rng.uniform(0, np.pi)
    freq = rng.uniform(4, 14)
    phase = rng.uniform(0, 2 * np.pi)
    wave = np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)) + phase)
    base = rng.uniform(60, 200, size=3)
    dark = rng.uniform(10, 80, size=3)
    mix = (wave > rng.uniform(-0.3, 0.3))[..., None]
    pixels = np.where(mix, base, dark)
    for _ in range(rng.integers(3, 9)):
        cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.03, 0.1)
        spot = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        pixels[spot] = rng.uniform(0, 255, size=3)
    return Image.fromarray(pixels.astype(np.uint8))


def sighting(coat: Image.Image, rng: np.random.Generator, size: int = 256) -> bytes:
    """One JPEG photo of the individual wearing ``coat``."""
    ground = rng.uniform(40, 160, size=3)
    noise = rng.normal(0, 12, size=(size, size, 3))
    background = Image.fromarray(np.clip(ground + noise, 0, 255).astype(np.uint8))
    scale = rng.uniform(0.6, 0.9)
    w, h = int(size * scale), int(size * scale * rng.uniform(0.55, 0.75))
    body = coat.resize((w, h)).rotate(rng.uniform(-10, 10), expand=False)
    mask = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask).ellipse((0, 0, w - 1, h - 1), fill=255)
    x, y = int(rng.uniform(0, size - w)), int(rng.uniform(0, size - h))
    background.paste(body, (x, y), mask.filter(ImageFilter.GaussianBlur(2)))
    gain = rng.uniform(0.8, 1.2)
    lit = np.clip(np.asarray(background, dtype=np.float32) * gain, 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(lit).save(out, format="JPEG", quality=88)
    return out.getvalue()


def synthetic_photos(events: int, individuals: int, seed: int = 7) -> list[tuple[str, bytes]]:
    """``events`` photos of ``individuals`` animals, as (label, JPEG bytes), seeded."""
    rng = np.random.default_rng(seed)
    coats = [_coat(rng) for _ in range(individuals)]
    photos = []
    for i in range(events):
        who = int(rng.integers(individuals)) if i >= individuals else i
        photos.append((f"animal-{who:03d}", sighting(coats[who], rng)))
    return photos
