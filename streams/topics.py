"""Creating the stream's topics when they are missing."""

from __future__ import annotations

import logging
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

log = logging.getLogger(__name__)


def ensure_topics(kafka_config: dict[str, Any], names: list[str], partitions: int) -> None:
    """Create each topic that does not exist yet; existing topics are left as they are."""
    admin = AdminClient(kafka_config)
    existing = set(admin.list_topics(timeout=10).topics)
    wanted = [NewTopic(n, num_partitions=partitions) for n in names if n not in existing]
    if not wanted:
        return
    for name, future in admin.create_topics(wanted, operation_timeout=10).items():
        try:
            future.result()
            log.info("topics: created %s partitions=%d", name, partitions)
        except KafkaException as err:
            if err.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise


def read_topic(
    kafka_config: dict[str, Any], topic: str, *, expected: int, timeout_s: float = 30.0
) -> list[Any]:
    """Read ``topic`` from the beginning with a throwaway group until ``expected`` messages
    arrived or ``timeout_s`` passed (the end offset is not used: some brokers misreport it)."""
    import time
    import uuid

    from confluent_kafka import Consumer

    consumer = Consumer(
        {
            **kafka_config,
            "group.id": f"reid-reader-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "session.timeout.ms": 6000,
        }
    )
    consumer.subscribe([topic])
    messages: list[Any] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(messages) < expected and time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=500, timeout=0.5):
                if msg.error() is None:
                    messages.append(msg)
    finally:
        consumer.close()
    return messages
