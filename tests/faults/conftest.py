"""Fault tests: every test here is marked ``faults`` and ``integration``, runs real consumer
processes against the session's embedded stack, and records a row for RELIABILITY.md."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from tests.faults.broker import ProxiedBroker
from tests.faults.harness import FaultRun


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.nodeid.startswith("tests/faults/"):
            item.add_marker(pytest.mark.faults)
            item.add_marker(pytest.mark.integration)


@contextlib.contextmanager
def _recorded(run: FaultRun, reliability) -> Iterator[FaultRun]:
    """At the end, whatever happened: workers killed, stopped services started again, and
    the scenario's row recorded (a test that failed before its checks records what could
    still be measured)."""
    try:
        yield run
    finally:
        run.close()
        if run.key is not None:
            reliability.record(run.row(), command=f"pytest -m faults -k {run.key}")


@pytest.fixture()
def fault_run(stack, database_url, redis_url, unique, tmp_path, reliability) -> Iterator[FaultRun]:
    """One scenario's topics, group, database and workers on the session's stack."""
    with _recorded(FaultRun(stack, database_url, unique, tmp_path), reliability) as run:
        yield run


@pytest.fixture()
def proxied_broker(tmp_path) -> Iterator[ProxiedBroker]:
    """A broker of the test's own, behind a proxy that can cut it (``tests.faults.broker``)."""
    broker = ProxiedBroker(tmp_path)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture()
def broker_fault_run(
    stack, database_url, redis_url, unique, tmp_path, reliability, proxied_broker
) -> Iterator[FaultRun]:
    """``fault_run`` with every Kafka client (workers, test) on ``proxied_broker``."""
    run = FaultRun(stack, database_url, unique, tmp_path, bootstrap=proxied_broker.bootstrap)
    with _recorded(run, reliability) as run:
        yield run
