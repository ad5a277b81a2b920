"""`reid-stream demo`: the whole stream on the embedded stack, from photos to a summary."""

from __future__ import annotations

import json
import logging
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from sinks.migrate import migrate
from streams.app import StreamApp
from streams.settings import load_settings
from streams.tools.produce import photos_from, produce_events
from streams.tools.stack import EmbeddedStack
from streams.tools.synthetic import synthetic_photos
from streams.topics import ensure_stream_topics, read_topic

log = logging.getLogger(__name__)

IDLE_TIMEOUT_S = 120.0


def run_demo(
    images: Path | None, events: int | None, state: Path | None = None, **overrides: Any
) -> dict[str, Any]:
    """Start the stack, produce, consume until every event is accounted for, stop everything."""
    state_dir = state or Path(tempfile.mkdtemp(prefix="reid-demo-"))
    stack = EmbeddedStack(state_dir)
    info = stack.up()
    try:
        settings = load_settings(**{**info.settings(), "metrics_port": 0, **overrides})
        migrate(settings.database_url.get_secret_value())
        ensure_stream_topics(
            settings,
            [settings.topic_detections, settings.topic_assignments, settings.topic_dead_letters],
        )
        if images is not None:
            photos = list(photos_from(images, events))
        else:
            count = events or 60
            photos = synthetic_photos(count, individuals=max(3, count // 8))
        produced = produce_events(settings.producer_config(), settings.topic_detections, photos)
        return _consume_and_count(settings, len(produced))
    finally:
        stack.down()


def _consume_and_count(settings: Any, expected: int) -> dict[str, Any]:
    app = StreamApp(settings)
    app.start()
    t0 = time.monotonic()
    seen = 0
    last_progress = [time.monotonic()]

    def on_batch(outcome: Any) -> None:
        nonlocal seen
        seen += outcome.messages
        last_progress[0] = time.monotonic()
        log.info("demo: %d/%d events handled", seen, expected)
        if seen >= expected:
            app.consumer.request_stop()

    def watchdog() -> None:
        while not stopped.wait(1.0):
            if time.monotonic() - last_progress[0] > IDLE_TIMEOUT_S:
                log.error("demo: no progress for %.0fs, stopping", IDLE_TIMEOUT_S)
                app.consumer.request_stop()
                return

    stopped = threading.Event()
    threading.Thread(target=watchdog, daemon=True).start()
    try:
        app.consumer.run(on_batch)
    finally:
        stopped.set()
        elapsed = time.monotonic() - t0
        version = app.embedder.embedding_version
        app.stop()

    kafka = settings.kafka_common()
    assignments = [json.loads(m.value()) for m in read_topic(
        kafka, settings.topic_assignments, expected=expected, timeout_s=20)]  # fmt: skip
    dead = read_topic(
        kafka, settings.topic_dead_letters, expected=expected - len(assignments), timeout_s=5
    )
    assigned_ids = {a["detection_id"] for a in assignments}
    new_ids = {a["detection_id"] for a in assignments if a["is_new_deer"]}
    return {
        "events": expected,
        "assigned_existing": len(assigned_ids - new_ids),
        "new_deer": len(new_ids),
        "dead_lettered": len(dead),
        "unaccounted": expected - len(assigned_ids) - len(dead),
        "deer": len({a["deer_id"] for a in assignments}),
        "embedding_version": version,
        "elapsed_s": round(elapsed, 2),
        "events_per_s": round(expected / elapsed, 2) if elapsed > 0 else None,
    }
