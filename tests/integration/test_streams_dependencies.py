"""Dependencies that hang or are absent, against the real servers (issue 13, points 6-7):

- a PostgreSQL that hangs (SIGSTOP: its kernel still ACKs TCP, so neither keepalives nor
  server-side timeouts can fire) fails a store call within the client-side deadline, turns
  /readyz not ready within the health check's bound, and is used again after SIGCONT;
- `reid-stream run` started while PostgreSQL or the broker is down waits with one log line
  per attempt (serving /healthz, /readyz not ready), then works once it is up; SIGTERM
  during the wait exits 0 at once.
"""

from __future__ import annotations

import json
import re
import time

import pytest
from confluent_kafka import Producer

from sinks.migrate import migrate
from sinks.pg import PgTimeouts
from sinks.store import PgStore, StoreUnavailable
from streams.tools.produce import detection_event
from streams.topics import read_topic
from tests.conftest import stream_environment, zebra_images
from tests.integration.running import Running, hung, running

# Small bounds, so that the test measures them in seconds.
BOUNDS = {
    "REID_HEALTH_INTERVAL_S": "0.5",
    "REID_HEALTH_TIMEOUT_S": "1",
    "REID_PG_CONNECT_TIMEOUT_S": "2",
    "REID_PG_STATEMENT_TIMEOUT_MS": "2000",
    "REID_PG_CALL_TIMEOUT_S": "4",
}
_LEVELS = re.compile(r" (WARNING|ERROR|CRITICAL) ")


def _send_event(env: dict[str, str], detection_id: str) -> None:
    _who, path = zebra_images(individuals=1, per_individual=1)[0]
    event = detection_event(path.read_bytes(), "cam-deps", detection_id=detection_id)
    producer = Producer({"bootstrap.servers": env["REID_KAFKA_BOOTSTRAP_SERVERS"]})
    producer.produce(env["REID_TOPIC_DETECTIONS"], json.dumps(event).encode(), key="cam-deps")
    assert producer.flush(30) == 0


def _assignments(env: dict[str, str], expected: int, timeout_s: float) -> set[str]:
    got = read_topic(
        {"bootstrap.servers": env["REID_KAFKA_BOOTSTRAP_SERVERS"]},
        env["REID_TOPIC_ASSIGNMENTS"], expected=expected, timeout_s=timeout_s,
    )  # fmt: skip
    return {json.loads(m.value())["detection_id"] for m in got}


def _one_line_per_attempt(service: Running, waiting_for: str) -> int:
    """While waiting, the warnings are all "waiting for ``waiting_for``" lines numbered 1, 2,
    3..., and librdkafka said nothing until the dependency was reached; returns the attempts.
    (After the last attempt the model loads, which may warn once about its weights.)"""
    lines = service.lines
    last = max(i for i, line in enumerate(lines) if "start-up: waiting for" in line)
    reached = next(i for i, line in enumerate(lines) if "reachable after" in line)
    warnings = [line for line in lines[: last + 1] if _LEVELS.search(line)]
    attempts = [int(m[1]) for line in warnings if (m := re.search(r"\(attempt (\d+),", line))]
    assert all(f"start-up: waiting for {waiting_for}" in w for w in warnings), warnings
    assert attempts == list(range(1, len(attempts) + 1)), warnings
    assert f"start-up: {waiting_for}" in lines[reached], lines[reached]
    assert not any(" librdkafka " in line or "Traceback" in line for line in lines[:reached])
    return len(attempts)


def test_a_store_call_on_a_hung_postgres_fails_within_its_deadline(stack, database_url):
    migrate(database_url)
    timeouts = PgTimeouts(connect_s=1, statement_ms=1000, call_s=2.0)
    store = PgStore(database_url, connect_timeout=1)
    store._timeouts = timeouts
    store.start()
    store.ping()
    try:
        with hung(stack.info.pids["postgres"]):
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailable, match=r"no answer within 2\.0s"):
                store.ping()
            assert time.monotonic() - t0 < 5.0
            # The next call reconnects, which the connect timeout bounds.
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailable):
                store.deer_count("v1")
            assert time.monotonic() - t0 < 5.0
        store.ping()  # resumed: a new connection works
        assert store.deer_count("v1") == 0
    finally:
        store.stop()


def test_run_waits_for_postgres_then_works_through_a_hang(stack, database_url, unique):
    migrate(database_url)
    env = stream_environment(stack, database_url, unique, **BOUNDS)
    stack.stop("postgres")
    try:
        with running(env, "run") as service:
            service.wait_for("3 attempts", lambda: service.count("waiting for PostgreSQL") >= 3,
                             60)  # fmt: skip
            assert service.get("/healthz") == (200, {"status": "alive"})
            status, body = service.get("/readyz") or (0, {})
            assert status == 503 and "postgres" in body["failed"], body
            stack.start("postgres")
            service.wait_for("ready", service.ready, 180)
            assert _one_line_per_attempt(service, "PostgreSQL") >= 3
            assert service.count("PostgreSQL at postgres@127.0.0.1") >= 3
            _send_event(env, "before-hang")
            assert _assignments(env, 1, 120) == {"before-hang"}

            with hung(stack.info.pids["postgres"]):
                _send_event(env, "during-hang")
                elapsed = service.wait_for("not ready", lambda: not service.ready(), 15)
                assert elapsed < 6.0, "interval 0.5 s + timeout 1 s, with room for the load"
                status, body = service.get("/readyz") or (0, {})
                # "no answer within 1.0s", or the reconnect's own timeout after the abort
                assert body["checks"]["postgres"].startswith("unreachable"), body
                assert service.get("/healthz") == (200, {"status": "alive"})
                # The write stage's call is aborted by its deadline (4 s), then retried.
                service.wait_for("aborted call", lambda: service.count("no answer within 4.0s"),
                                 30)  # fmt: skip
            service.wait_for("ready again", service.ready, 30)
            assert _assignments(env, 2, 120) == {"before-hang", "during-hang"}
            code, _ = service.stop()
            assert code == 0, service.output[-3000:]
    finally:
        stack.start("postgres")


def test_run_waits_for_the_broker_then_works(stack, database_url, unique):
    migrate(database_url)
    env = stream_environment(stack, database_url, unique, **BOUNDS)
    stack.stop("kafka")
    try:
        with running(env, "run") as service:
            service.wait_for("2 attempts", lambda: service.count("waiting for the Kafka") >= 2, 60)
            status, _ = service.get("/readyz") or (0, {})
            assert status == 503
            stack.start("kafka")  # same port; topics are created by the stream
            service.wait_for("ready", service.ready, 180)
            assert _one_line_per_attempt(service, "the Kafka broker") >= 2
            _send_event(env, "after-broker")
            assert _assignments(env, 1, 120) == {"after-broker"}
            code, _ = service.stop()
            assert code == 0, service.output[-3000:]
    finally:
        stack.start("kafka")


def test_sigterm_during_the_start_up_wait_exits_0_promptly(stack, database_url, unique):
    env = stream_environment(stack, database_url, unique, **BOUNDS)
    env["REID_DATABASE_URL"] = "postgresql://reid@127.0.0.1:9/reid"  # nothing listens there
    with running(env, "run") as service:
        service.wait_for("waiting", lambda: service.count("waiting for PostgreSQL") >= 2, 60)
        code, took = service.stop()
    assert code == 0, service.output[-3000:]
    assert took < 10.0
