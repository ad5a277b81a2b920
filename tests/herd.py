"""A small herd written through the real batch write, for the curation tests and the review
page: a few animals with noisy sightings, some sightings ambiguous between two animals (so
the matcher flags them), real zebra thumbnails, matched by ``reid.matching.assign_batch``."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import numpy as np
from PIL import Image

from reid.matching import assign_batch, l2_normalise, merge_centroid
from sinks.records import DetectionRow
from sinks.store import PgStore
from streams.gallery import to_gallery
from streams.images import ThumbnailSpec, thumbnail_jpeg
from streams.rows import candidate_scores
from tests.conftest import zebra_images

DIM = 512
VERSION = "herd-v1"
THRESHOLD = 0.5
T0 = datetime(2026, 11, 2, 5, 30, tzinfo=UTC)


@dataclass
class Herd:
    animal_of: dict[str, int] = field(default_factory=dict)  # detection_id -> animal
    deer_of: dict[str, int] = field(default_factory=dict)  # detection_id -> deer as written
    flagged: list[str] = field(default_factory=list)


def thumbnails(animals: int, sightings: int) -> list[list[bytes]]:
    """Per animal, a thumbnail per sighting: one zebra's photos for each animal (cycled)."""
    photos = zebra_images(individuals=animals, per_individual=sightings)
    out: list[list[bytes]] = [[] for _ in range(animals)]
    for i, (_, path) in enumerate(photos):
        with Image.open(path) as image:
            thumb = thumbnail_jpeg(image.convert("RGB"), ThumbnailSpec(128, 16_384))
        assert thumb is not None
        out[i // sightings].append(thumb)
    return out


def seed_herd(
    store: PgStore,
    *,
    animals: int = 4,
    sightings: int = 4,
    ambiguous: int = 3,
    seed: int = 7,
    version: str = VERSION,
    prefix: str = "det",
    batch: int = 6,
) -> Herd:
    """Write ``animals`` x ``sightings`` detections (+ ``ambiguous`` halfway between two
    animals) in batches of ``batch``; returns what went where."""
    rng = np.random.default_rng(seed)
    base_r = l2_normalise(rng.standard_normal((animals, DIM)))
    base_e = l2_normalise(rng.standard_normal((animals, DIM)))
    photos = thumbnails(animals, sightings)
    plan: list[tuple[str, int, np.ndarray, np.ndarray, bytes]] = []
    for s in range(sightings):
        for a in range(animals):
            noise = 0.6 / np.sqrt(DIM)
            r = l2_normalise(base_r[a] + rng.normal(scale=noise, size=DIM))
            e = l2_normalise(base_e[a] + rng.normal(scale=noise, size=DIM))
            plan.append((f"{prefix}-{a}-{s}", a, r, e, photos[a][s]))
    for k in range(ambiguous):  # between animal k and k+1: scores close to both
        a, b = k % animals, (k + 1) % animals
        r = l2_normalise(base_r[a] * 1.05 + base_r[b])
        e = l2_normalise(base_e[a] * 1.05 + base_e[b])
        plan.append((f"{prefix}-amb-{k}", a, r, e, photos[a][k % sightings]))
    herd = Herd()
    for start in range(0, len(plan), batch):
        chunk = plan[start : start + batch]
        gallery = to_gallery(store.load_centroids(version), DIM)
        r = np.stack([c[2] for c in chunk])
        e = np.stack([c[3] for c in chunk])
        assigned = assign_batch(r, e, gallery, threshold=THRESHOLD, review_band=0.05,
                                review_margin=0.05)  # fmt: skip
        rows = []
        for i, ((detection_id, animal, vr, ve, thumb), m) in enumerate(zip(chunk, assigned.matches,
                                                                     strict=True)):  # fmt: skip
            herd.animal_of[detection_id] = animal
            n = start + i
            rows.append(
                DetectionRow(
                    detection_id=detection_id,
                    camera_id=f"cam-{n % 3}",
                    captured_at=T0 + timedelta(minutes=n),
                    deer_id=m.deer_id,
                    new_deer=m.new_deer if m.deer_id is None else None,
                    is_new_deer=m.is_new_deer,
                    similarity=m.similarity,
                    score_resnet=m.score_resnet,
                    score_effnet=m.score_effnet,
                    embedding_resnet=vr,
                    embedding_effnet=ve,
                    bbox=None,
                    confidence=0.9,
                    species="zebra",
                    source_topic="detections",
                    source_partition=0,
                    source_offset=n,
                    processed_at=T0 + timedelta(minutes=n, seconds=5),
                    needs_review=m.needs_review,
                    candidates=candidate_scores(m.candidates),
                    thumbnail=thumb,
                )
            )
        result = store.write_batch(version, len(assigned.new_deer), rows, merge_centroid,
                                   known_deer_ids=gallery.deer_ids.tolist())  # fmt: skip
        for saved in result.assignments:
            herd.deer_of[saved.detection_id] = saved.deer_id
            if saved.needs_review:
                herd.flagged.append(saved.detection_id)
    return herd


def curation_settings(stack, database_url: str, unique: str, **overrides):
    """Settings of a curation command or review page on the session's stack: its own
    deer.changes topic and cache prefix (named after ``unique``)."""
    from streams.settings import load_settings

    return load_settings(
        kafka_bootstrap_servers=stack.info.kafka_bootstrap,
        database_url=database_url,
        redis_url=stack.info.redis_url,
        topic_deer_changes=f"deer.changes-{unique}",
        cache_key_prefix=f"reid-{unique}",
        metrics_port=0,
        threshold=THRESHOLD,
        **overrides,
    )
