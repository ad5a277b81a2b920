"""The fault tests' input: a fixed stream of animal sightings, and poison pills.

``ANIMALS`` synthetic animals, each a distinct 64x64 JPEG of seeded noise, seen ``SIGHTINGS``
times with the *identical* image bytes (other detection_id, camera and time), shuffled with a
fixed seed. Identical bytes embed identically (ensemble score 1.0) and different noise images
score at most 0.46 with the seeded model, so with ``REID_THRESHOLD=0.95`` the right answer is
known: exactly one deer per animal. The animal of each detection is kept here
(``Stream.animal_of``), never in the events.
"""

from __future__ import annotations

import io
import json
import random
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import numpy as np
from PIL import Image

from streams.events import rfc3339
from streams.tools.produce import detection_event

ANIMALS = 100
SIGHTINGS = 10
EVENTS = ANIMALS * SIGHTINGS  # N = 1000
CAMERAS = 16
PARTITIONS = 4
SEED = 20261102
PILL_ANIMAL = -1  # the "animal" of a poison pill: no deer may ever hold one


def animal_image(animal: int) -> bytes:
    """A 64x64 JPEG of seeded RGB noise, different for every animal."""
    rng = np.random.default_rng([SEED, animal])
    pixels = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


@dataclass(frozen=True)
class Sighting:
    detection_id: str
    animal: int
    camera_id: str
    value: bytes


@dataclass
class Stream:
    sightings: list[Sighting]
    # Events that must be dead-lettered, never stored (``poison_pills()``): not sightings.
    pills: list[Sighting] = field(default_factory=list)
    # Filled by produce(): the end offset of every partition and where each event went.
    ends: dict[int, int] = field(default_factory=dict)
    partition_of: dict[str, int] = field(default_factory=dict)

    @property
    def animal_of(self) -> dict[str, int]:
        return {s.detection_id: s.animal for s in self.sightings}

    @property
    def ids(self) -> set[str]:
        return {s.detection_id for s in self.sightings}

    def animals_on_several_partitions(self) -> int:
        parts: dict[int, set[int]] = defaultdict(set)
        for s in self.sightings:
            parts[s.animal].add(self.partition_of[s.detection_id])
        return sum(1 for p in parts.values() if len(p) > 1)


def make_stream(animals: int = ANIMALS, sightings: int = SIGHTINGS) -> Stream:
    """Every animal seen ``sightings`` times with identical bytes, on ``sightings``
    consecutive cameras (so on several partitions), shuffled with a fixed seed."""
    order = [(a, k) for a in range(animals) for k in range(sightings)]
    random.Random(SEED).shuffle(order)
    images = {a: animal_image(a) for a in range(animals)}
    start = datetime(2026, 11, 2, 5, 0, tzinfo=UTC)
    out = []
    for i, (animal, k) in enumerate(order):
        camera = f"cam-{(animal + k) % CAMERAS:02d}"
        event = detection_event(images[animal], camera, detection_id=f"det-{i:04d}")
        event["captured_at"] = rfc3339(start + timedelta(seconds=7 * i))
        out.append(Sighting(event["detection_id"], animal, camera, json.dumps(event).encode()))
    return Stream(out)


def poison_pills() -> list[Sighting]:
    """Events that are valid JSON with every field present, but that crashed the consumer
    (issue 13, point 1): a NUL character in ``species`` (PostgreSQL text refuses it) and a
    401-digit integer in ``bbox`` (Python parses it; nothing after that accepts it). Their
    image is one no animal of the stream has."""
    image = animal_image(10_000)
    start = datetime(2026, 11, 2, 4, 0, tzinfo=UTC)
    pills = []
    for camera, name, change in (
        ("cam-03", "nul-species", {"species": "deer\u0000"}),
        ("cam-10", "huge-bbox", {"bbox": [0, 0, 10**400, 64]}),
    ):
        event = detection_event(image, camera, detection_id=f"pill-{name}")
        event["captured_at"] = rfc3339(start)
        event.update(change)
        pills.append(Sighting(event["detection_id"], PILL_ANIMAL, event["camera_id"],
                              json.dumps(event).encode()))  # fmt: skip
    return pills
