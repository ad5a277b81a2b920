"""`reid-stream validate --from OLD --to NEW`: compare two embedding versions on the history.

Reads the detections that have vectors of both versions from the store, compares them with
`reid.evaluation.version_compare` (what is measured and why is described there) under the
stream's weights and OLD's threshold (its own in the registry, else REID_THRESHOLD, or
--old-threshold), suggests NEW's threshold (and the `activate --threshold` command that sets
it), and writes
``validate.json`` (the numbers, histograms included) and ``validate.png`` (the two
distributions per version, with the thresholds) to ``--out``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from reid.evaluation.version_compare import compare, plot, table
from sinks.store import PgStore
from streams.settings import Settings

__all__ = ["table", "validate"]

log = logging.getLogger(__name__)


def validate(
    settings: Settings,
    old: str,
    new: str,
    out: Path,
    *,
    old_threshold: float | None = None,
    make_plot: bool = True,
) -> dict[str, Any]:
    """Read both versions' vectors, compare them, write validate.json (+ .png) to ``out``."""
    store = PgStore(settings.database_url.get_secret_value())
    store.start()
    try:
        pairs = store.history.paired_vectors(old, new)
        info = store.registry.get(old)
    finally:
        store.stop()
    if old_threshold is None:
        # OLD's own threshold when the registry has one: the one its consumers use.
        own = info.threshold if info is not None else None
        old_threshold = settings.threshold if own is None else float(own)
    if len(pairs["deer_ids"]) == 0:
        raise ValueError(f"no detection has vectors of both {old!r} and {new!r}; replay first")
    result = compare(
        pairs,
        w_resnet=settings.weight_resnet,
        w_effnet=settings.weight_effnet,
        old_threshold=old_threshold,
    )
    out.mkdir(parents=True, exist_ok=True)
    if make_plot:
        plot(result, old, new, out / "validate.png")
    public = {k: v for k, v in result.items() if not k.startswith("_")}
    public.update({"from": old, "to": new})
    public["activate"] = (
        f"reid-stream activate {new} --threshold {result['new']['suggested_threshold']:.3f}"
    )
    (out / "validate.json").write_text(json.dumps(public, indent=2, sort_keys=True) + "\n")
    return public
