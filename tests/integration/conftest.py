"""Fixtures of the integration tests: real servers from the session's embedded stack."""

from collections.abc import Iterator

import pytest

from sinks.migrate import migrate
from sinks.store import PgStore
from tests.conftest import stream_environment

PARTITIONS = 2


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture()
def stream_env(stack, database_url, unique):
    """A migrated database and the environment of a stream process using it."""
    migrate(database_url)
    return stream_environment(stack, database_url, unique, REID_TOPIC_PARTITIONS=str(PARTITIONS))


@pytest.fixture()
def store(database_url: str) -> Iterator[PgStore]:
    """A started store on a migrated database of the test's own."""
    migrate(database_url)
    s = PgStore(database_url)
    s.start()
    yield s
    s.stop()
