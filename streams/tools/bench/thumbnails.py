"""The cost of the crop thumbnails (docs/curation.md): in the decode threads (decode, crop and
model input, with and without the JPEG thumbnail) and on the write path (``write_batch`` of a
batch's rows with and without their thumbnails), against the same PostgreSQL.

Batches with and without thumbnails alternate, so that drift on a shared machine hits both
alike; each write is a real transaction that updates existing deer (the steady state).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import numpy as np

from reid.matching import l2_normalise, merge_centroid
from reid.preprocess import Preprocess, crop, decode_image
from sinks.migrate import create_database, drop_database, migrate, sibling_url
from sinks.records import DetectionRow
from sinks.store import PgStore
from streams.images import ThumbnailSpec, thumbnail_jpeg

DIM = 512


def decode_times(photos: list[bytes], spec: ThumbnailSpec, rounds: int = 3) -> list[dict[str, Any]]:
    """Per crop: decode + crop + model input (224 px), and the same plus the thumbnail."""
    preprocess = Preprocess()
    off, on, sizes = [], [], []
    for _ in range(rounds):
        for data in photos:
            t0 = time.perf_counter()
            image = crop(decode_image(data), None)
            preprocess.to_uint8(image)
            t1 = time.perf_counter()
            thumb = thumbnail_jpeg(image, spec)
            t2 = time.perf_counter()
            off.append(t1 - t0)
            on.append(t2 - t0)
            sizes.append(len(thumb or b""))
    return [
        _row("decode+crop per image", "off", off, len(photos) * rounds),
        {**_row("decode+crop per image", "on", on, len(photos) * rounds),
         "thumbnail_bytes_mean": round(float(np.mean(sizes))),
         "thumbnail_bytes_max": int(np.max(sizes))},
    ]  # fmt: skip


def write_times(
    database_url: str, photos: list[bytes], spec: ThumbnailSpec, *, batches: int = 40,
    batch_size: int = 32, deer: int = 64,
) -> list[dict[str, Any]]:  # fmt: skip
    """``write_batch`` of ``batch_size`` rows onto existing deer, alternating batches with and
    without thumbnails; ms per batch for each. In a scratch database (dropped after): the
    bench's deer and version must not enter the stream's (whose active version alone may
    create deer)."""
    thumbs = [t for t in (thumbnail_jpeg(crop(decode_image(p), None), spec) for p in photos) if t]
    rng = np.random.default_rng(0)
    tag = uuid.uuid4().hex[:8]
    version = f"bench-thumbs-{tag}"
    admin_url = sibling_url(database_url, "postgres")
    scratch = f"reid_thumbs_bench_{tag}"
    create_database(admin_url, scratch)
    scratch_url = sibling_url(database_url, scratch)
    migrate(scratch_url)
    store = PgStore(scratch_url)
    store.start()
    try:
        made = store.write_batch(version, deer, [_row_of(rng, f"{version}-seed-{i}", None, i)
                                                 for i in range(deer)], merge_centroid)  # fmt: skip
        ids = made.new_deer_ids
        times: dict[str, list[float]] = {"off": [], "on": []}
        for b in range(2 * batches):
            mode = "on" if b % 2 else "off"
            rows = []
            for i in range(batch_size):
                row = _row_of(rng, f"{version}-{b}-{i}", int(rng.choice(ids)), None)
                rows.append(replace(row, thumbnail=thumbs[(b + i) % len(thumbs)])
                            if mode == "on" else row)  # fmt: skip
            t0 = time.perf_counter()
            store.write_batch(version, 0, rows, merge_centroid)
            times[mode].append(time.perf_counter() - t0)
    finally:
        store.stop()
        drop_database(admin_url, scratch)
    return [_row(f"write_batch of {batch_size} rows", m, times[m], batches) for m in ("off", "on")]


def _row(path: str, thumbnails: str, seconds: list[float], n: int) -> dict[str, Any]:
    ms = np.array(seconds) * 1000
    return {"path": path, "thumbnails": thumbnails, "n": n,
            "ms_median": round(float(np.median(ms)), 3),
            "ms_p95": round(float(np.percentile(ms, 95)), 3)}  # fmt: skip


def _row_of(rng: np.random.Generator, detection_id: str, deer_id: int | None,
            new_deer: int | None) -> DetectionRow:  # fmt: skip
    now = datetime.now(UTC)
    return DetectionRow(
        detection_id=detection_id, camera_id="cam-bench", captured_at=now, deer_id=deer_id,
        new_deer=new_deer, is_new_deer=new_deer is not None, similarity=0.6, score_resnet=0.6,
        score_effnet=0.6, embedding_resnet=l2_normalise(rng.standard_normal(DIM)),
        embedding_effnet=l2_normalise(rng.standard_normal(DIM)), bbox=None, confidence=0.9,
        species=None, source_topic="bench", source_partition=0, source_offset=0,
        processed_at=now,
    )  # fmt: skip


def thumbnails_section(report: Any, plan: Any, database_url: str, photos: list[bytes]) -> None:
    """Rows ``thumbnails``: decode stage and write path, without and with (plus the ratio)."""
    spec = ThumbnailSpec(128, 16_384)
    sample = photos[: max(8, min(len(photos), 64))]
    batches = max(4, plan.stream_events // 8)
    rows = decode_times(sample, spec) + write_times(
        database_url, sample, spec, batches=batches, batch_size=plan.stream_batch
    )
    for off, on in (rows[0:2], rows[2:4]):
        on["ratio_on_to_off"] = round(on["ms_median"] / off["ms_median"], 3)
        report.add("thumbnails", off)
        report.add("thumbnails", on)
