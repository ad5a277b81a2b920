"""The replay section of the benchmark: re-embedding stored history end to end."""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import Producer

from reid.embedder import Embedder
from reid.matching import merge_centroid
from sinks.migrate import create_database, drop_database, migrate, sibling_url
from sinks.records import DetectionRow
from sinks.store import PgStore
from streams.replay import Replayer
from streams.settings import Settings
from streams.tools.produce import detection_event
from streams.tools.synthetic import synthetic_photos
from streams.topics import ensure_stream_topics
from streams.versions import build_embedder


def replay_rate(
    settings: Settings,
    *,
    events: int = 200,
    embedder: Embedder | None = None,
    weights_path: Path | None = None,
    reference: int = 6982,
) -> dict[str, Any]:
    """Replay rate on the servers the settings name (an embedded stack is fine): a scratch
    database and topic get ``events`` stored detections (synthetic photos, vectors of a
    throwaway version), which a replay then re-embeds end to end (Kafka, decode, model,
    Postgres, commits). Returns detections/s and the time extrapolated to ``reference``
    detections (the design's reference migration); the scratch database is dropped."""
    tag = uuid.uuid4().hex[:8]
    base = settings.database_url.get_secret_value()
    admin_url = sibling_url(base, "postgres")
    db_name = f"reid_replay_bench_{tag}"
    create_database(admin_url, db_name)
    db_url = sibling_url(base, db_name)
    s = settings.model_copy(
        update={
            "database_url": type(settings.database_url)(db_url),
            "topic_detections": f"replay-bench-{tag}",
            "group_id": f"replay-bench-{tag}",
            "cache_key_prefix": f"replay-bench-{tag}",
        }
    )
    try:
        migrate(db_url)
        ensure_stream_topics(s, [s.topic_detections], 1)
        photos = synthetic_photos(events, max(1, events // 4), seed=11)
        producer = Producer(s.producer_config())
        rows: list[DetectionRow] = []
        rng = np.random.default_rng(0)
        now = datetime.now(UTC)
        for i, (_label, jpeg) in enumerate(photos):
            event = detection_event(jpeg, f"cam-{i % 4}", detection_id=f"bench-{i}")
            value = json.dumps(event).encode()
            producer.produce(s.topic_detections, value, key=event["camera_id"])
            vec = rng.standard_normal((2, 512)).astype(np.float32)
            vec /= np.linalg.norm(vec, axis=1, keepdims=True)
            rows.append(DetectionRow(
                detection_id=event["detection_id"], camera_id=event["camera_id"],
                captured_at=now, deer_id=None, new_deer=i, is_new_deer=True, similarity=None,
                score_resnet=None, score_effnet=None, embedding_resnet=vec[0],
                embedding_effnet=vec[1], bbox=None, confidence=None, species=None,
                source_topic=s.topic_detections, source_partition=0, source_offset=i,
                processed_at=now, content_sha256=hashlib.sha256(value).digest(),
            ))  # fmt: skip
        producer.flush(30)
        store = PgStore(db_url)
        store.start()
        try:
            for start in range(0, len(rows), 64):
                chunk = rows[start : start + 64]
                for j, r in enumerate(chunk):
                    r.new_deer = j
                store.write_batch("bench-origin", len(chunk), chunk, merge_centroid)
        finally:
            store.stop()
        own = embedder is None
        emb = embedder if embedder is not None else build_embedder(s, weights_path=weights_path)
        emb.start()
        replayer = Replayer(
            s, emb, version=emb.embedding_version, weights_path=weights_path,
            idle_s=0.5, follow_live=False,
        )  # fmt: skip
        try:
            replayer.start()
            version, device = emb.embedding_version, emb.device
            stats = replayer.run(replayer.start_offsets(from_beginning=True), until_end=True)
        finally:
            replayer.stop()
            if own:
                emb.stop()
        stored = stats.results.get("stored", 0)
        rate = stored / stats.elapsed_s if stats.elapsed_s > 0 else 0.0
        return {
            "events": events,
            "stored": stored,
            "elapsed_s": round(stats.elapsed_s, 2),
            "detections_per_s": round(rate, 2),
            f"extrapolated_{reference}_s": round(reference / rate, 1) if rate > 0 else None,
            "embedding_version": version,
            "device": device,
            "batch_size": s.batch_max_size,
        }
    finally:
        drop_database(admin_url, db_name)
