"""Machinery of the fault tests: one scenario's topics, group, database and workers, its
faults, and its bounded waits; the stream is in ``stream.py``, the processes in
``workers.py``, the end-of-run checks in ``checks.py``.

Every wait has a timeout and fails with the workers' log tails; every worker is killed and
every stopped or frozen service started or resumed when the run closes, whatever happened.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka import Consumer, Producer, TopicPartition

from sinks.migrate import migrate
from streams.tools.stack import EmbeddedStack
from streams.topics import ensure_topics
from tests.conftest import stream_environment
from tests.faults.checks import Verdict, verify
from tests.faults.stream import PARTITIONS, Sighting, Stream
from tests.faults.workers import SHUTDOWN_TIMEOUT_S, FaultTestError, Feeder, Worker, wait_for
from tests.integration.running import hung

# What every consumer process of a fault test runs with (besides addresses and names).
WORKER_SETTINGS = {
    "REID_INPUT_SIZE": "64",  # ~125 images/s on 2 cores instead of ~10 at 224 px
    "REID_BATCH_MAX_SIZE": "32",
    "REID_BATCH_MAX_WAIT_MS": "100",
    "REID_SESSION_TIMEOUT_MS": "6000",
    "REID_TOPIC_PARTITIONS": str(PARTITIONS),
    "REID_THRESHOLD": "0.95",
    "REID_SHUTDOWN_TIMEOUT_S": str(int(SHUTDOWN_TIMEOUT_S)),
    "REID_LOG_LEVEL": "INFO",
}


class FaultRun:
    """One scenario: its topics, group, database, cache prefix, workers and checks."""

    def __init__(
        self, stack: EmbeddedStack, database_url: str, unique: str, tmp_path: Path,
        *, bootstrap: str | None = None,
    ) -> None:  # fmt: skip
        """``bootstrap``: another broker than the stack's (``tests.faults.broker``)."""
        assert stack.info is not None
        self.stack = stack
        self.database_url = database_url
        self.tmp_path = tmp_path
        self.bootstrap = bootstrap or stack.info.kafka_bootstrap
        self.redis_url = stack.info.redis_url
        self.topic = f"detections-{unique}"
        self.topic_assignments = f"assignments-{unique}"
        self.topic_dead_letters = f"detections.dlq-{unique}"
        self.group = f"reid-faults-{unique}"
        self.cache_prefix = f"reid-faults-{unique}"
        self.env = stream_environment(
            stack, database_url, unique, **WORKER_SETTINGS, REID_GROUP_ID=self.group,
            REID_CACHE_KEY_PREFIX=self.cache_prefix, REID_KAFKA_BOOTSTRAP_SERVERS=self.bootstrap,
        )  # fmt: skip
        self.workers: list[Worker] = []
        self.feeders: list[Feeder] = []
        self.stream: Stream | None = None
        self.stopped_services: set[str] = set()
        self.frozen: dict[str, list[int]] = {}
        self.t0 = time.monotonic()
        self.verdict: Verdict | None = None
        self.key: str | None = None  # the row in RELIABILITY.md, set by describe()
        self.title = ""
        self.notes: list[str] = []
        self.timeline: list[str] = []
        migrate(database_url)
        ensure_topics(
            {"bootstrap.servers": self.bootstrap},
            [self.topic, self.topic_assignments, self.topic_dead_letters],
            PARTITIONS,
        )

    # -- the report -----------------------------------------------------------------------
    def describe(self, key: str, title: str) -> FaultRun:
        """Name the scenario: ``key`` selects its test (``-k key``), ``title`` is its row."""
        self.key, self.title = key, title
        return self

    def note(self, text: str) -> None:
        self.notes.append(text)

    def row(self) -> dict[str, Any]:
        """The scenario's row; when the test stopped before its checks, they run now (every
        worker is gone by then) so that the row shows what happened."""
        verdict = self.verdict
        if verdict is None and self.stream is not None:
            try:
                verdict = self.verify(read_timeout=5.0)
            except Exception as err:
                self.note(f"not verified: {type(err).__name__}: {str(err)[:200]}")
        figures = verdict.figures if verdict is not None else {}
        notes = list(self.notes)
        if verdict is not None and verdict.problems:
            notes.append("problems: " + "; ".join(p[:200] for p in verdict.problems))
        return {
            "scenario": self.title,
            "sent": figures.get("sent", len(self.stream.sightings) if self.stream else None),
            "stored": figures.get("stored"),
            "lost": figures.get("lost"),
            "duplicated_rows": figures.get("duplicated_rows"),
            "duplicate_deer": figures.get("duplicate_deer"),
            "dead_lettered": figures.get("dead_lettered"),
            "notes": "; ".join(notes),
            "details": figures,
        }

    # -- input ----------------------------------------------------------------------------
    def produce(self, stream: Stream, sightings: list[Sighting] | None = None) -> Stream:
        """Publish ``sightings`` (default: the whole stream) at once, key = camera_id."""
        self.stream = stream
        self._send(stream, stream.sightings if sightings is None else sightings)
        if sightings is None:
            self.check_produced()
        return stream

    def feed(self, stream: Stream, sightings: list[Sighting], rate: float) -> Feeder:
        """Publish ``sightings`` in the background at ``rate`` events/s until ``stop()``."""
        self.stream = stream
        feeder = Feeder(lambda items, stop: self._send(stream, items, rate=rate, stop=stop),
                        sightings)  # fmt: skip
        self.feeders.append(feeder)
        return feeder

    def check_produced(self) -> None:
        """Every event of the stream (poison pills included) has its delivery report."""
        assert self.stream is not None
        ids = {s.detection_id for s in [*self.stream.sightings, *self.stream.pills]}
        missing = len(ids - set(self.stream.partition_of))
        if missing:
            raise FaultTestError(f"{missing} events of the stream were not produced")

    def _send(
        self,
        stream: Stream,
        sightings: list[Sighting],
        *,
        rate: float | None = None,
        stop: threading.Event | None = None,
    ) -> int:
        """Produce and wait for the delivery reports, which give the end offsets (the tansu
        broker's high watermark is wrong, so it is never used); returns how many were sent."""
        producer = Producer(
            {"bootstrap.servers": self.bootstrap, "enable.idempotence": True, "linger.ms": 5}
        )
        errors: list[str] = []

        def delivered(detection_id: str, err, msg) -> None:
            if err is not None:
                errors.append(f"{detection_id}: {err}")
                return
            stream.partition_of[detection_id] = msg.partition()
            stream.ends[msg.partition()] = max(stream.ends.get(msg.partition(), 0),
                                               msg.offset() + 1)  # fmt: skip

        waiter = stop or threading.Event()
        sent = 0
        for s in sightings:
            if stop is not None and stop.is_set():
                break
            producer.produce(
                self.topic, s.value, key=s.camera_id,
                on_delivery=lambda err, msg, d=s.detection_id: delivered(d, err, msg),
            )  # fmt: skip
            sent += 1
            producer.poll(0)
            if rate is not None:
                waiter.wait(1.0 / rate)
        left = producer.flush(60)
        if errors or left:
            raise FaultTestError(f"producing failed: {left} unconfirmed, errors {errors[:3]}")
        return sent

    # -- workers --------------------------------------------------------------------------
    def start_worker(
        self, name: str, *, env: dict[str, str] | None = None, module: str = "streams.cli",
        args: tuple[str, ...] = ("run",),
    ) -> Worker:  # fmt: skip
        worker = Worker(name, {**self.env, **(env or {})}, self.tmp_path, module=module,
                        args=args)  # fmt: skip
        self.workers.append(worker)
        self.mark(f"{name} started")
        return worker

    def running(self) -> list[Worker]:
        return [w for w in self.workers if w.alive()]

    def logs(self, lines: int = 25) -> str:
        return "\n".join(w.tail(lines) for w in self.workers)

    def diagnostics(self) -> str:
        try:
            rows = self.rows()
        except psycopg.Error as err:
            rows = f"unknown ({err.__class__.__name__})"
        total = len(self.stream.sightings) if self.stream else "?"
        return f"rows={rows} of {total}, committed={self._committed_or_error()}\n{self.logs()}"

    def _committed_or_error(self) -> Any:
        try:
            return self.committed()
        except Exception as err:
            return f"unknown ({err})"

    # -- faults ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def service_down(self, name: str, *, hard: bool = False) -> Iterator[None]:
        """Stop a stack service for the body of the ``with``; it is started again on exit
        (and, whatever happens, when the run closes)."""
        self.stopped_services.add(name)
        self.stack.stop(name, hard=hard)
        self.mark(f"{name} stopped")
        try:
            yield
        finally:
            self.stack.start(name)
            self.stopped_services.discard(name)
            self.mark(f"{name} started")

    @contextlib.contextmanager
    def service_frozen(self, name: str) -> Iterator[list[int]]:
        """SIGSTOP a stack service, every process of it (PostgreSQL: the postmaster and each
        backend), for the body of the ``with``: it hangs, keeping its data and connections.
        SIGCONT on exit and, whatever happens, when the run closes. Yields the pids."""
        assert self.stack.info is not None
        try:
            with hung(self.stack.info.pids[name]) as pids:
                self.frozen[name] = pids
                # No row count while frozen: a query to a frozen PostgreSQL would hang too.
                self.mark(f"{name} frozen ({len(pids)} processes)", rows=name != "postgres")
                yield pids
        finally:
            self.frozen.pop(name, None)
            self.mark(f"{name} resumed")

    # -- progress -------------------------------------------------------------------------
    def rows(self) -> int:
        with psycopg.connect(self.database_url, connect_timeout=5) as conn:
            return int(conn.execute("SELECT count(*) FROM detections").fetchone()[0])

    def wait_rows(self, at_least: int, timeout: float = 120.0, *, interval: float = 0.25) -> int:
        """Until the test database holds at least ``at_least`` detections; returns the count.

        A small ``interval`` returns within milliseconds of the batch commit that crossed the
        mark: the worker is then publishing and committing offsets, or starting the next batch.
        """
        with psycopg.connect(self.database_url, autocommit=True, connect_timeout=5) as conn:

            def count() -> int:
                return int(conn.execute("SELECT count(*) FROM detections").fetchone()[0])

            return wait_for(lambda: (n := count()) >= at_least and n, timeout,
                            f"{at_least} rows in detections", self.diagnostics,
                            alive=self.running(), interval=interval)  # fmt: skip

    def committed(self, group: str | None = None) -> dict[int, int]:
        """The committed offset of every partition, of the run's group or ``group``."""
        assert self.stream is not None
        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": group or self.group})
        try:
            parts = [TopicPartition(self.topic, p) for p in sorted(self.stream.ends)]
            return {tp.partition: tp.offset for tp in consumer.committed(parts, timeout=10)}
        finally:
            consumer.close()

    def wait_done(self, timeout: float = 150.0, stall: float = 30.0) -> None:
        """Until every event is stored and the group's committed offsets reached the end of
        every partition. Fails early when every event is stored but the committed offsets
        stay short of the end for ``stall`` seconds (nothing is left to move them)."""
        assert self.stream is not None
        ends = self.stream.ends
        events = len(self.stream.sightings)
        last: dict[str, Any] = {"committed": None, "since": time.monotonic()}

        def done() -> bool:
            rows, committed = self.rows(), self.committed()
            if rows >= events and committed == ends:
                return True
            if committed != last["committed"] or rows < events:
                last.update(committed=committed, since=time.monotonic())
            elif time.monotonic() - last["since"] > stall:
                behind = {p: (committed.get(p), end) for p, end in ends.items()
                          if committed.get(p) != end}  # fmt: skip
                raise FaultTestError(
                    f"every event is stored but the committed offsets of partitions "
                    f"{behind} (committed, end) did not move for {stall:.0f}s\n"
                    f"{self.diagnostics()}"
                )
            return False

        wait_for(done, timeout, f"{events} rows and committed offsets {ends}",
                 self.diagnostics, alive=self.running(), interval=0.5)  # fmt: skip
        self.mark("all stored and committed")

    def mark(self, event: str, *, rows: bool = True) -> None:
        """Note when something happened (seconds since the run began) and at how many rows."""
        count: Any = "?"
        with contextlib.suppress(psycopg.Error):
            count = self.rows() if rows else "?"
        self.timeline.append(f"{event} @{time.monotonic() - self.t0:.1f}s/{count} rows")

    def terminate(self, worker: Worker, timeout: float = SHUTDOWN_TIMEOUT_S + 10) -> float:
        """SIGTERM a worker and require a clean exit (code 0); returns the seconds it took."""
        rc, seconds = worker.terminate(timeout)
        self.mark(f"{worker.name} SIGTERM: exit {rc} after {seconds:.1f}s")
        if rc is None:
            worker.kill_quietly()
            raise FaultTestError(
                f"worker {worker.name} still running {timeout:.0f}s after SIGTERM\n{worker.tail()}"
            )
        if rc != 0:
            raise FaultTestError(f"worker {worker.name} exited {rc} after SIGTERM\n{worker.tail()}")
        return seconds

    def close(self) -> None:
        """Kill every worker still running, resume frozen services and start stopped ones;
        never raises."""
        for feeder in self.feeders:
            with contextlib.suppress(Exception):
                feeder.stop()
        for worker in self.workers:
            worker.kill_quietly()
        for pids in self.frozen.values():
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
        self.frozen.clear()
        for name in sorted(self.stopped_services):
            with contextlib.suppress(Exception):
                self.stack.start(name)
        self.stopped_services.clear()

    def verify(self, *, read_timeout: float = 60.0) -> Verdict:
        """The end-of-run checks (``tests.faults.checks.verify``); call once every worker has
        exited (the output is then complete)."""
        self.verdict = verify(self, read_timeout=read_timeout)
        return self.verdict

    def finish(self) -> Verdict:
        """SIGTERM every worker still running (each must exit 0), then verify."""
        workers = self.running()
        for worker in workers:
            worker.send_term()
        for worker in workers:
            self.terminate(worker)
        self.mark("all workers stopped")
        return self.verify()
