"""The topics the stream creates, on the embedded broker: partitions, replication factor,
min.insync.replicas and a max.message.bytes that admits REID_MAX_MESSAGE_BYTES; an existing
topic is left alone, and one too small for the stream's events is reported."""

from __future__ import annotations

import logging

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, ConfigResource

from streams.settings import load_settings
from streams.topics import ensure_stream_topics, ensure_topics


def topic_config(bootstrap: str, name: str) -> dict[str, str]:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    (future,) = admin.describe_configs([ConfigResource("topic", name)]).values()
    return {k: v.value for k, v in future.result(timeout=10).items()}


def test_created_topics_admit_the_largest_accepted_event(kafka_bootstrap, unique) -> None:
    settings = load_settings(
        kafka_bootstrap_servers=kafka_bootstrap, topic_partitions=3,
        topic_replication_factor=1, topic_min_insync_replicas=1, max_message_bytes=3_000_000,
    )  # fmt: skip
    name = f"detections-{unique}"
    ensure_stream_topics(settings, [name])
    meta = AdminClient({"bootstrap.servers": kafka_bootstrap}).list_topics(name, timeout=10)
    assert len(meta.topics[name].partitions) == 3
    conf = topic_config(kafka_bootstrap, name)
    assert int(conf["max.message.bytes"]) == settings.message_limit_bytes() > 3_000_000
    assert conf["min.insync.replicas"] == "1"
    # An event of REID_MAX_MESSAGE_BYTES (three times Kafka's default limit) goes through.
    errors: list[object] = []
    producer = Producer(settings.producer_config())
    producer.produce(name, b"x" * 3_000_000, on_delivery=lambda err, _msg: errors.append(err))
    assert producer.flush(30) == 0 and errors == [None]


def test_an_existing_topic_is_left_alone_and_a_small_limit_reported(
    kafka_bootstrap, unique, caplog: pytest.LogCaptureFixture
) -> None:
    name = f"small-{unique}"
    ensure_topics({"bootstrap.servers": kafka_bootstrap}, [name], 1,
                  config={"max.message.bytes": "1048588"})  # fmt: skip
    settings = load_settings(kafka_bootstrap_servers=kafka_bootstrap, topic_partitions=4)
    with caplog.at_level(logging.WARNING, logger="streams.topics"):
        ensure_stream_topics(settings, [name])
    meta = AdminClient({"bootstrap.servers": kafka_bootstrap}).list_topics(name, timeout=10)
    assert len(meta.topics[name].partitions) == 1
    assert topic_config(kafka_bootstrap, name)["max.message.bytes"] == "1048588"
    (warning,) = [r.getMessage() for r in caplog.records if name in r.getMessage()]
    assert "max.message.bytes=1048588" in warning and "REID_MAX_MESSAGE_BYTES" in warning


def test_the_dead_letter_topic_admits_what_the_input_topic_admits(
    kafka_bootstrap, unique, caplog: pytest.LogCaptureFixture
) -> None:
    # An input topic made by hand with a larger limit than the stream's: its events, too large
    # for the stream, are dead-lettered as they are, so the dead-letter topic must take them.
    detections, dead = f"big-in-{unique}", f"big-in-{unique}.dlq"
    ensure_topics({"bootstrap.servers": kafka_bootstrap}, [detections], 1,
                  config={"max.message.bytes": "5000000"})  # fmt: skip
    settings = load_settings(
        kafka_bootstrap_servers=kafka_bootstrap, topic_detections=detections,
        topic_dead_letters=dead, topic_partitions=1, max_message_bytes=1_000,
    )  # fmt: skip
    assert settings.message_limit_bytes() < 5_000_000
    ensure_stream_topics(settings, [detections, dead])
    assert topic_config(kafka_bootstrap, dead)["max.message.bytes"] == "5000000"
    assert topic_config(kafka_bootstrap, detections)["max.message.bytes"] == "5000000"
    # An existing dead-letter topic below the input topic's limit is reported.
    small = f"small-dlq-{unique}"
    ensure_topics({"bootstrap.servers": kafka_bootstrap}, [small], 1,
                  config={"max.message.bytes": "1048588"})  # fmt: skip
    settings = settings.model_copy(update={"topic_dead_letters": small})
    with caplog.at_level(logging.WARNING, logger="streams.topics"):
        ensure_stream_topics(settings, [detections, small])
    (warning,) = [r.getMessage() for r in caplog.records if small in r.getMessage()]
    assert "max.message.bytes=1048588" in warning and "5000000" in warning
