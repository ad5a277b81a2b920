"""Faults against the delivery guarantees, one scenario per test, each with 1000 events through
real `python -m streams.cli run` processes (see harness.py for the stream and the checks).

Every test ends with the same checks (``FaultRun.finish``): each detection stored exactly
once, an assignment event for each (repeats byte-identical), one deer per animal and one
animal per deer, sightings adding up, no dead letters, the group's offsets committed to the
end of every partition.
"""

from __future__ import annotations

import re
import time
from collections import Counter

import psycopg

from tests.faults.checks import cache_state
from tests.faults.harness import FaultRun
from tests.faults.stream import ANIMALS, EVENTS, PARTITIONS, Stream, make_stream
from tests.faults.workers import SHUTDOWN_TIMEOUT_S, wait_for

SHUTDOWN_GRACE_S = 5.0  # a SIGTERMed worker exits within REID_SHUTDOWN_TIMEOUT_S + this
# Several workers on 2 cores: one thread each, or they spend their time fighting for the CPU.
PROBE = "tests.faults.probe"  # `reid-stream run` with its revocations logged as they begin
ONE_CORE = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "REID_DECODE_WORKERS": "1"}
# Events/s fed to test_rebalance's workers: above what two one-core workers consume (about
# 25-35 events/s each on the project's machines), so they stay saturated.
REBALANCE_FEED_RATE = 120.0


def produce(run: FaultRun) -> Stream:
    stream = run.produce(make_stream())
    assert len(stream.sightings) == EVENTS
    assert sorted(stream.ends) == list(range(PARTITIONS)), f"partitions used: {stream.ends}"
    return stream


def at(fraction: float) -> int:
    return int(fraction * EVENTS)


def test_kill9(fault_run: FaultRun):
    run = fault_run.describe(
        "kill9", "consumer killed with SIGKILL at ~30%, a new consumer finishes"
    )
    produce(run)
    a = run.start_worker("a")
    # Right after a batch's database commit: its output and offsets are most likely not sent.
    rows = run.wait_rows(at(0.3), interval=0.002)
    a.kill9()
    run.mark("a SIGKILLed")
    run.note(f"SIGKILL at {rows} rows")
    run.start_worker("b")
    run.wait_done()
    verdict = run.finish()
    run.note(
        f"b found {redelivered(run)} events already stored; "
        f"{verdict.figures['repeated_events']} assignment events repeated"
    )
    verdict.check()


def test_postgres_outage(fault_run: FaultRun):
    run = fault_run.describe(
        "postgres_outage", "PostgreSQL stopped for 10 s mid-stream; the same consumer finishes"
    )
    produce(run)
    a = run.start_worker("a")
    rows = run.wait_rows(at(0.3))
    with run.service_down("postgres"):
        time.sleep(10)
    assert a.alive(), f"the consumer died during the PostgreSQL outage\n{a.tail()}"
    run.wait_done()
    errors = a.metrics()["reid_store_errors_total"]
    run.note(f"stopped at {rows} rows; reid_store_errors_total={errors:.0f}")
    assert errors > 0, "the outage was not noticed: reid_store_errors_total is 0"
    run.finish().check()


def test_redis_outage(fault_run: FaultRun):
    run = fault_run.describe(
        "redis_outage", "Redis stopped mid-stream and started again; the consumer finishes"
    )
    produce(run)
    a = run.start_worker("a")
    rows = run.wait_rows(at(0.3))
    with run.service_down("redis"):
        # Enough batches while Redis is down: each must fall back to PostgreSQL.
        during = run.wait_rows(rows + at(0.15), timeout=90) - rows
    run.wait_done()
    errors = a.metrics()["reid_cache_errors_total"]
    run.note(f"Redis down from {rows} rows for {during} rows; reid_cache_errors_total={errors:.0f}")
    assert errors > 0, "the outage was not noticed: reid_cache_errors_total is 0"
    verdict = run.finish()
    # Postgres is the truth and Redis came back empty: the cache must hold every deer again,
    # with the committed sightings.
    cache = cache_state(run.redis_url, run.cache_prefix, run.database_url)
    run.note(f"cache after: {cache['deer_keys']} deer keys for {cache['deer_in_db']} deer")
    verdict.check()
    assert cache["deer_keys"] > 0, f"cache not repopulated after Redis returned: {cache}"
    assert not cache["cold_versions"], f"cache left cold: {cache}"
    assert cache["missing"] == cache["stale"] == 0, f"cache disagrees with PostgreSQL: {cache}"


