"""Broker faults: the broker unreachable mid-stream, and publishing refused right after a
batch's database commit. Each runs on a broker of its own behind a proxy that the test cuts
(``tests.faults.broker`` says why a proxy and not a process restart), with the same stream
and the same end-of-run checks as ``test_faults.py``."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from contextlib import AbstractContextManager

from tests.faults.broker import ProxiedBroker
from tests.faults.harness import FaultRun
from tests.faults.test_faults import assignments, at, produce, redelivered
from tests.faults.workers import Worker

OUTAGE_S = 15.0  # longer than the session timeout (6 s): the broker drops the member
# Longer than the publisher's confirmation wait (30 s), so that at least one publish fails
# (PublishError) and the batch is retried, not only delayed.
REFUSAL_S = 40.0


def test_broker_restart(broker_fault_run: FaultRun, proxied_broker: ProxiedBroker):
    run = broker_fault_run.describe(
        "broker_restart",
        f"broker unreachable (connections cut, new ones refused) for {OUTAGE_S:.0f} s from "
        "~30%, then back at the same address with its data; the same consumer finishes",
    )
    a, rows, during, errors = through(run, proxied_broker.down, OUTAGE_S, "broker down")
    verdict = run.finish()
    log = a.log()
    run.note(
        f"down at {rows} rows for {OUTAGE_S:.0f}s ({proxied_broker.proxy.cut_connections} "
        f"connections cut), {during} rows stored meanwhile; reid_store_errors_total="
        f"{errors:.0f}; assignment rounds {len(assignments(log))}, partitions lost "
        f"{len(re.findall(r'consumer: lost ', log))}; {redelivered(run)} events found already "
        f"stored; {verdict.figures['repeated_events']} assignment events repeated"
    )
    verdict.check()


def test_publish_refused(broker_fault_run: FaultRun, proxied_broker: ProxiedBroker):
    run = broker_fault_run.describe(
        "publish_refused",
        f"every produce request refused for {REFUSAL_S:.0f} s from right after a batch's "
        "database commit (~30%), fetches and commits still served; the consumer finishes",
    )
    # Right after a batch's database commit: its assignment events are being published.
    _, rows, during, errors = through(
        run, proxied_broker.produce_refused, REFUSAL_S, "produce refused", interval=0.002
    )
    verdict = run.finish()
    run.note(
        f"refused from {rows} rows for {REFUSAL_S:.0f}s ({proxied_broker.proxy.produce_refused} "
        f"produce requests dropped), {during} rows stored meanwhile; failed batch attempts "
        f"(reid_store_errors_total) {errors:.0f}; {redelivered(run)} events found already "
        f"stored; {verdict.figures['repeated_events']} assignment events repeated"
    )
    verdict.check()
    assert proxied_broker.proxy.produce_refused > 0, "no produce request was refused"
    assert errors > 0, "no publish failed: reid_store_errors_total is 0 (the test's timing)"


def through(
    run: FaultRun, fault: Callable[[], AbstractContextManager], seconds: float, what: str,
    *, interval: float = 0.25,
) -> tuple[Worker, int, int, float]:  # fmt: skip
    """The stream through one consumer, with ``fault()`` for ``seconds`` from ~30% (the
    moment a batch's rows are committed, to within ``interval``), until every event is stored
    and committed. Returns the consumer, the rows at the fault, the rows stored during it and
    the consumer's failed batch attempts."""
    produce(run)
    a = run.start_worker("a")
    rows = run.wait_rows(at(0.3), interval=interval)
    with fault():
        run.mark(what)
        time.sleep(seconds)
        during = run.rows() - rows
    run.mark(f"{what}: over")
    assert a.alive(), f"the consumer died during the fault ({what})\n{a.tail()}"
    run.wait_done(timeout=180)
    return a, rows, during, a.metrics()["reid_store_errors_total"]
