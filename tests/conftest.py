"""Shared fixtures: the embedded stack (broker, PostgreSQL with pgvector, Redis) on loopback."""

from __future__ import annotations

import csv
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

# Real zebra photos kept in the repository (68 images of 10 animals, CC BY-SA: see its
# README), so that a fresh clone tests itself.
ZEBRA_DIR = Path(__file__).resolve().parent / "data" / "zebra"
# The whole set (362 images of 35 animals) beside the clone on the project's machines; tests
# that need more than the subset call full_zebra_dir(), which skips where it is absent.
FULL_ZEBRA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "zebra"


def full_zebra_dir() -> Path:
    """The whole zebra set, or a skip that says where it was looked for."""
    if not (FULL_ZEBRA_DIR / "meta.csv").is_file():
        pytest.skip(f"needs the full zebra set (35 animals) at {FULL_ZEBRA_DIR}; "
                    "the subset in tests/data/zebra is too small for it")  # fmt: skip
    return FULL_ZEBRA_DIR


def zebra_images(individuals: int, per_individual: int) -> list[tuple[str, Path]]:
    """(identity, path) of the first ``per_individual`` photos of the ``individuals`` animals
    with the most photos in the in-repository subset."""
    by_id: dict[str, list[Path]] = {}
    with open(ZEBRA_DIR / "index.csv") as f:
        for row in csv.DictReader(f):
            by_id.setdefault(row["identity"], []).append(ZEBRA_DIR / row["path"])
    chosen = sorted(by_id, key=lambda k: -len(by_id[k]))[:individuals]
    assert len(chosen) == individuals, f"the subset has {len(by_id)} animals"
    return [(who, path) for who in chosen for path in sorted(by_id[who])[:per_individual]]


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
        "REID_TOPIC_DEER_CHANGES": f"deer.changes-{unique}",
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
