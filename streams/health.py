"""Readiness: is the model loaded, and are the broker and Postgres reachable?

The dependency checks run in a background thread every ``interval_s`` and their results are
cached, so that probes (/readyz) stay cheap however often they come, and the
``reid_dependency_up`` gauges keep moving for the alerts even when nobody probes.
The checks use their own connections, never the ones the batch path holds: a probe must not
interleave with a batch's transaction or reconnect a connection under it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping

from sinks.http import redact
from sinks.metrics import StreamMetrics

log = logging.getLogger(__name__)

Check = Callable[[], None]  # raises when the dependency is not reachable


class HealthChecker:
    """Runs ``checks`` periodically; ``readiness()`` combines the cached results of the
    ``required`` ones with the live ``conditions`` (model loaded, consumer running)."""

    def __init__(
        self,
        metrics: StreamMetrics,
        checks: Mapping[str, Check],
        *,
        required: set[str],
        conditions: Mapping[str, Callable[[], str | None]] | None = None,
        interval_s: float = 5.0,
    ) -> None:
        self.metrics = metrics
        self.checks = dict(checks)
        self.required = required
        self.conditions = dict(conditions or {})
        self.interval_s = interval_s
        self._results: dict[str, str | None] = dict.fromkeys(self.checks, "not checked yet")
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="health", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def check_now(self) -> dict[str, str | None]:
        """Run every check once, record the results and the gauges; returns the results."""
        results: dict[str, str | None] = {}
        for name, check in self.checks.items():
            t0 = time.perf_counter()
            try:
                check()
                results[name] = None
            except Exception as err:
                results[name] = f"unreachable: {type(err).__name__}: {redact(str(err))}"[:300]
            self.metrics.dependency_up.labels(dependency=name).set(results[name] is None)
            log.debug("health: %s %s in %.3fs", name, results[name] or "ok",
                      time.perf_counter() - t0)  # fmt: skip
        with self._lock:
            before = self._results
            changed = {k: v for k, v in results.items() if (v is None) != (before[k] is None)}
            self._results = results
        for name, reason in changed.items():
            if reason is None:
                log.info("health: %s reachable again", name)
            else:
                log.warning("health: %s %s", name, reason)
        return results

    def readiness(self) -> dict[str, str | None]:
        """Check name -> None when it passed, else why not (cached dependency results)."""
        out: dict[str, str | None] = {}
        for name, condition in self.conditions.items():
            try:
                out[name] = condition()
            except Exception as err:
                out[name] = f"{type(err).__name__}: {redact(str(err))}"
        with self._lock:
            out.update({k: v for k, v in self._results.items() if k in self.required})
        return out

    def _loop(self) -> None:
        while True:
            try:
                self.check_now()
            except Exception:  # never let the checker die: readiness would freeze
                log.exception("health: check loop failed")
            if self._stop.wait(self.interval_s):
                return
