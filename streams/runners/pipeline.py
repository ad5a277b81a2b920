"""Overlap consecutive batches: while batch n is embedded, batch n+1 is parsed and decoded and
batch n-1 is written and published.

Three stage threads joined by queues run ``BatchProcessor.prepare``, ``embed`` and a
``finish`` callable (the processor's, wrapped by the runner in its retry policy). At most
``depth`` batches are in flight, which bounds memory and gives backpressure: the runner
submits a batch only when ``has_room()``. Batches leave in the order they entered, because
every stage is one thread taking its queue in order; the runner commits their offsets in
that order.

Abandonment: when ``finish`` gives up on a batch (returns None: the runner is stopping, or
the batch's partitions were revoked during an outage), the pipeline *halts*: every batch
behind it is abandoned too, without being written, so that no later offset of a partition
is committed past an unwritten one. The runner waits until the pipeline is empty, rewinds
the partitions it still owns (``rewind_offsets``) and calls ``resume()``.

The stages know nothing of Kafka: the runner owns the client and calls it from one thread.

``model_idle`` tells the runner's adaptive window (``streams.runners.window``) whether any
batch is still waiting for the model or in it: while one is, the window keeps gathering.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from streams.batch import BatchOutcome, PreparedBatch, SourceMessage
from streams.processor import BatchProcessor

log = logging.getLogger(__name__)


@dataclass
class Completed:
    """A batch that left the pipeline: written (``outcome``), abandoned, or failed."""

    messages: Sequence[SourceMessage]
    outcome: BatchOutcome | None  # None: not written, its offsets must not be committed
    error: BaseException | None = None  # an unexpected failure; the runner re-raises it


@dataclass(eq=False)
class _Job:
    messages: Sequence[SourceMessage]
    batch: PreparedBatch | None = None
    outcome: BatchOutcome | None = None
    abandoned: bool = False
    error: BaseException | None = None
    embedded: bool = False  # left the embed stage (embedded, skipped or failed)


_STOP = None


class Pipeline:
    """prepare -> embed -> finish, each in its own thread; see the module docstring."""

    def __init__(
        self,
        processor: BatchProcessor,
        finish: Callable[[PreparedBatch], BatchOutcome | None],
        *,
        depth: int,
    ) -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.processor = processor
        self.depth = depth
        self._finish = finish
        self._queues: list[queue.Queue[_Job | None]] = [queue.Queue() for _ in range(3)]
        self._done: deque[Completed] = deque()
        self._cond = threading.Condition()
        self._in_flight = 0
        self._before_model = 0  # batches submitted that have not left the embed stage
        self.submitted = 0  # batches handed in so far
        self.completed = 0  # batches that left (written, abandoned or failed), in order
        self._halted = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        stages = [
            ("prepare", self._queues[0], self._queues[1], self._prepare),
            ("embed", self._queues[1], self._queues[2], self._embed),
            ("finish", self._queues[2], None, self._finish_job),
        ]
        for name, inbox, outbox, work in stages:
            thread = threading.Thread(
                target=self._stage_loop, args=(inbox, outbox, work), name=f"stage-{name}",
                daemon=True,
            )  # fmt: skip
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 30.0) -> None:
        """Let the stage threads end (after what is queued) and wait for them."""
        self._queues[0].put(_STOP)
        for thread in self._threads:
            thread.join(timeout)
        self._threads = []

    # -- the runner's side ----------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        with self._cond:
            return self._in_flight

    @property
    def halted(self) -> bool:
        return self._halted.is_set()

    @property
    def model_idle(self) -> bool:
        """No batch is waiting for the model (being prepared, queued) or being embedded."""
        with self._cond:
            return self._before_model == 0

    def has_room(self) -> bool:
        with self._cond:
            return self._in_flight < self.depth and not self._halted.is_set()

    def submit(self, messages: Sequence[SourceMessage]) -> None:
        with self._cond:
            self._in_flight += 1
            self._before_model += 1
            self.submitted += 1
        self._queues[0].put(_Job(messages))

    def wait(self, timeout: float) -> None:
        """Until a batch completes or ``timeout`` passes."""
        with self._cond:
            if not self._done:
                self._cond.wait(timeout)

    def take_completed(self) -> list[Completed]:
        with self._cond:
            done = list(self._done)
            self._done.clear()
        return done

    def halt(self) -> None:
        self._halted.set()

    def resume(self) -> None:
        """After a halt, once the pipeline is empty and the runner has rewound its offsets."""
        assert self.in_flight == 0, "resume() only an empty pipeline"
        self._halted.clear()

    # -- the stages -----------------------------------------------------------------------
    def _stage_loop(
        self,
        inbox: queue.Queue[_Job | None],
        outbox: queue.Queue[_Job | None] | None,
        work: Callable[[_Job], None],
    ) -> None:
        while True:
            job = inbox.get()
            if job is _STOP:
                if outbox is not None:
                    outbox.put(_STOP)
                return
            if job.error is None and not job.abandoned:
                try:
                    work(job)
                except BaseException as err:  # handed to the runner, which re-raises it
                    log.exception("pipeline: batch failed in %s", threading.current_thread().name)
                    job.error = err
                    self._halted.set()
            if work == self._embed:  # every job passes here, skipped or not
                self._left_model(job)
            if outbox is not None:
                outbox.put(job)
            else:
                self._complete(job)

    def _prepare(self, job: _Job) -> None:
        if self._halted.is_set():
            job.abandoned = True
            return
        job.batch = self.processor.prepare(job.messages)

    def _embed(self, job: _Job) -> None:
        if self._halted.is_set():
            job.abandoned = True
            return
        assert job.batch is not None
        self.processor.embed(job.batch)

    def _finish_job(self, job: _Job) -> None:
        if self._halted.is_set():
            job.abandoned = True
            return
        assert job.batch is not None
        outcome = self._finish(job.batch)
        if outcome is None:
            job.abandoned = True
            self._halted.set()
        else:
            job.batch = None  # drop the vectors
            job.outcome = outcome

    def _left_model(self, job: _Job) -> None:
        with self._cond:
            if not job.embedded:
                job.embedded = True
                self._before_model -= 1

    def _complete(self, job: _Job) -> None:
        outcome = None if job.abandoned or job.error else job.outcome
        with self._cond:
            self._in_flight -= 1
            self.completed += 1
            self._done.append(Completed(job.messages, outcome, job.error))
            self._cond.notify_all()


def rewind_offsets(abandoned: Sequence[Completed]) -> dict[tuple[str, int], int]:
    """The first offset of each partition among abandoned batches: where to seek back to."""
    first: dict[tuple[str, int], int] = {}
    for done in abandoned:
        for m in done.messages:
            key = (m.topic, m.partition)
            first[key] = min(first.get(key, m.offset), m.offset)
    return first
