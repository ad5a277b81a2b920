"""Shared fixtures: the embedded stack (broker, PostgreSQL with pgvector, Redis) on loopback."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from streams.tools.stack import EmbeddedStack

# RELIABILITY.md rows recorded by the fault and hostile-input tests (see the module).
pytest_plugins = ("tests.faults.report",)

ZEBRA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "zebra"


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedStack]:
    """One embedded stack for the whole session, stopped at the end whatever happened."""
    from streams.tools.stack import EmbeddedStack

    s = EmbeddedStack(tmp_path_factory.mktemp("stack"))
    try:
        s.up()
        yield s
    finally:
        s.down()


@pytest.fixture()
def database_url(stack) -> Iterator[str]:
    """A fresh, empty database per test, so tests never see each other's rows."""
    from sinks.migrate import create_database, drop_database, sibling_url

    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = sibling_url(stack.info.database_url, "postgres")
    create_database(admin, name)
    yield sibling_url(stack.info.database_url, name)
    drop_database(admin, name)


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


def stream_environment(
    stack: EmbeddedStack, database_url: str, unique: str, **overrides: str
) -> dict[str, str]:
    """The environment of a `reid-stream` process on the session's stack: its own topics,
    consumer group and cache prefix (named after ``unique``), a free metrics port, the zebra
    photos as the image root, and test-sized batches. ``overrides`` (``REID_*`` names) win.
    The caller's own ``REID_*`` variables are left out, so a developer's shell cannot change
    what a test runs."""
    from streams.tools.stack import free_port

    clean = {k: v for k, v in os.environ.items() if not k.startswith("REID_")}
    return {
        **clean,
        "REID_KAFKA_BOOTSTRAP_SERVERS": stack.info.kafka_bootstrap,
        "REID_DATABASE_URL": database_url,
        "REID_REDIS_URL": stack.info.redis_url,
        "REID_TOPIC_DETECTIONS": f"detections-{unique}",
        "REID_TOPIC_ASSIGNMENTS": f"assignments-{unique}",
        "REID_TOPIC_DEAD_LETTERS": f"detections.dlq-{unique}",
        "REID_TOPIC_PARTITIONS": "2",
        "REID_GROUP_ID": f"reid-{unique}",
        "REID_CACHE_KEY_PREFIX": f"reid-{unique}",
        "REID_SESSION_TIMEOUT_MS": "6000",
        "REID_BATCH_MAX_SIZE": "8",
        "REID_BATCH_MAX_WAIT_MS": "100",
        "REID_METRICS_PORT": str(free_port()),
        "REID_IMAGE_ROOTS": json.dumps([str(ZEBRA_DIR)]),
        "REID_SHUTDOWN_TIMEOUT_S": "20",
        **overrides,
    }
