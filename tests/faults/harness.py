"""Machinery of the fault tests: a fixed stream of animal sightings, real `reid-stream run`
processes against the embedded stack, bounded waits, and the end-of-run checks.

The stream: ``ANIMALS`` synthetic animals, each a distinct 64x64 JPEG of seeded noise, seen
``SIGHTINGS`` times with the *identical* image bytes (other detection_id, camera and time),
shuffled with a fixed seed. Identical bytes embed identically (ensemble score 1.0) and
different noise images score at most 0.46 with the seeded model, so with ``REID_THRESHOLD=0.95``
the right answer is known: exactly one deer per animal. The animal of each detection is kept
here (``Stream.animal_of``), never in the events.

Every wait has a timeout and fails with the workers' log tails; every worker is killed and
every stopped stack service restarted when the run closes, whatever happened.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import redis
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from PIL import Image

from sinks.cache import CentroidCache
from sinks.migrate import migrate
from streams.events import rfc3339
from streams.tools.produce import detection_event
from streams.tools.stack import EmbeddedStack, free_port
from streams.topics import ensure_topics
from tests.conftest import stream_environment

REPO = Path(__file__).resolve().parents[2]

ANIMALS = 100
SIGHTINGS = 10
EVENTS = ANIMALS * SIGHTINGS  # N = 1000
CAMERAS = 16
PARTITIONS = 4
SEED = 20261102
SHUTDOWN_TIMEOUT_S = 20.0

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


class FaultTestError(AssertionError):
    """A bounded wait ran out, or a worker did what the scenario did not expect."""


# -- the stream ---------------------------------------------------------------------------
def animal_image(animal: int) -> bytes:
    """A 64x64 JPEG of seeded RGB noise, different for every animal."""
    rng = np.random.default_rng([SEED, animal])
    pixels = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


@dataclass(frozen=True)
class Sighting:
    detection_id: str
    animal: int
    camera_id: str
    value: bytes


@dataclass
class Stream:
    sightings: list[Sighting]
    # Filled by produce(): the end offset of every partition and where each event went.
    ends: dict[int, int] = field(default_factory=dict)
    partition_of: dict[str, int] = field(default_factory=dict)

    @property
    def animal_of(self) -> dict[str, int]:
        return {s.detection_id: s.animal for s in self.sightings}

    @property
    def ids(self) -> set[str]:
        return {s.detection_id for s in self.sightings}

    def animals_on_several_partitions(self) -> int:
        parts: dict[int, set[int]] = defaultdict(set)
        for s in self.sightings:
            parts[s.animal].add(self.partition_of[s.detection_id])
        return sum(1 for p in parts.values() if len(p) > 1)


def make_stream(animals: int = ANIMALS, sightings: int = SIGHTINGS) -> Stream:
    """Every animal seen ``sightings`` times with identical bytes, on ``sightings``
    consecutive cameras (so on several partitions), shuffled with a fixed seed."""
    order = [(a, k) for a in range(animals) for k in range(sightings)]
    random.Random(SEED).shuffle(order)
    images = {a: animal_image(a) for a in range(animals)}
    start = datetime(2026, 11, 2, 5, 0, tzinfo=UTC)
    out = []
    for i, (animal, k) in enumerate(order):
        camera = f"cam-{(animal + k) % CAMERAS:02d}"
        event = detection_event(images[animal], camera, detection_id=f"det-{i:04d}")
        event["captured_at"] = rfc3339(start + timedelta(seconds=7 * i))
        out.append(Sighting(event["detection_id"], animal, camera, json.dumps(event).encode()))
    return Stream(out)


# -- a consumer process -------------------------------------------------------------------
class Worker:
    """One `python -m streams.cli run` process with its own log file and metrics port."""

    def __init__(self, name: str, env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.metrics_port = free_port()
        self.log_path = log_dir / f"worker-{name}.log"
        self.env = {**env, "REID_METRICS_PORT": str(self.metrics_port)}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "streams.cli", "run"], env=self.env, cwd=REPO,
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
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=timeout).read().decode()
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples

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
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise FaultTestError("the feeder did not stop")
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


# -- the run ------------------------------------------------------------------------------
@dataclass
class Verdict:
    """The figures of one run and what was wrong with them (empty: every guarantee held)."""

    figures: dict[str, Any]
    problems: list[str]

    def check(self) -> None:
        if self.problems:
            raise FaultTestError(
                "delivery guarantees broken:\n  - " + "\n  - ".join(self.problems)
                + "\nfigures: " + json.dumps(self.figures, sort_keys=True)
            )  # fmt: skip


class FaultRun:
    """One scenario: its topics, group, database, cache prefix, workers and checks."""

    def __init__(self, stack: EmbeddedStack, database_url: str, unique: str, tmp_path: Path):
        assert stack.info is not None
        self.stack = stack
        self.database_url = database_url
        self.tmp_path = tmp_path
        self.bootstrap = stack.info.kafka_bootstrap
        self.redis_url = stack.info.redis_url
        self.topic = f"detections-{unique}"
        self.topic_assignments = f"assignments-{unique}"
        self.topic_dead_letters = f"detections.dlq-{unique}"
        self.group = f"reid-faults-{unique}"
        self.cache_prefix = f"reid-faults-{unique}"
        self.env = stream_environment(
            stack, database_url, unique, **WORKER_SETTINGS, REID_GROUP_ID=self.group,
            REID_CACHE_KEY_PREFIX=self.cache_prefix,
        )  # fmt: skip
        self.workers: list[Worker] = []
        self.feeders: list[Feeder] = []
        self.stream: Stream | None = None
        self.stopped_services: set[str] = set()
        self.frozen: dict[str, int] = {}
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
        """Every event of the stream has its delivery report."""
        assert self.stream is not None
        missing = len(self.stream.sightings) - len(self.stream.partition_of)
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
    def start_worker(self, name: str, *, env: dict[str, str] | None = None) -> Worker:
        worker = Worker(name, {**self.env, **(env or {})}, self.tmp_path)
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
        return f"rows={rows} of {EVENTS}, committed={self._committed_or_error()}\n{self.logs()}"

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
    def service_frozen(self, name: str) -> Iterator[None]:
        """SIGSTOP a stack service for the body of the ``with`` (it hangs, keeping its data
        and connections), SIGCONT on exit and, whatever happens, when the run closes."""
        assert self.stack.info is not None
        pid = self.stack.info.pids[name]
        self.frozen[name] = pid
        os.kill(pid, signal.SIGSTOP)
        self.mark(f"{name} frozen")
        try:
            yield
        finally:
            os.kill(pid, signal.SIGCONT)
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

    def committed(self) -> dict[int, int]:
        assert self.stream is not None
        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": self.group})
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
        last: dict[str, Any] = {"committed": None, "since": time.monotonic()}

        def done() -> bool:
            rows, committed = self.rows(), self.committed()
            if rows >= EVENTS and committed == ends:
                return True
            if committed != last["committed"] or rows < EVENTS:
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

        wait_for(done, timeout, f"{EVENTS} rows and committed offsets {ends}",
                 self.diagnostics, alive=self.running(), interval=0.5)  # fmt: skip
        self.mark("all stored and committed")

    def mark(self, event: str) -> None:
        """Note when something happened (seconds since the run began) and at how many rows."""
        try:
            rows: Any = self.rows()
        except psycopg.Error:
            rows = "?"
        self.timeline.append(f"{event} @{time.monotonic() - self.t0:.1f}s/{rows} rows")

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
        for pid in self.frozen.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self.frozen.clear()
        for name in sorted(self.stopped_services):
            with contextlib.suppress(Exception):
                self.stack.start(name)
        self.stopped_services.clear()

    # -- the checks -----------------------------------------------------------------------
    def verify(self, *, read_timeout: float = 60.0) -> Verdict:
        """Read the database, the output topics and the committed offsets, and say what held.

        Call once every worker has exited (the output is then complete)."""
        assert self.stream is not None
        stream = self.stream
        expected = stream.ids
        animal_of = stream.animal_of
        problems: list[str] = []
        unsent = len(stream.sightings) - len(stream.partition_of)
        if unsent:
            problems.append(f"{unsent} events of the stream were never produced (test error)")

        with psycopg.connect(self.database_url, connect_timeout=10) as conn:
            counts = dict(conn.execute(
                "SELECT detection_id, count(*) FROM detections GROUP BY detection_id"
            ).fetchall())  # fmt: skip
            stored_deer = dict(conn.execute("SELECT detection_id, deer_id FROM detections"))
            deer = dict(conn.execute("SELECT id, sightings FROM deer").fetchall())
            per_deer = dict(
                conn.execute("SELECT deer_id, count(*) FROM detections GROUP BY deer_id")
            )

        stored = expected & set(counts)
        lost = sorted(expected - set(counts))
        unexpected = sorted(set(counts) - expected)
        duplicated_rows = sum(n - 1 for n in counts.values() if n > 1)
        if lost:
            problems.append(f"{len(lost)} detections not stored, e.g. {lost[:5]}")
        if unexpected:
            problems.append(f"{len(unexpected)} stored detections never sent: {unexpected[:5]}")
        if duplicated_rows:
            problems.append(f"{duplicated_rows} duplicated detection rows")

        # One animal, one deer; one deer, one animal.
        deer_of_animal: dict[int, set[int]] = defaultdict(set)
        animals_of_deer: dict[int, set[int]] = defaultdict(set)
        for detection_id, deer_id in stored_deer.items():
            if detection_id in animal_of:
                deer_of_animal[animal_of[detection_id]].add(deer_id)
                animals_of_deer[deer_id].add(animal_of[detection_id])
        duplicate_deer = sum(len(d) - 1 for d in deer_of_animal.values())
        merged = {d: sorted(a) for d, a in animals_of_deer.items() if len(a) > 1}
        if duplicate_deer:
            split = {a: sorted(d) for a, d in deer_of_animal.items() if len(d) > 1}
            problems.append(
                f"{duplicate_deer} duplicate deer: {len(split)} animals got several deer, "
                f"e.g. {dict(list(split.items())[:5])}"
            )
        if merged:
            problems.append(
                f"{len(merged)} deer hold several animals (different images scored >= "
                "REID_THRESHOLD: the test's assumption failed), "
                f"e.g. {dict(list(merged.items())[:5])}"
            )
        animals = len({s.animal for s in stream.sightings})
        if len(deer) != animals:
            problems.append(f"{len(deer)} deer for {animals} animals")
        orphans = sorted(set(deer) - set(per_deer))
        if orphans:
            problems.append(f"{len(orphans)} deer without detections, e.g. {orphans[:5]}")

        # Sightings: in total and per deer.
        sightings_total = sum(deer.values())
        if sightings_total != len(stored_deer):
            problems.append(
                f"sum(deer.sightings)={sightings_total} != count(detections)={len(stored_deer)}"
            )
        wrong_counts = {d: (deer[d], per_deer.get(d, 0)) for d in deer
                        if deer[d] != per_deer.get(d, 0)}  # fmt: skip
        if wrong_counts:
            problems.append(
                f"{len(wrong_counts)} deer whose sightings differ from their detections "
                f"(sightings, detections): {dict(list(wrong_counts.items())[:5])}"
            )

        # The output topic: an event for every detection, repeats byte-identical and
        # agreeing with the stored row.
        events = read_all(
            self.bootstrap,
            self.topic_assignments,
            until=lambda msgs: expected <= {json.loads(v)["detection_id"] for _, v in msgs},
            timeout=read_timeout,
        )
        by_id: dict[str, list[bytes]] = defaultdict(list)
        wrong_key = 0
        for key, value in events:
            doc = json.loads(value)
            by_id[doc["detection_id"]].append(value)
            if key is None or key.decode() != doc["deer_id"]:
                wrong_key += 1
        missing_events = sorted(expected - set(by_id))
        differing = sorted(i for i, vs in by_id.items() if len(set(vs)) > 1)
        disagreeing = sorted(
            i for i, vs in by_id.items()
            if i in stored_deer and json.loads(vs[0])["deer_id"] != str(stored_deer[i])
        )  # fmt: skip
        if missing_events:
            problems.append(
                f"{len(missing_events)} detections without an assignment event, "
                f"e.g. {missing_events[:5]}"
            )
        if differing:
            problems.append(
                f"{len(differing)} detections with differing assignment events, "
                f"e.g. {differing[:3]}: {[by_id[i] for i in differing[:1]]}"
            )
        if disagreeing:
            problems.append(
                f"{len(disagreeing)} assignment events name another deer than the stored row, "
                f"e.g. {disagreeing[:5]}"
            )
        if wrong_key:
            problems.append(f"{wrong_key} assignment events whose key is not their deer_id")
        stray = sorted(set(by_id) - expected)
        if stray:
            problems.append(f"{len(stray)} assignment events for unknown detections: {stray[:5]}")

        dead = read_all(self.bootstrap, self.topic_dead_letters, until=lambda _: True, idle=1.0)
        if dead:
            problems.append(f"{len(dead)} dead letters for valid events")

        committed = self.committed()
        if committed != stream.ends:
            problems.append(f"committed offsets {committed} != end offsets {stream.ends}")

        figures = {
            "sent": len(stream.sightings),
            "stored": len(stored),
            "lost": len(lost),
            "duplicated_rows": duplicated_rows,
            "animals": animals,
            "deer": len(deer),
            "duplicate_deer": duplicate_deer,
            "merged_deer": len(merged),
            "sightings_total": sightings_total,
            "assignment_events": len(events),
            "repeated_events": len(events) - len(by_id),
            "missing_events": len(missing_events),
            "differing_events": len(differing),
            "dead_lettered": len(dead),
            "committed": {str(p): o for p, o in sorted(committed.items())},
            "ends": {str(p): o for p, o in sorted(stream.ends.items())},
            "seconds": round(time.monotonic() - self.t0, 1),
            "timeline": self.timeline,
        }
        self.verdict = Verdict(figures, problems)
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


def read_all(
    bootstrap: str,
    topic: str,
    *,
    until: Callable[[list], bool],
    idle: float = 2.0,
    timeout: float = 60.0,
) -> list[tuple[bytes | None, bytes]]:
    """(key, value) of every message of ``topic``, read from the start of each partition
    without joining a group (no join delay). Stops when nothing came for ``idle`` seconds and
    ``until(messages)`` holds, or when nothing came for ``idle`` seconds after ``timeout``."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "unused", "enable.auto.commit": False}
    )
    try:
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
        messages: list[tuple[bytes | None, bytes]] = []
        deadline = time.monotonic() + timeout
        last = time.monotonic()
        while True:
            batch = [m for m in consumer.consume(500, timeout=0.2) if m.error() is None]
            if batch:
                messages.extend((m.key(), m.value()) for m in batch)
                last = time.monotonic()
                continue
            quiet = time.monotonic() - last >= idle
            if quiet and (until(messages) or time.monotonic() > deadline):
                return messages
    finally:
        consumer.close()


def cache_state(redis_url: str, prefix: str, database_url: str) -> dict[str, Any]:
    """Compare the Redis centroid cache with the deer in Postgres."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT id, embedding_version, sightings FROM deer").fetchall()
    versions = {v for _, v, _ in rows}
    db = {int(i): int(n) for i, _, n in rows}
    cache = CentroidCache(redis_url, key_prefix=prefix)
    cache.start()
    try:
        cached: dict[int, int] = {}
        cold = []
        for version in versions:
            read = cache.get_all(version)
            if read is None:
                cold.append(version)
                continue
            cached.update({c.deer_id: c.sightings for c in read.centroids})
    finally:
        cache.stop()
    client = redis.Redis.from_url(redis_url)
    try:
        keys = sum(1 for _ in client.scan_iter(match=f"{prefix}:*:deer:*", count=1000))
    finally:
        client.close()
    stale = Counter("missing" if d not in cached else "stale" for d in db
                    if cached.get(d) != db[d])  # fmt: skip
    return {
        "deer_keys": keys,
        "deer_in_db": len(db),
        "cold_versions": cold,
        "missing": stale["missing"],
        "stale": stale["stale"],
    }