def test_redis_frozen(fault_run: FaultRun):
    run = fault_run.describe(
        "redis_frozen",
        "Redis hung (SIGSTOP) from ~80% to ~90%, keeping its data; the consumer finishes",
    )
    produce(run)
    a = run.start_worker("a")
    # Late in the stream, where many deer are seen for the last time: the cache writes lost
    # while Redis hangs leave entries that stay stale unless the consumer drops them once
    # Redis answers again (the batches after ~90% must do that).
    rows = run.wait_rows(at(0.8))
    with run.service_frozen("redis"):
        during = run.wait_rows(at(0.9), timeout=90) - rows
    run.wait_done()
    errors = a.metrics()["reid_cache_errors_total"]
    verdict = run.finish()
    cache = cache_state(run.redis_url, run.cache_prefix, run.database_url)
    run.note(
        f"frozen from {rows} rows for {during} rows; reid_cache_errors_total={errors:.0f}; "
        f"cache after: {cache['deer_keys']} deer keys for {cache['deer_in_db']} deer, "
        f"{cache['stale']} stale, {cache['missing']} missing"
    )
    verdict.check()
    assert errors > 0, "the hang was not noticed: reid_cache_errors_total is 0"
    assert cache["missing"] == cache["stale"] == 0, f"cache disagrees with PostgreSQL: {cache}"


