"""The camera-ingest simulator: one detection event per photo, whole photo as the crop."""

from __future__ import annotations

import base64
import functools
import io
import itertools
import json
import logging
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from confluent_kafka import Producer

from streams.events import SCHEMA_VERSION, rfc3339
from streams.logs import progress_bar, with_kafka_logger

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
# Camera producers send crops; a simulator fed whole photos keeps events well under the
# broker's message size by re-encoding large files.
MAX_PHOTO_BYTES = 1_000_000
MAX_PHOTO_SIDE = 1280


@dataclass(frozen=True)
class Produced:
    detection_id: str
    partition: int
    offset: int


def find_images(folder: Path) -> list[Path]:
    paths = [p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES]
    return sorted(p for p in paths if p.is_file())


def photos_from(folder: Path, limit: int | None) -> Iterator[tuple[str, bytes]]:
    """(label, bytes) for each image, cycling through the folder again until ``limit``."""
    images = find_images(folder)
    if not images:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {folder}")
    cycle = itertools.cycle(images) if limit else iter(images)
    for path in itertools.islice(cycle, limit):
        yield str(path.relative_to(folder)), _shrunk(path.read_bytes())


def _shrunk(data: bytes) -> bytes:
    if len(data) <= MAX_PHOTO_BYTES:
        return data
    from reid.preprocess import open_image  # here: it imports torch, which the CLI loads lazily

    try:
        image = open_image(data)
        image.thumbnail((MAX_PHOTO_SIDE, MAX_PHOTO_SIDE))
        out = io.BytesIO()
        image.convert("RGB").save(out, format="JPEG", quality=90)
        return out.getvalue()
    except Exception:
        return data  # not an image PIL reads: let the stream dead-letter it


def detection_event(image: bytes, camera_id: str, *, detection_id: str | None = None) -> dict:
    return {
        "schema": SCHEMA_VERSION,
        "detection_id": detection_id or str(uuid.uuid4()),
        "camera_id": camera_id,
        "captured_at": rfc3339(datetime.now(UTC)),
        "image_b64": base64.b64encode(image).decode(),
        "species": "deer",
    }


def produce_events(
    producer_config: dict[str, Any],
    topic: str,
    photos: Iterable[tuple[str, bytes]],
    *,
    cameras: int = 4,
    progress: bool = False,
    total: int | None = None,
) -> list[Produced]:
    """Publish one event per photo (key = camera_id) and wait until the broker has them all;
    ``progress`` shows a bar of the acknowledged events (``total`` expected) on a terminal."""
    config = with_kafka_logger({**producer_config, "enable.idempotence": True, "linger.ms": 20})
    producer = Producer(config)
    bar = progress_bar("produce", total=total, enabled=progress)
    produced: list[Produced] = []
    failures: list[str] = []

    def delivered(detection_id: str, err, msg) -> None:
        if err is not None:
            failures.append(str(err))
        else:
            produced.append(Produced(detection_id, msg.partition(), msg.offset()))
            bar.update(1)

    for i, (_label, image) in enumerate(photos):
        camera = f"cam-{i % cameras + 1:02d}"
        event = detection_event(image, camera)
        value = json.dumps(event).encode()
        on_delivery = functools.partial(delivered, event["detection_id"])
        while True:
            try:
                producer.produce(topic, value, key=camera, on_delivery=on_delivery)
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
    remaining = producer.flush(60)
    bar.close()
    if failures or remaining:
        raise RuntimeError(
            f"{len(failures)} events failed and {remaining} unconfirmed: {failures[:1]}"
        )
    log.info("produce: %d events to %s", len(produced), topic)
    return produced
