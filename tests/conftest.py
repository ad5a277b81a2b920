"""Shared fixtures: the embedded stack (broker, PostgreSQL with pgvector, Redis) on loopback."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# RELIABILITY.md rows recorded by the fault and hostile-input tests (see the module).
pytest_plugins = ("tests.faults.report",)

ZEBRA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "zebra"


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedStack]:  # noqa: F821
    """One embedded stack for the whole session, stopped at the end whatever happened."""
    from streams.tools.stack import EmbeddedStack

    s = EmbeddedStack(tmp_path_factory.mktemp("stack"))
    try:
        s.up()
        yield s
    finally:
        s.down()


@pytest.fixture()
def database_url(stack) -> str:
    """A fresh, empty database per test, so tests never see each other's rows."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = stack.info.database_url.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield stack.info.database_url.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture()
def redis_url(stack) -> Iterator[str]:
    """The stack's Redis, flushed after each test."""
    import redis

    url = stack.info.redis_url
    yield url
    client = redis.Redis.from_url(url)
    try:
        client.flushall()
    finally:
        client.close()


@pytest.fixture()
def kafka_bootstrap(stack) -> str:
    return stack.info.kafka_bootstrap


@pytest.fixture()
def unique() -> str:
    """A short unique suffix for topic and group names (the broker has no per-test reset)."""
    return uuid.uuid4().hex[:8]
