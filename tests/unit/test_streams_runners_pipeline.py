"""The batch pipeline over a fake processor (pure logic): overlap, order, abandonment, errors."""

from __future__ import annotations

import threading
import time

import pytest

from streams.batch import BatchOutcome, PreparedBatch, SourceMessage
from streams.runners.pipeline import Completed, Pipeline, rewind_offsets


def msgs(partition: int, *offsets: int) -> list[SourceMessage]:
    return [SourceMessage("det", partition, o, None, b"{}") for o in offsets]


class FakeProcessor:
    """Records which stage ran which batch and when; each stage takes ``stage_s``."""

    def __init__(self, stage_s: float = 0.0) -> None:
        self.stage_s = stage_s
        self.events: list[tuple[str, int, float]] = []
        self.lock = threading.Lock()
        self.ids = iter(range(1, 10_000))

    def _note(self, stage: str, batch_id: int) -> None:
        with self.lock:
            self.events.append((stage, batch_id, time.monotonic()))
        time.sleep(self.stage_s)

    def prepare(self, messages):
        batch = PreparedBatch(next(self.ids), messages, [], [], [], {})
        self._note("prepare", batch.batch_id)
        return batch

    def embed(self, batch):
        self._note("embed", batch.batch_id)
        return batch

    def finish(self, batch) -> BatchOutcome:
        self._note("finish", batch.batch_id)
        return BatchOutcome(batch_id=batch.batch_id, messages=len(batch.messages))


def collect(pipeline: Pipeline, count: int, timeout: float = 10.0) -> list[Completed]:
    done: list[Completed] = []
    deadline = time.monotonic() + timeout
    while len(done) < count and time.monotonic() < deadline:
        pipeline.wait(0.05)
        done += pipeline.take_completed()
    return done


def run_batches(pipeline: Pipeline, batches: list[list[SourceMessage]]) -> list[Completed]:
    done: list[Completed] = []
    for batch in batches:
        while not pipeline.has_room():
            pipeline.wait(0.05)
            done += pipeline.take_completed()
        pipeline.submit(batch)
    return done + collect(pipeline, len(batches) - len(done))


def test_batches_leave_in_order_and_stages_overlap() -> None:
    processor = FakeProcessor(stage_s=0.05)
    pipeline = Pipeline(processor, processor.finish, depth=3)  # type: ignore[arg-type]
    pipeline.start()
    try:
        done = run_batches(pipeline, [msgs(0, i) for i in range(6)])
    finally:
        pipeline.stop()
    assert [d.outcome.batch_id for d in done] == [1, 2, 3, 4, 5, 6]  # type: ignore[union-attr]
    assert [d.messages[0].offset for d in done] == list(range(6))
    # Overlap: batch 2 was prepared before batch 1 finished.
    when = {(stage, b): t for stage, b, t in processor.events}
    assert when[("prepare", 2)] < when[("finish", 1)]


def test_depth_one_runs_one_batch_at_a_time() -> None:
    processor = FakeProcessor(stage_s=0.01)
    pipeline = Pipeline(processor, processor.finish, depth=1)  # type: ignore[arg-type]
    pipeline.start()
    try:
        run_batches(pipeline, [msgs(0, i) for i in range(4)])
    finally:
        pipeline.stop()
    stages = [(stage, b) for stage, b, _ in processor.events]
    expected = [(s, b) for b in range(1, 5) for s in ("prepare", "embed", "finish")]
    assert stages == expected


def test_an_abandoned_batch_halts_and_abandons_the_ones_behind_it() -> None:
    processor = FakeProcessor(stage_s=0.02)

    def finish(batch: PreparedBatch) -> BatchOutcome | None:
        return None if batch.batch_id == 2 else processor.finish(batch)

    pipeline = Pipeline(processor, finish, depth=3)  # type: ignore[arg-type]
    pipeline.start()
    try:
        for i in range(3):
            pipeline.submit(msgs(i % 2, 10 + i))
        done = collect(pipeline, 3)
        assert pipeline.halted and not pipeline.has_room()
        assert [d.outcome is not None for d in done] == [True, False, False]
        # The runner rewinds to the first unwritten offset of each partition.
        assert rewind_offsets([d for d in done if d.outcome is None]) == {
            ("det", 1): 11,
            ("det", 0): 12,
        }
        pipeline.resume()
        assert pipeline.has_room()
        pipeline.submit(msgs(0, 99))
        assert collect(pipeline, 1)[0].outcome is not None
    finally:
        pipeline.stop()


def test_a_stage_failure_reaches_the_runner_and_halts() -> None:
    processor = FakeProcessor()

    def embed(batch: PreparedBatch) -> PreparedBatch:
        raise RuntimeError(f"model broke on batch {batch.batch_id}")

    processor.embed = embed  # type: ignore[method-assign]
    pipeline = Pipeline(processor, processor.finish, depth=2)  # type: ignore[arg-type]
    pipeline.start()
    try:
        pipeline.submit(msgs(0, 1))
        pipeline.submit(msgs(0, 2))
        done = collect(pipeline, 2)
    finally:
        pipeline.stop()
    assert isinstance(done[0].error, RuntimeError) and "batch 1" in str(done[0].error)
    assert done[1].outcome is None and done[1].error is None  # abandoned behind the failure
    assert pipeline.halted


def test_depth_must_be_positive() -> None:
    with pytest.raises(ValueError, match="depth"):
        Pipeline(FakeProcessor(), lambda b: None, depth=0)  # type: ignore[arg-type]


def test_model_is_idle_once_every_batch_left_the_embed_stage() -> None:
    processor = FakeProcessor()
    gates = {name: threading.Event() for name in ("embed", "finish")}

    def gated(stage, work):
        def run(batch):
            gates[stage].wait(10)
            return work(batch)

        return run

    processor.embed = gated("embed", processor.embed)  # type: ignore[method-assign]
    pipeline = Pipeline(processor, gated("finish", processor.finish), depth=2)  # type: ignore[arg-type]
    pipeline.start()
    try:
        assert pipeline.model_idle
        pipeline.submit(msgs(0, 1))
        assert not pipeline.model_idle  # prepared or waiting for the model
        gates["embed"].set()
        deadline = time.monotonic() + 10
        while not pipeline.model_idle and time.monotonic() < deadline:
            time.sleep(0.005)
        # In the finish stage (held there): the model has nothing to do.
        assert pipeline.model_idle and pipeline.in_flight == 1
        gates["finish"].set()
        assert collect(pipeline, 1)[0].outcome is not None
    finally:
        gates["embed"].set()
        gates["finish"].set()
        pipeline.stop()
