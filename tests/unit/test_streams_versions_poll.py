"""The version poll runs in the consumer's thread: while the database fails (or hangs, each
read then costing up to its deadline) it backs off instead of trying every poll_s."""

from __future__ import annotations

import time
from types import SimpleNamespace

from sinks.metrics import StreamMetrics
from sinks.pg import StoreUnavailable
from streams.settings import Settings
from streams.versions import POLL_BACKOFF_MAX_S, VersionSwitch


class _Registry:
    def __init__(self) -> None:
        self.reads = 0
        self.down = True

    def get(self, version: str) -> None:
        return None

    def active(self) -> None:
        self.reads += 1
        if self.down:
            raise StoreUnavailable("store: active_version failed: no answer within 5.0s")
        return None


def test_failed_polls_back_off_and_a_success_resets():
    registry = _Registry()
    store = SimpleNamespace(registry=registry)
    switch = VersionSwitch(Settings(), store, StreamMetrics(), "v1", poll_s=1.0)  # type: ignore[arg-type]
    gaps = []
    for _ in range(8):
        switch._next_poll = 0.0  # the poll is due
        before = time.monotonic()
        assert switch.poll() is None
        gaps.append(round(switch._next_poll - before, 1))
    assert registry.reads == 8
    assert gaps[0] >= 2.0 and gaps == sorted(gaps), gaps
    assert POLL_BACKOFF_MAX_S - 0.5 <= gaps[-1] <= POLL_BACKOFF_MAX_S + 0.5, gaps
    registry.down = False
    switch._next_poll = 0.0
    before = time.monotonic()
    switch.poll()
    assert switch._next_poll - before <= 1.5, "back to poll_s after a good read"
