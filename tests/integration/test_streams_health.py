"""The operations port (/healthz, /readyz, /metrics), the cached dependency checks and the
per-partition lag sampler, with fakes: no broker or database needed, so every branch runs."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import pytest
from confluent_kafka import KafkaException, TopicPartition

from sinks.metrics import StreamMetrics
from streams.health import HealthChecker
from streams.runners.lag import LagSampler


def get(port: int, path: str) -> tuple[int, str, dict | str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            status, ctype, body = response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as err:
        status, ctype, body = err.code, err.headers["Content-Type"], err.read()
    return status, ctype, json.loads(body) if ctype == "application/json" else body.decode()


class Dependency:
    """A check that fails while ``down`` is set, and counts its calls."""

    def __init__(self, error: str = "connection refused") -> None:
        self.down = False
        self.calls = 0
        self.error = error

    def __call__(self) -> None:
        self.calls += 1
        if self.down:
            raise ConnectionError(self.error)


@pytest.fixture()
def served():
    metrics = StreamMetrics()
    postgres = Dependency("connection to postgresql://reid:hunter2@db:5432/reid failed")
    kafka, redis = Dependency(), Dependency()
    model = {"loaded": False}
    checker = HealthChecker(
        metrics,
        {"postgres": postgres, "kafka": kafka, "redis": redis},
        required={"postgres", "kafka"},
        conditions={"model": lambda: None if model["loaded"] else "model not loaded"},
        interval_s=3600,  # the test drives the checks with check_now()
    )
    port = metrics.serve(0, readiness=checker.readiness)
    try:
        yield port, metrics, checker, model, postgres, kafka, redis
    finally:
        metrics.shutdown()


def test_healthz_readyz_and_metrics(served) -> None:
    port, metrics, checker, model, postgres, _kafka, redis = served

    assert get(port, "/healthz")[:2] == (200, "application/json")
    status, _, body = get(port, "/readyz")
    assert status == 503 and body["checks"]["model"] == "model not loaded"
    assert body["checks"]["postgres"] == "not checked yet"  # never ready before a check ran

    model["loaded"] = True
    checker.check_now()
    status, _, body = get(port, "/readyz")
    assert status == 200, body
    assert body == {"status": "ready", "checks": {"kafka": "ok", "model": "ok", "postgres": "ok"}}

    # Redis is reported by the gauge but does not make the consumer unready (a cache).
    redis.down = True
    checker.check_now()
    assert get(port, "/readyz")[0] == 200
    status, ctype, text = get(port, "/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    assert 'reid_dependency_up{dependency="redis"} 0.0' in text
    assert 'reid_dependency_up{dependency="postgres"} 1.0' in text

    postgres.down = True
    checker.check_now()
    status, _, body = get(port, "/readyz")
    assert status == 503 and body["failed"] == ["postgres"]
    assert body["checks"]["postgres"].startswith("unreachable: ConnectionError")
    assert "hunter2" not in json.dumps(body) and "://reid:***@db" in body["checks"]["postgres"]
    assert 'reid_dependency_up{dependency="postgres"} 0.0' in metrics.render().decode()

    postgres.down = False
    checker.check_now()
    assert get(port, "/readyz")[0] == 200
    assert get(port, "/other")[0] == 404


def test_probes_read_cached_results(served) -> None:
    port, _metrics, checker, model, postgres, kafka, _redis = served
    model["loaded"] = True
    checker.check_now()
    calls = postgres.calls, kafka.calls
    for _ in range(20):
        assert get(port, "/readyz")[0] == 200
    assert (postgres.calls, kafka.calls) == calls  # probes never reach the dependencies


def test_a_raising_readiness_answers_503() -> None:
    metrics = StreamMetrics()

    def broken() -> dict[str, str | None]:
        raise RuntimeError("boom at postgresql://u:secret@h/db")

    port = metrics.serve(0, readiness=broken)
    try:
        status, _, body = get(port, "/readyz")
    finally:
        metrics.shutdown()
    assert status == 503 and body["failed"] == ["readiness"]
    assert "secret" not in json.dumps(body)


def test_checker_thread_runs_periodically_and_stops() -> None:
    dep = Dependency()
    checker = HealthChecker(StreamMetrics(), {"kafka": dep}, required={"kafka"}, interval_s=0.05)
    checker.start()
    deadline = time.monotonic() + 5
    while dep.calls < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    checker.stop()
    assert dep.calls >= 3
    stopped_at = dep.calls
    time.sleep(0.2)
    assert dep.calls == stopped_at
    assert checker.readiness() == {"kafka": None}


def test_slow_readiness_does_not_block_metrics() -> None:
    """ThreadingHTTPServer: a hung probe must not stall scrapes."""
    release = threading.Event()
    metrics = StreamMetrics()
    port = metrics.serve(0, readiness=lambda: release.wait(10) and {})
    try:
        probe = threading.Thread(target=get, args=(port, "/readyz"))
        probe.start()
        time.sleep(0.1)
        t0 = time.monotonic()
        assert get(port, "/metrics")[0] == 200
        assert time.monotonic() - t0 < 2
    finally:
        release.set()
        probe.join()
        metrics.shutdown()


class FakeConsumer:
    """The three calls LagSampler makes, over a table of end offsets."""

    def __init__(self, topic: str, ends: dict[int, int], committed: dict[int, int]) -> None:
        self.topic = topic
        self.ends = ends
        self.group_committed = committed
        self.owned = set(ends)
        self.committed_calls = 0
        self.fail = False
        self.cached_calls: list[bool] = []
        self.fetched: dict[int, int] = {}

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition(self.topic, p) for p in sorted(self.owned)]

    def committed(self, partitions, timeout=None):
        self.committed_calls += 1
        return [
            TopicPartition(tp.topic, tp.partition, self.group_committed.get(tp.partition, -1001))
            for tp in partitions
        ]

    def get_watermark_offsets(self, tp, timeout=None, cached=False):
        self.cached_calls.append(cached)
        if self.fail and not cached:
            raise KafkaException("broker down")
        if cached:  # what fetch responses left: nothing yet for a partition never fetched
            return -1001, self.fetched.get(tp.partition, -1001)
        return 0, self.ends[tp.partition]


def lag_series(metrics: StreamMetrics) -> dict[str, float]:
    out = {}
    for line in metrics.render().decode().splitlines():
        if line.startswith("reid_consumer_lag_messages{"):
            labels, value = line.rsplit(" ", 1)
            out[labels.split('partition="')[1].split('"')[0]] = float(value)
    return out


def test_lag_per_partition_from_end_and_committed_offsets() -> None:
    metrics = StreamMetrics()
    consumer = FakeConsumer("det", ends={0: 100, 1: 50, 2: 7}, committed={0: 40, 1: 50})
    sampler = LagSampler(metrics, interval_s=3600)
    sampler.maybe_sample(consumer)
    # Partition 2 never committed: everything from the start (auto.offset.reset=earliest).
    assert lag_series(metrics) == {"0": 60.0, "1": 0.0, "2": 7.0}
    assert "reid_assigned_partitions 3.0" in metrics.render().decode()

    # Within the interval nothing is asked; after it, own commits are used without a lookup.
    consumer.ends[0] = 120
    sampler.maybe_sample(consumer)
    assert lag_series(metrics)["0"] == 60.0
    sampler.committed([TopicPartition("det", 0, 110)])
    sampler._next = 0.0
    calls = consumer.committed_calls
    sampler.maybe_sample(consumer)
    assert lag_series(metrics)["0"] == 10.0 and consumer.committed_calls == calls

    # A partition that moved to another member leaves this member's series.
    consumer.owned = {0, 2}
    sampler._next = 0.0
    sampler.maybe_sample(consumer)
    assert set(lag_series(metrics)) == {"0", "2"}

    # A broker error costs a sample, not the loop.
    consumer.fail = True
    sampler._next = 0.0
    sampler.maybe_sample(consumer)
    assert set(lag_series(metrics)) == {"0", "2"}
    assert not any(consumer.cached_calls)  # paused (an outage): the broker is asked


def test_lag_while_fetching_uses_the_end_offsets_cached_from_fetches() -> None:
    """No broker round trip per partition in the consumer's loop while it fetches (they
    stalled the loop ~1.5 s per sample on the embedded broker); a partition not fetched yet
    is left out of the sample rather than reported from a made-up end."""
    metrics = StreamMetrics()
    consumer = FakeConsumer("det", ends={0: 100, 1: 50}, committed={0: 40, 1: 20})
    consumer.fetched = {0: 90}
    sampler = LagSampler(metrics, interval_s=3600)
    sampler.maybe_sample(consumer, fetching=True)
    assert consumer.cached_calls == [True, True]
    assert lag_series(metrics) == {"0": 50.0}


def test_a_hung_check_fails_within_its_timeout_and_recovers() -> None:
    """A dependency that hangs (SIGSTOP: no refusal, no answer) fails its check after the
    check's own timeout, without delaying the other checks, and passes again once it
    answers; the stuck call is not started a second time meanwhile."""
    resume = threading.Event()
    calls = {"postgres": 0}

    def postgres() -> None:
        calls["postgres"] += 1
        resume.wait(30)

    kafka = Dependency()
    checker = HealthChecker(
        StreamMetrics(), {"postgres": postgres, "kafka": kafka}, required={"postgres", "kafka"},
        interval_s=3600, timeout_s=0.3,
    )  # fmt: skip
    rounds: list[dict[str, str | None]] = []
    worker = threading.Thread(target=lambda: rounds.append(checker.check_now()))
    t0 = time.monotonic()
    worker.start()
    worker.join(5)
    assert not worker.is_alive(), "check_now() must not wait for a hung dependency"
    assert time.monotonic() - t0 < 2.0
    assert rounds[0]["kafka"] is None
    assert rounds[0]["postgres"] == "unreachable: no answer within 0.3s"
    second = checker.check_now()
    assert second["postgres"].startswith("unreachable: no answer within 0.3s (stuck for")
    assert calls["postgres"] == 1, "a stuck check is not started again"
    assert checker.readiness()["postgres"] is not None
    resume.set()
    time.sleep(0.05)
    assert checker.check_now()["postgres"] is None
    assert checker.check_now()["postgres"] is None and calls["postgres"] == 2