def test_rebalance(fault_run: FaultRun):
    run = fault_run.describe(
        "rebalance",
        "two consumers busy with 2000 events; a third joins (partitions revoked from the "
        "first two with batches in flight), one of the first two leaves (SIGTERM) at ~50%",
    )
    # Twice the usual stream. a and b have their partitions before any event exists (so
    # their own joins move idle partitions only); the bulk is fed from the moment c has loaded
    # its model and subscribed, so that a and b are saturated (their pipelines full) when
    # c's join makes them revoke the partitions it gets. Fed faster than a and b consume, not
    # all at once: librdkafka queues each fetch partition by partition, so a backlog sent at
    # once reaches the batches as long runs of one partition, and the partition revoked often
    # had none in flight; fed, each fetch holds a few events of every partition.
    stream = make_stream(animals=2 * ANIMALS)
    events = len(stream.sightings)
    burst, rest = stream.sightings[: events // 5], stream.sightings[events // 5 :]
    # The probe logs each revocation as it begins, with the batches then in flight.
    a = run.start_worker("a", env=ONE_CORE, module=PROBE)
    b = run.start_worker("b", env=ONE_CORE, module=PROBE)
    for worker in (a, b):
        wait_for(lambda w=worker: assigned(w.log()), 120, f"worker {worker.name} to be "
                 "assigned partitions", run.diagnostics, alive=[worker])  # fmt: skip
    # A burst first: a and b race to create the deer of the many animals it shows first,
    # each animal's sightings on several partitions.
    run.produce(stream, burst)
    run.wait_rows(events // 10)
    c = run.start_worker("c", env=ONE_CORE, module=PROBE)
    wait_for(lambda: "consumer: subscribed" in c.log(), 120, "worker c to load its model",
             run.diagnostics, alive=[c])  # fmt: skip
    feeder = run.feed(stream, rest, rate=REBALANCE_FEED_RATE)
    run.mark("c subscribed; feeding the rest")
    wait_for(lambda: assigned(c.log()), 90, "worker c to be assigned partitions",
             run.diagnostics, alive=[c])  # fmt: skip
    joined_at = run.rows()
    run.mark("c assigned partitions")
    left_at = run.wait_rows(events // 2)
    seconds = run.terminate(a)
    feeder.join(timeout=120)
    run.check_produced()
    spread = stream.animals_on_several_partitions()
    assert spread >= 0.9 * 2 * ANIMALS, f"only {spread} animals on several partitions"
    run.wait_done(timeout=240)
    verdict = run.finish()
    busy = [line for w in (a, b) for line in revocations(w.log()) if busy_revocation(line)]
    run.note(
        f"c got partitions at {joined_at} rows, a left at {left_at} rows ({seconds:.1f}s); "
        f"assignment rounds: a {len(assignments(a.log()))}, b {len(assignments(b.log()))}, "
        f"c {len(assignments(c.log()))}; revocations from a and b with batches of the revoked "
        f"partitions in flight: {len(busy)} of "
        f"{sum(len(revocations(w.log())) for w in (a, b))} ({'; '.join(busy[:2])}); "
        f"new deer re-planned against other workers' deer {replans(run)} times; "
        f"{redelivered(run)} events found already stored; "
        f"{verdict.figures['repeated_events']} assignment events repeated"
    )
    verdict.check()
    assert busy, (
        "no partition was revoked with a batch of it in flight (only idle partitions moved): "
        f"{[revocations(w.log()) for w in (a, b)]}"
    )


def test_postgres_frozen(fault_run: FaultRun):
    run = fault_run.describe(
        "postgres_frozen",
        "PostgreSQL hung (SIGSTOP of the postmaster and every backend) for 10 s from ~30%, "
        "then resumed (SIGCONT); the same consumer finishes",
    )
    produce(run)
    a = run.start_worker("a")
    rows = run.wait_rows(at(0.3))
    answers = []
    with run.service_frozen("postgres") as pids:
        # Not a query to the database meanwhile: it would hang too.
        end = time.monotonic() + 10
        while time.monotonic() < end:
            answers.append(a.readyz(timeout=1.0))
            time.sleep(0.5)
    assert a.alive(), f"the consumer died while PostgreSQL hung\n{a.tail()}"
    run.wait_done()
    errors = a.metrics()["reid_store_errors_total"]
    verdict = run.finish()
    lost = re.findall(r"consumer: lost .*", a.log())
    run.note(
        f"froze {len(pids)} processes at {rows} rows; /readyz during the hang "
        f"(status: times, None = no answer in 1 s): {dict(Counter(answers))}; "
        f"reid_store_errors_total={errors:.0f}; assignment rounds of the consumer "
        f"{len(assignments(a.log()))}, partitions lost {len(lost)}; "
        f"{redelivered(run)} events found already stored; "
        f"{verdict.figures['repeated_events']} assignment events repeated"
    )
    verdict.check()


def test_sigterm_mid_batch(fault_run: FaultRun):
    run = fault_run.describe(
        "sigterm_mid_batch",
        "SIGTERM while a batch is processed (~30%); exit 0 in time, a new consumer finishes",
    )
    produce(run)
    a = run.start_worker("a")
    # A batch was just committed to the database; 0.1 s later the next one is being
    # decoded and embedded (a batch of 32 takes ~0.3 s here, longer under load).
    rows = run.wait_rows(at(0.3), interval=0.002)
    time.sleep(0.1)
    seconds = run.terminate(a, timeout=SHUTDOWN_TIMEOUT_S + SHUTDOWN_GRACE_S)
    log = a.log()
    signalled = log.find("SIGTERM received")
    assert signalled >= 0, f"no SIGTERM line in the log\n{a.tail()}"
    batches_after = re.findall(r"batch \d+: messages=", log[signalled:])
    # A clean stop finishes and commits the batch in hand: nothing stored stays uncommitted.
    uncommitted = stored_beyond_commit(run)
    run.note(
        f"SIGTERM at {rows} rows, exit 0 after {seconds:.1f}s, {len(batches_after)} batch "
        f"finished after the signal; stored but uncommitted at exit: {uncommitted}"
    )
    assert batches_after, f"no batch finished after SIGTERM (the test's timing)\n{a.tail()}"
    assert uncommitted == 0, "the batch in hand was stored but its offsets not committed"
    run.start_worker("b")
    run.wait_done()
    verdict = run.finish()
    run.note(
        f"b found {redelivered(run)} events already stored; "
        f"{verdict.figures['repeated_events']} assignment events repeated"
    )
    verdict.check()


# -- helpers ------------------------------------------------------------------------------
def assigned(log: str) -> bool:
    """Whether a worker's log shows it was given at least one partition."""
    return any(line.rsplit(" ", 1)[-1] != "-" for line in re.findall(r"consumer: assigned .*", log))


def assignments(log: str) -> list[str]:
    return re.findall(r"consumer: assigned .*", log)


def revocations(log: str) -> list[str]:
    """The probe's lines for revocations of at least one partition."""
    return re.findall(r"probe: revoking (?!- ).*", log)


def busy_revocation(line: str) -> bool:
    """Whether a probe line says a batch holding a revoked partition was in flight."""
    found = re.search(r"in flight, (\d+) holding revoked", line)
    return found is not None and int(found.group(1)) > 0


def replans(run: FaultRun) -> int:
    return sum(w.log().count("re-planned against") for w in run.workers)


def redelivered(run: FaultRun) -> int:
    """Events the workers found already stored (redelivered), from their batch log lines."""
    return sum(int(n) for w in run.workers for n in re.findall(r" redelivered=(\d+)", w.log()))


def stored_beyond_commit(run: FaultRun) -> int:
    """Stored detections whose input offset is not covered by the group's committed offset."""
    committed = run.committed()  # a partition never committed reads as a negative offset
    with psycopg.connect(run.database_url) as conn:
        rows = conn.execute("SELECT source_partition, source_offset FROM detections").fetchall()
    return sum(1 for partition, offset in rows if offset >= committed.get(partition, -1))
