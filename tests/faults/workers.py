"""The fault tests' processes: real `reid-stream run` workers, a background producer, and
bounded waits that fail with the workers' log tails."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from streams.tools.stack import free_port
from tests.faults.stream import Sighting
from tests.integration.test_streams_end_to_end import scrape

REPO = Path(__file__).resolve().parents[2]
SHUTDOWN_TIMEOUT_S = 20.0


class FaultTestError(AssertionError):
    """A bounded wait ran out, or a worker did what the scenario did not expect."""


# -- a consumer process -------------------------------------------------------------------
class Worker:
    """One `python -m streams.cli run` process with its own log file and metrics port;
    ``module`` runs another entry point (``tests.faults.probe``), ``args`` another command
    (e.g. a following `replay`)."""

    def __init__(
        self, name: str, env: dict[str, str], log_dir: Path, *, module: str = "streams.cli",
        args: tuple[str, ...] = ("run",),
    ) -> None:  # fmt: skip
        self.name = name
        self.metrics_port = free_port()
        self.log_path = log_dir / f"worker-{name}.log"
        self.env = {**env, "REID_METRICS_PORT": str(self.metrics_port)}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", module, *args], env=self.env, cwd=REPO,
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        self.signalled: str | None = None
        self.term_sent = 0.0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 12) -> str:
        """The warnings and errors of the log (where faults show), then its last lines."""
        log = [line for line in self.log().splitlines() if "NO TRAINED WEIGHTS" not in line]
        notable = [line for line in log[:-lines] if " WARNING " in line or " ERROR " in line]
        if len(notable) > 30:
            notable = [*notable[:10], f"... {len(notable) - 20} more ...", *notable[-10:]]
        text = "\n".join([*notable, *log[-lines:]])
        head = f"--- worker {self.name} pid={self.pid} rc={self.returncode} ({self.log_path})"
        return f"{head}\n{text}"

    def metrics(self, timeout: float = 5.0) -> dict[str, float]:
        return scrape(self.metrics_port, timeout)

    def readyz(self, timeout: float = 2.0) -> int | None:
        """The /readyz status code, or None when it did not answer within ``timeout``."""
        url = f"http://127.0.0.1:{self.metrics_port}/readyz"
        try:
            return urllib.request.urlopen(url, timeout=timeout).status
        except urllib.error.HTTPError as err:
            return err.code
        except OSError:
            return None

    def kill9(self) -> None:
        self.signalled = "SIGKILL"
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def send_term(self) -> None:
        """SIGTERM, once (a second one would find the process shutting down)."""
        if self.signalled is None:
            self.signalled = "SIGTERM"
            self.term_sent = time.monotonic()
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)

    def terminate(self, timeout: float) -> tuple[int | None, float]:
        """SIGTERM, then wait up to ``timeout``; (exit code or None if still running, seconds)."""
        self.send_term()
        try:
            rc = self.proc.wait(timeout=max(0.0, self.term_sent + timeout - time.monotonic()))
        except subprocess.TimeoutExpired:
            rc = None
        return rc, time.monotonic() - self.term_sent

    def kill_quietly(self) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)


class Feeder:
    """A background producer; ``stop()`` returns how many events it sent (all confirmed)."""

    def __init__(self, send: Callable[[list[Sighting], threading.Event], int],
                 sightings: list[Sighting]) -> None:  # fmt: skip
        self._stop = threading.Event()
        self._result: int | BaseException = 0
        self._thread = threading.Thread(target=self._run, args=(send, sightings), daemon=True)
        self._thread.start()

    def _run(self, send: Callable[[list[Sighting], threading.Event], int],
             sightings: list[Sighting]) -> None:  # fmt: skip
        try:
            self._result = send(sightings, self._stop)
        except BaseException as err:
            self._result = err

    def stop(self, timeout: float = 70.0) -> int:
        self._stop.set()
        return self.join(timeout)

    def join(self, timeout: float = 70.0) -> int:
        """Waits until the feeder has sent what it was given (or was stopped)."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise FaultTestError("the feeder did not finish")
        if isinstance(self._result, BaseException):
            raise self._result
        return self._result


# -- waiting ------------------------------------------------------------------------------
def wait_for(
    predicate: Callable[[], Any],
    timeout: float,
    what: str,
    diagnostics: Callable[[], str] = lambda: "",
    *,
    alive: list[Worker] | None = None,
    interval: float = 0.25,
) -> Any:
    """Poll ``predicate`` until it returns a truthy value; fail after ``timeout`` seconds, or
    at once when every worker in ``alive`` has exited."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if alive is not None and alive and not any(w.alive() for w in alive):
            raise FaultTestError(f"every worker exited while waiting for {what}\n{diagnostics()}")
        if time.monotonic() > deadline:
            raise FaultTestError(f"timed out after {timeout:.0f}s waiting for {what}\n"
                                 f"{diagnostics()}")  # fmt: skip
        time.sleep(interval)
