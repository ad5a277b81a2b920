"""The faust-streaming runner's commit protocol against the real embedded broker.

The batch processor is replaced by a recorder (what is under test is when offsets are
committed, not what a batch does); the full path with the real processor, store and publisher
is ``test_streams_end_to_end.py::test_stream_end_to_end[faust]``, which also checks that
SIGTERM exits 0 after committing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from sinks.metrics import StreamMetrics
from sinks.publisher import PublishError
from sinks.store import StoreUnavailable
from streams.batch import BatchOutcome, SourceMessage
from streams.runners.faust import FaustRunner, build_app
from streams.settings import Settings
from streams.topics import ensure_topics

PARTITIONS = 2
EVENTS = 120
ENDS = {p: EVENTS // PARTITIONS for p in range(PARTITIONS)}  # round-robin over the partitions
RUN_BOUND_S = 90.0  # a hung runner fails the test instead of hanging it


class Recorder:
    """Stands in for BatchProcessor.process: records (partition, offset) of handled batches;
    ``fail(attempt)`` may raise instead, before anything is recorded."""

    def __init__(self, fail: Callable[[int], None] | None = None) -> None:
        self.fail = fail
        self.attempts = 0
        self.handled: list[tuple[int, int]] = []
        self.batches = 0
        self.threads: set[str] = set()

    def process(self, messages: Sequence[SourceMessage]) -> BatchOutcome:
        self.attempts += 1
        self.threads.add(threading.current_thread().name)
        if self.fail is not None:
            self.fail(self.attempts)
        self.batches += 1
        self.handled += [(m.partition, m.offset) for m in messages]
        assert all(m.value is not None and m.value.startswith(b"v") for m in messages)
        return BatchOutcome(batch_id=self.batches, messages=len(messages))


@pytest.fixture()
def settings(kafka_bootstrap: str, unique: str) -> Settings:
    s = Settings(
        kafka_bootstrap_servers=kafka_bootstrap, topic_detections=f"faust-{unique}",
        group_id=f"faust-{unique}", session_timeout_ms=6000, batch_max_size=16,
        batch_max_wait_ms=100,
    )  # fmt: skip
    ensure_topics({"bootstrap.servers": kafka_bootstrap}, [s.topic_detections], PARTITIONS)
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True})
    for i in range(EVENTS):
        producer.produce(s.topic_detections, f"v{i}".encode(), partition=i % PARTITIONS)
    assert producer.flush(30) == 0
    return s


def run(
    settings: Settings,
    recorder: Recorder,
    until: Callable[[FaustRunner, BatchOutcome], bool],
    metrics: StreamMetrics | None = None,
    between_batches: Callable[[], None] | None = None,
    on_start: Callable[[FaustRunner], None] | None = None,
) -> FaustRunner:
    runner = FaustRunner(settings, recorder, metrics or StreamMetrics())  # type: ignore[arg-type]
    if on_start is not None:
        on_start(runner)
    runner.start()
    watchdog = threading.Timer(RUN_BOUND_S, runner.request_stop)
    watchdog.start()

    def on_batch(outcome: BatchOutcome) -> None:
        if until(runner, outcome):
            runner.request_stop()

    try:
        runner.run(on_batch, between_batches=between_batches)
    finally:
        watchdog.cancel()
    return runner


def committed(settings: Settings) -> dict[int, int]:
    consumer = Consumer(
        {"bootstrap.servers": settings.kafka_bootstrap_servers, "group.id": settings.group_id}
    )
    try:
        tps = [TopicPartition(settings.topic_detections, p) for p in range(PARTITIONS)]
        return {tp.partition: tp.offset for tp in consumer.committed(tps, timeout=10)}
    finally:
        consumer.close()


def by_partition(handled: list[tuple[int, int]]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {p: [] for p in range(PARTITIONS)}
    for p, o in handled:
        out[p].append(o)
    return out


def test_commits_each_batch_and_a_restart_resumes_there(settings: Settings) -> None:
    holder: list[FaustRunner] = []

    def stop_mid_third_batch(attempt: int) -> None:
        if attempt == 3:
            holder[0].request_stop()  # as SIGTERM would, while the batch is being processed

    first = Recorder(stop_mid_third_batch)
    metrics = StreamMetrics()
    run(settings, first, lambda _r, _o: False, metrics, on_start=holder.append)
    # The batch in hand was finished and committed; nothing after it was handled.
    assert first.batches == 3
    done = by_partition(first.handled)
    assert sum(len(v) for v in done.values()) < EVENTS
    for offsets in done.values():
        assert offsets == list(range(len(offsets)))  # in order, no gaps
    assert committed(settings) == {p: len(done[p]) for p in done}
    assert metrics.last_commit_timestamp._value.get() > 0

    second = Recorder()
    run(settings, second, lambda _r, _o: len(second.handled) >= EVENTS - len(first.handled))
    again = by_partition(second.handled)
    for p in range(PARTITIONS):
        assert again[p] == list(range(len(done[p]), ENDS[p]))  # from the commit, each once
    assert committed(settings) == ENDS


def test_an_outage_is_retried_then_committed(settings: Settings) -> None:
    def two_outages(attempt: int) -> None:
        if attempt == 1:
            raise StoreUnavailable("database down")
        if attempt == 2:
            raise PublishError("broker did not acknowledge")

    recorder = Recorder(two_outages)
    metrics = StreamMetrics()
    between: list[str] = []

    def between_batches() -> None:  # e.g. an embedding version switch: in the batch thread
        between.append(threading.current_thread().name)

    run(settings, recorder, lambda _r, _o: len(recorder.handled) >= EVENTS, metrics,
        between_batches)  # fmt: skip
    assert between and set(between) == recorder.threads and len(recorder.threads) == 1
    assert sorted(recorder.handled) == sorted((i % PARTITIONS, i // PARTITIONS)
                                              for i in range(EVENTS))  # fmt: skip
    assert metrics.store_errors._value.get() == 2
    assert committed(settings) == ENDS


def test_a_stop_during_retries_commits_nothing(settings: Settings) -> None:
    holder: list[FaustRunner] = []

    def down_then_stop(attempt: int) -> None:
        if attempt == 2:
            holder[0].request_stop()  # from the batch thread, as another thread would
        raise StoreUnavailable("database down")

    recorder = Recorder(down_then_stop)
    runner = FaustRunner(settings, recorder, StreamMetrics())  # type: ignore[arg-type]
    holder.append(runner)
    runner.start()
    watchdog = threading.Timer(RUN_BOUND_S, runner.request_stop)
    watchdog.start()
    try:
        runner.run()  # an abandoned batch is not an error: the group redelivers it
    finally:
        watchdog.cancel()
    assert recorder.attempts == 2 and recorder.handled == []
    assert all(offset < 0 for offset in committed(settings).values())  # none committed

    after = Recorder()
    run(settings, after, lambda _r, _o: len(after.handled) >= EVENTS)
    assert {p: min(v) for p, v in by_partition(after.handled).items()} == {0: 0, 1: 0}
    assert committed(settings) == ENDS


def test_an_unexpected_error_ends_run_uncommitted(settings: Settings) -> None:
    def bug(attempt: int) -> None:
        raise ValueError("a bug in the processor")

    recorder = Recorder(bug)
    with pytest.raises(ValueError, match="a bug"):
        run(settings, recorder, lambda _r, _o: True)
    assert recorder.attempts == 1
    assert all(offset < 0 for offset in committed(settings).values())


def test_sasl_options_become_faust_credentials() -> None:
    import faust

    s = Settings(
        kafka_options={"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512",
                       "sasl.username": "reid"},
        kafka_password="s3cret",
    )  # fmt: skip
    creds = build_app(s, "g", "/nonexistent").conf.broker_credentials
    assert isinstance(creds, faust.SASLCredentials)
    assert (creds.username, creds.password) == ("reid", "s3cret")
    assert creds.mechanism.value == "SCRAM-SHA-512" and creds.ssl_context is not None
    assert build_app(Settings(), "g", "/nonexistent").conf.broker_credentials is None


def test_a_rebalance_during_an_outage_loses_nothing(kafka_bootstrap: str, unique: str) -> None:
    """Member A is stuck on an outage when member B joins: A abandons its batch (uncommitted)
    so that the rebalance can finish, B takes over half the partitions, A resumes after the
    outage. Every event is handled (some maybe twice) and the group commits to the end."""
    s = Settings(
        kafka_bootstrap_servers=kafka_bootstrap, topic_detections=f"faust-rb-{unique}",
        group_id=f"faust-rb-{unique}", session_timeout_ms=6000, batch_max_size=16,
        batch_max_wait_ms=100,
    )  # fmt: skip
    partitions, events = 4, 240
    ensure_topics({"bootstrap.servers": kafka_bootstrap}, [s.topic_detections], partitions)
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True})
    for i in range(events):
        producer.produce(s.topic_detections, f"v{i}".encode(), partition=i % partitions)
    assert producer.flush(30) == 0

    failing = threading.Event()
    outage_until: list[float] = []

    def outage(attempt: int) -> None:
        if not outage_until:
            outage_until.append(time.monotonic() + 8.0)
            failing.set()
        if time.monotonic() < outage_until[0]:
            raise StoreUnavailable("database down")

    a, b = Recorder(outage), Recorder()
    runners = [FaustRunner(s, r, StreamMetrics()) for r in (a, b)]  # type: ignore[arg-type]
    threads = [threading.Thread(target=r.run, daemon=True) for r in runners]
    threads[0].start()
    try:
        assert failing.wait(RUN_BOUND_S)
        threads[1].start()  # joins while A waits out the outage
        deadline = time.monotonic() + RUN_BOUND_S
        while len(set(a.handled) | set(b.handled)) < events and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        for r in runners:
            r.request_stop()
        for t in threads:
            t.join(60)
    everything = {(i % partitions, i // partitions) for i in range(events)}
    assert set(a.handled) | set(b.handled) == everything
    assert b.handled, "B never got partitions"
    consumer = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": s.group_id})
    try:
        tps = [TopicPartition(s.topic_detections, p) for p in range(partitions)]
        got = {tp.partition: tp.offset for tp in consumer.committed(tps, timeout=10)}
    finally:
        consumer.close()
    assert got == {p: events // partitions for p in range(partitions)}


@pytest.mark.parametrize("wait_ms", [10, 500])
def test_the_consumer_waits_the_streams_fetch_wait(wait_ms: int) -> None:
    """Faust's driver fixes aiokafka's fetch wait at 1.5 s; the runner's consumer takes
    REID_KAFKA_FETCH_WAIT_MS instead (the embedded broker holds every fetch that long)."""
    import asyncio

    async def built_wait() -> int:
        app = build_app(Settings(kafka_fetch_wait_ms=wait_ms), "g", "/nonexistent")
        consumer = app.consumer._thread._create_worker_consumer(app.transport)
        try:
            return consumer._fetch_max_wait_ms
        finally:
            await consumer.stop()

    assert asyncio.run(built_wait()) == wait_ms
