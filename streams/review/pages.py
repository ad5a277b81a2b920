"""What each review page shows, read through ``sinks.curation_reads`` and rendered from the
Jinja templates shipped in ``templates/`` (autoescaped: detection and camera ids come from
camera producers)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any
from urllib.parse import quote

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from sinks import curation_reads
from sinks.records import Change
from sinks.store import PgStore
from streams.curation import change_event
from streams.settings import Settings

QUEUE_PAGE_SIZE = 20

_ENV = Environment(
    loader=PackageLoader("streams.review", "templates"),
    autoescape=select_autoescape(["html"]),
    undefined=StrictUndefined,
)
_ENV.filters["when"] = lambda t: (
    ""
    if t is None
    else (t.strftime("%Y-%m-%d %H:%M:%S UTC") if isinstance(t, datetime) else str(t))
)
_ENV.filters["score"] = lambda s: "–" if s is None else f"{float(s):.3f}"
_ENV.globals["thumb_url"] = lambda detection_id: "/thumb/" + quote(str(detection_id), safe="")


def render(template: str, **context: Any) -> bytes:
    return _ENV.get_template(template).render(**context).encode()


class Examples:
    """Example detections per deer (most recent, most typical), read once per page."""

    def __init__(self, store: PgStore, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self._seen: dict[int, dict[str, str | None]] = {}

    def of(self, deer_id: int) -> dict[str, str | None]:
        if deer_id not in self._seen:
            self._seen[deer_id] = curation_reads.examples(
                self.store, deer_id,
                w_resnet=self.settings.weight_resnet, w_effnet=self.settings.weight_effnet,
            )  # fmt: skip
        return self._seen[deer_id]


def queue(store: PgStore, settings: Settings, *, limit: int = QUEUE_PAGE_SIZE) -> dict[str, Any]:
    """The review queue: each flagged detection beside its candidate deer."""
    total, items = curation_reads.review_queue(store, limit=limit)
    examples = Examples(store, settings)
    # The threshold each decision was made against: its version's own, else REID_THRESHOLD.
    thresholds = {v.version: v.threshold for v in store.registry.versions()}
    shown = []
    for item in items:
        current = item["deer_id"]
        candidates, seen = [], set()
        for c in item["candidates"]:
            if c["deer_id"] in seen:  # two candidates merged into one deer since
                continue
            seen.add(c["deer_id"])
            candidates.append({**c, "current": c["deer_id"] == current,
                               "examples": examples.of(c["deer_id"])})  # fmt: skip
        if current not in seen:  # a new deer: the detection is its only sighting so far
            candidates.insert(0, {"deer_id": current, "scored_deer_id": current,
                                  "similarity": None, "score_resnet": None,
                                  "score_effnet": None, "current": True,
                                  "examples": examples.of(current)})  # fmt: skip
        shown.append(
            {
                "detection": item,
                "candidates": candidates,
                "move_targets": [c["deer_id"] for c in candidates if not c["current"]],
                "threshold": _or(thresholds.get(item["embedding_version"]), settings.threshold),
            }
        )
    return {"total": total, "items": shown}


def deer(store: PgStore, deer_id: int) -> dict[str, Any] | None:
    """A deer: its summary, its detections (for the split form) and its history."""
    shown = curation_reads.show(store, deer_id, recent=0)
    if shown is None:
        return None
    detections = curation_reads.detections_of(store, shown["deer_id"])
    changes = [change_event_doc(c) for c in curation_reads.history(store, shown["deer_id"])]
    return {"deer": shown, "detections": detections, "history": changes}


def change_event_doc(change: Change) -> dict[str, Any]:
    """A change as its deer.changes event says it (what the page lists)."""
    return json.loads(change_event(change))


def _or(value: float | None, default: float) -> float:
    return default if value is None else value
