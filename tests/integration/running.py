"""A `reid-stream` process whose output is read while it runs, its ops port, and hanging a
stack service (SIGSTOP of the process and every child: a PostgreSQL backend serves each
connection, so stopping the postmaster alone would hang only new connections)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path


class Running:
    """``python -m streams.cli ARGS`` with ``env``; stdout and stderr collected line by line."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.env = env
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streams.cli", *args], env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, what: str, predicate: Callable[[], object], timeout_s: float) -> float:
        """Seconds until ``predicate()`` is true; fails with the output's tail after the bound."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if predicate():
                return time.monotonic() - t0
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.1)
        raise AssertionError(
            f"{what}: not within {timeout_s:.0f}s (exit={self.proc.poll()})\n"
            + "\n".join(self.lines[-40:])
        )

    def count(self, text: str) -> int:
        return sum(text in line for line in self.lines)

    def get(self, path: str) -> tuple[int, dict | str] | None:
        """(status, body) of the ops port's ``path``; None when it does not answer."""
        url = f"http://127.0.0.1:{self.env['REID_METRICS_PORT']}{path}"
        try:
            with urllib.request.urlopen(url, timeout=3) as response:
                status, body = response.status, response.read()
        except urllib.error.HTTPError as err:
            status, body = err.code, err.read()
        except OSError:
            return None
        try:
            return status, json.loads(body)
        except ValueError:
            return status, body.decode(errors="replace")

    def ready(self) -> bool:
        got = self.get("/readyz")
        return got is not None and got[0] == 200

    def stop(self, timeout_s: float = 30.0) -> tuple[int, float]:
        """SIGTERM; (exit code, seconds it took)."""
        t0 = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5)
        return self.proc.returncode, time.monotonic() - t0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def running(env: dict[str, str], *args: str) -> Iterator[Running]:
    process = Running(env, *args)
    try:
        yield process
    finally:
        process.kill()


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    return tree


@contextlib.contextmanager
def hung(pid: int) -> Iterator[list[int]]:
    """SIGSTOP ``pid`` and its descendants for the body of the ``with``: the server keeps its
    sockets (its kernel still acknowledges TCP) but never answers; SIGCONT whatever happens."""
    stopped = process_tree(pid)
    for p in stopped:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGSTOP)
    try:
        yield stopped
    finally:
        for p in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGCONT)
