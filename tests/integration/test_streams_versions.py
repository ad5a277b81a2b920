"""The version poll keeps the batch processor's per-version thresholds current (registry on a
real PostgreSQL): set, changed and cleared while the version stays active, and the new
version's own with `activate --threshold`."""

from __future__ import annotations

import pytest

from sinks.metrics import StreamMetrics
from sinks.migrate import migrate
from sinks.registry import VersionSpec
from sinks.store import PgStore
from streams.settings import Settings
from streams.versions import VersionSwitch


def test_poll_follows_the_registry_threshold(database_url: str) -> None:
    migrate(database_url)
    store = PgStore(database_url)
    store.start()
    try:
        registry = store.registry
        registry.register(VersionSpec("it-thr-a", seed=0, input_size=64), activate_if_none=True)
        registry.register(VersionSpec("it-thr-b", seed=1, input_size=64))
        registry.set_threshold("it-thr-a", 0.72)
        settings = Settings(database_url=database_url)
        thresholds: dict[str, float] = {}
        switch = VersionSwitch(settings, store, StreamMetrics(), "it-thr-a", poll_s=0.0,
                               background=False, thresholds=thresholds)  # fmt: skip
        assert thresholds == {"it-thr-a": pytest.approx(0.72)}  # read at start
        registry.set_threshold("it-thr-a", 0.5)
        assert switch.poll() is None and thresholds == {"it-thr-a": 0.5}
        registry.set_threshold("it-thr-a", None)  # back to REID_THRESHOLD
        switch.poll()
        assert thresholds == {}
        info = registry.activate("it-thr-b", threshold=0.9)
        assert info.state == "active" and info.threshold == pytest.approx(0.9)
        assert [v.threshold for v in registry.versions()] == [None, pytest.approx(0.9)]
        with pytest.raises(ValueError, match="within"):
            registry.set_threshold("it-thr-b", 1.5)
        with pytest.raises(ValueError, match="not registered"):
            registry.set_threshold("nope", 0.5)
        # A consumer that starts on B (or switches to it) has B's before its first batch.
        started_on_b: dict[str, float] = {}
        VersionSwitch(settings, store, StreamMetrics(), "it-thr-b", thresholds=started_on_b)
        assert started_on_b == {"it-thr-b": pytest.approx(0.9)}
    finally:
        store.stop()
