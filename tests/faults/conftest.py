"""Fault tests: every test here is marked ``faults`` and ``integration``, runs real consumer
processes against the session's embedded stack, and records a row for RELIABILITY.md."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.faults.harness import FaultRun


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.nodeid.startswith("tests/faults/"):
            item.add_marker(pytest.mark.faults)
            item.add_marker(pytest.mark.integration)


@pytest.fixture()
def fault_run(stack, database_url, redis_url, unique, tmp_path, reliability) -> Iterator[FaultRun]:
    """One scenario's topics, group, database and workers. At the end, whatever happened:
    workers killed, stopped services started again, and the scenario's row recorded (a test
    that failed before its checks records what could still be measured)."""
    run = FaultRun(stack, database_url, unique, tmp_path)
    try:
        yield run
    finally:
        run.close()
        if run.key is not None:
            reliability.record(run.row(), command=f"pytest -m faults -k {run.key}")
