"""Readiness: is the model loaded, and are the broker and Postgres reachable?

The dependency checks run in a background thread every ``interval_s`` and their results are
cached, so that probes (/readyz) stay cheap however often they come, and the
``reid_dependency_up`` gauges keep moving for the alerts even when nobody probes.
The checks use their own connections, never the ones the batch path holds: a probe must not
interleave with a batch's transaction or reconnect a connection under it. Each check runs in
a thread of its own and has ``timeout_s`` to answer: a server that hangs (rather than
refusing) fails its check after that long instead of freezing every result, and a check
still stuck from an earlier round is not started again (it keeps failing until it returns).
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
        timeout_s: float = 3.0,
    ) -> None:
        self.metrics = metrics
        self.checks = dict(checks)
        self.required = required
        self.conditions = dict(conditions or {})
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._running: dict[str, _Run] = {}  # the check in progress of each dependency
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
        t0 = time.monotonic()
        for name, check in self.checks.items():
            if name not in self._running:
                self._running[name] = _Run(name, check)
        for name in self.checks:
            run = self._running[name]
            if not run.done.wait(max(0.0, run.started + self.timeout_s - time.monotonic())):
                # Still running: not started again until it returns.
                since = f" (stuck for {t0 - run.started:.0f}s)" if run.started < t0 else ""
                results[name] = f"unreachable: no answer within {self.timeout_s:.1f}s{since}"
                continue
            del self._running[name]
            err = run.error
            results[name] = None if err is None else (
                f"unreachable: {type(err).__name__}: {redact(str(err))}"[:300])  # fmt: skip
        for name, reason in results.items():
            self.metrics.dependency_up.labels(dependency=name).set(reason is None)
        log.debug("health: %s in %.3fs", results, time.monotonic() - t0)
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


class _Run:
    """One run of a check, in a daemon thread of its own (a hung one must not hold the
    process at exit, as a pool's worker would)."""

    def __init__(self, name: str, check: Check) -> None:
        self.started = time.monotonic()
        self.done = threading.Event()
        self.error: BaseException | None = None
        self._check = check
        threading.Thread(target=self._run, name=f"health-{name}", daemon=True).start()

    def _run(self) -> None:
        try:
            self._check()
        except BaseException as err:  # reported as the check's result
            self.error = err
        finally:
            self.done.set()
