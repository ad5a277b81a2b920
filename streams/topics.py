"""Creating the stream's topics when they are missing, with the limits the stream needs."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from streams.logs import with_kafka_logger

if TYPE_CHECKING:
    from streams.settings import Settings

log = logging.getLogger(__name__)


def ensure_topics(
    kafka_config: dict[str, Any],
    names: list[str],
    partitions: int,
    *,
    replication_factor: int = -1,
    config: dict[str, str] | None = None,
) -> None:
    """Create each topic that does not exist yet (``replication_factor`` -1: the broker's
    default; ``config``: topic configuration such as ``max.message.bytes``); existing topics
    are left as they are. Raises KafkaException when the broker cannot be reached."""
    admin = AdminClient(with_kafka_logger(kafka_config))
    existing = set(admin.list_topics(timeout=10).topics)
    if config and "max.message.bytes" in config:
        _warn_small_limit(admin, [n for n in names if n in existing], config)
    wanted = [
        NewTopic(n, num_partitions=partitions, replication_factor=replication_factor,
                 config=dict(config or {}))
        for n in names if n not in existing
    ]  # fmt: skip
    if not wanted:
        return
    for name, future in admin.create_topics(wanted, operation_timeout=10).items():
        try:
            future.result()
            log.info(
                "topics: created %s partitions=%d replication_factor=%s config=%s",
                name, partitions, replication_factor if replication_factor > 0 else "default",
                config or {},
            )  # fmt: skip
        except KafkaException as err:
            if err.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise


def _warn_small_limit(admin: AdminClient, names: list[str], config: dict[str, str]) -> None:
    """An existing topic (made by hand, or by a managed service's defaults) whose
    ``max.message.bytes`` is below what the stream needs refuses large events at the producer,
    before the stream can dead-letter them: say so at start."""
    if not names:
        return
    wanted = int(config["max.message.bytes"])
    try:
        futures = admin.describe_configs([ConfigResource("topic", n) for n in names])
        for resource, future in futures.items():
            entry = future.result(timeout=10).get("max.message.bytes")
            if entry is not None and entry.value is not None and int(entry.value) < wanted:
                log.warning(
                    "topics: %s has max.message.bytes=%s, below the %d that "
                    "REID_MAX_MESSAGE_BYTES (or, for the dead-letter topic, the input topic) "
                    "needs; larger events are refused by the broker. "
                    "Raise it: kafka-configs.sh --alter --entity-type topics --entity-name %s "
                    "--add-config max.message.bytes=%d",
                    resource.name, entry.value, wanted, resource.name, wanted,
                )  # fmt: skip
    except (KafkaException, ValueError, TimeoutError) as err:  # no describe_configs there
        log.debug("topics: cannot read the topics' configuration: %s", err)


def ensure_stream_topics(
    settings: Settings, names: list[str], partitions: int | None = None
) -> None:
    """:func:`ensure_topics` with the settings' partitions, replication factor,
    ``min.insync.replicas`` and a ``max.message.bytes`` that admits ``REID_MAX_MESSAGE_BYTES``.

    The dead-letter topic gets at least the input topic's ``max.message.bytes`` (an input
    topic made by hand may admit more than the stream's limit; its dead letters are the
    original events), and an existing one below that is reported."""
    config = settings.topic_config()
    dead = [n for n in names if n == settings.topic_dead_letters]
    rest = [n for n in names if n != settings.topic_dead_letters]
    kafka = settings.kafka_common()
    count = settings.topic_partitions if partitions is None else partitions
    rf = settings.topic_replication_factor
    if rest:
        ensure_topics(kafka, rest, count, replication_factor=rf, config=config)
    if dead:
        wanted = int(config["max.message.bytes"])
        source = topic_limit(kafka, settings.topic_detections)
        if source is not None and source > wanted:
            log.info(
                "topics: %s gets max.message.bytes=%d, the input topic %s's",
                dead[0], source, settings.topic_detections,
            )  # fmt: skip
            wanted = source
        dead_config = {**config, "max.message.bytes": str(wanted)}
        ensure_topics(kafka, dead, count, replication_factor=rf, config=dead_config)


def topic_limit(kafka_config: dict[str, Any], name: str) -> int | None:
    """The topic's ``max.message.bytes`` (its own or the broker's default); None when the
    topic does not exist or the broker cannot say (no describe_configs)."""
    admin = AdminClient(with_kafka_logger(kafka_config))
    try:
        if name not in admin.list_topics(timeout=10).topics:
            return None
        (future,) = admin.describe_configs([ConfigResource("topic", name)]).values()
        entry = future.result(timeout=10).get("max.message.bytes")
        return int(entry.value) if entry is not None and entry.value is not None else None
    except (KafkaException, ValueError, TimeoutError) as err:
        log.debug("topics: cannot read %s's max.message.bytes: %s", name, err)
        return None


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
            **with_kafka_logger(kafka_config),
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
