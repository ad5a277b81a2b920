"""Fixtures of the integration tests: real servers from the session's embedded stack."""

import json
import os

import pytest

from sinks.migrate import migrate
from streams.tools.stack import free_port
from tests.conftest import ZEBRA_DIR

PARTITIONS = 2


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture()
def stream_env(stack, database_url, unique, tmp_path):
    migrate(database_url)
    env = {
        **os.environ,
        "REID_KAFKA_BOOTSTRAP_SERVERS": stack.info.kafka_bootstrap,
        "REID_DATABASE_URL": database_url,
        "REID_REDIS_URL": stack.info.redis_url,
        "REID_TOPIC_DETECTIONS": f"detections-{unique}",
        "REID_TOPIC_ASSIGNMENTS": f"assignments-{unique}",
        "REID_TOPIC_DEAD_LETTERS": f"detections.dlq-{unique}",
        "REID_TOPIC_PARTITIONS": str(PARTITIONS),
        "REID_GROUP_ID": f"reid-{unique}",
        "REID_CACHE_KEY_PREFIX": f"reid-{unique}",
        "REID_SESSION_TIMEOUT_MS": "6000",
        "REID_BATCH_MAX_SIZE": "8",
        "REID_BATCH_MAX_WAIT_MS": "100",
        "REID_METRICS_PORT": str(free_port()),
        "REID_IMAGE_ROOTS": json.dumps([str(ZEBRA_DIR)]),
        "REID_SHUTDOWN_TIMEOUT_S": "20",
    }
    return env
